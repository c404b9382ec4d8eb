"""`task=eval`: score any checkpoint on any data config and write `eval.json` plus pictures.

The model comes from the checkpoint (its stored config), the data from the current config, so a
CoinRun tokenizer can be scored on another procgen game or on Atari. Every model writes the same
`eval.json` schema: {schema, model, checkpoint, step, data, num_clips, metrics, media}.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.data.dataset import val_subset
from worldmodel.eval import metrics as M
from worldmodel.eval.lam import evaluate_lam
from worldmodel.eval.text_video import evaluate_text_video
from worldmodel.eval.world import evaluate_dynamics
from worldmodel.media import save_gif, save_grid, save_mp4, side_by_side
from worldmodel.metrics import RunningMeans
from worldmodel.models.interfaces import LatentActions, Tokenizer, WorldModel
from worldmodel.pipeline import frames_per_latent
from worldmodel.runtime import autocast, resolve_device, set_threads
from worldmodel.world import World

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` (a checkpoint, a world file or a run folder) on the validation
    split of `cfg.data`, on the run's device; returns eval.json's dict."""
    set_threads(cfg.trainer.get("threads"))
    device = resolve_device(cfg.trainer.get("accelerator", "cpu"))
    precision = cfg.trainer.get("precision", "fp32")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = Path(cfg.checkpoint)
    if source.is_dir() or source.suffix == ".safetensors":
        world = World.load(source, device, precision)
        model, step = world.dynamics, world.step_count
        name = str(world.config.get("model", {}).get("name", type(model).__name__))
    else:
        model, mcfg, state = load_model(source, device=device)
        step = int(state.get("step", 0))
        name = str(mcfg.model.get("name", type(model).__name__))
        world = (
            World.from_checkpoint(source, device, precision)
            if isinstance(model, WorldModel)
            else None
        )
    kind = "world" if world is not None else "tokenizer" if isinstance(model, Tokenizer) else "lam"
    if cfg.eval.get("clip_length"):
        # Scored clips of another length than training's: a tokenizer trained on single frames
        # scored on clips, or a world rolled out past its window (rollouts slide it).
        cfg = copy.deepcopy(cfg)
        cfg.data.clip_length = int(cfg.eval.clip_length)
    if isinstance(model, Tokenizer):
        val = instantiate(cfg.data).split(str(cfg.eval.get("split", "val")))
        try:  # a clip the tokenizer's time stages cannot split, named before any work
            model.latent_shape(int(val.clip_length), *val.resolution)
        except ValueError as e:
            key = "eval.clip_length" if cfg.eval.get("clip_length") else "data.clip_length"
            raise ValueError(f"{key}={val.clip_length} does not fit the tokenizer: {e}") from e
        metrics, media, n = evaluate_tokenizer(model, val, cfg, run_dir)
    elif isinstance(model, LatentActions):
        metrics, media, n = evaluate_lam(model, cfg, run_dir)
    elif world is not None:
        metrics, media, n = evaluate_dynamics(world, cfg, run_dir)
        if model.conditioning == "text" and len(model.games or []) > 1:  # text -> which game
            text_metrics, text_media, _ = evaluate_text_video(world, cfg, run_dir)
            metrics = {**text_metrics, **metrics}
            media = {**text_media, **media}
    else:
        raise NotImplementedError(
            f"task=eval has no evaluation for {type(model).__name__} (not a tokenizer, latent "
            "action model or world model)"
        )
    result = {
        "schema": SCHEMA_VERSION,
        "model": name,
        "kind": kind,
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "step": step,
        "data": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k in ("name", "env_name", "game", "folder", "resolution", "clip_length")
        },
        "split": str(cfg.eval.get("split", "val")),
        "num_clips": n,
        "metrics": metrics,
        "media": {k: str(Path(v).relative_to(run_dir)) for k, v in media.items()},
    }
    path = run_dir / "eval.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    log.info("eval: %s -> %s", json.dumps(metrics), path)
    return result


def _lpips(cfg: DictConfig) -> nn.Module | None:
    if not cfg.eval.get("lpips_weights"):
        return None
    return M.LPIPSMetric(net=cfg.eval.get("lpips_net", "alex"), weights_path=cfg.eval.lpips_weights)


def _reconstruct(model: Tokenizer, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction (B, C, T, H, W), indices (B, t, h, w)) of clips. A per-frame tokenizer
    built for shorter clips than these (VideoGPT's VQ-VAE with max_frames=1, as the pipeline uses
    it) reconstructs each frame alone."""
    b, t = video.shape[0], video.shape[2]
    limit = model.max_latent_frames
    if frames_per_latent(model) == 1 and limit is not None and t > limit:
        recon, indices = model.reconstruct(rearrange(video, "b c t h w -> (b t) c 1 h w"))
        return (
            rearrange(recon, "(b t) c 1 h w -> b c t h w", b=b),
            rearrange(indices, "(b t) 1 h w -> b t h w", b=b),
        )
    return model.reconstruct(video)


@torch.no_grad()
def evaluate_tokenizer(
    model: Tokenizer, val: Any, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, float], dict[str, Path], int]:
    """Reconstruction PSNR / SSIM / LPIPS and codebook use over held-out clips, on the model's
    device; on the frames that change (frames 1.. of each clip), the reconstruction beside
    copying the previous frame (and, for a tokenizer that refines, decoding with the real
    previous frame), PSNR of the pooled MSE."""
    device = next(model.parameters()).device
    subset = val_subset(val, int(cfg.eval.batches) * int(cfg.eval.batch_size))
    loader = DataLoader(subset, batch_size=int(cfg.eval.batch_size))
    lpips = _lpips(cfg)
    lpips = lpips.to(device) if lpips is not None else None
    means = RunningMeans()
    changing: dict[str, list[Tensor]] = {"mask": [], "recon": [], "copy": [], "refined": []}
    all_indices, shown = [], None
    n = 0
    bf16 = cfg.trainer.precision == "bf16"
    for batch in tqdm(loader, desc="eval", disable=not cfg.trainer.progress):
        video = batch["video"].to(device)
        with autocast(device, bf16):
            recon, indices = _reconstruct(model, video)
        recon = recon.float().clamp(-1, 1)
        b = video.shape[0]
        scores = {"psnr": M.psnr(recon, video), "ssim": M.ssim(recon, video)}
        if lpips is not None:
            scores["lpips"] = lpips(recon, video)
        means.update(scores, b)
        if video.shape[2] > 1:  # frames 1.. against the frame before each
            prev, target = video[:, :, :-1], video[:, :, 1:]
            changing["mask"].append(M.changing_mask(prev, target).cpu())
            changing["recon"].append(M.frame_mse(recon[:, :, 1:], target).cpu())
            changing["copy"].append(M.frame_mse(prev, target).cpu())
            if model.refines and recon.shape[2] == video.shape[2]:
                with autocast(device, bf16):
                    refined = model.refine(recon[:, :, 1:], prev).float()
                changing["refined"].append(M.frame_mse(refined, target).cpu())
        n += b
        all_indices.append(indices.flatten().cpu())
        if shown is None:
            k = int(cfg.eval.media_samples)
            shown = (video[:k].cpu(), recon[:k].cpu())
    metrics = means.result()
    if changing["mask"]:
        mask = torch.cat(changing["mask"])
        metrics["changing_fraction"] = float(mask.float().mean())
        for key, name in (
            ("recon", "psnr_changing"),
            ("copy", "copy_previous_psnr_changing"),
            ("refined", "refined_psnr_changing"),
        ):
            if changing[key]:
                metrics[name] = float(M.pooled_psnr(torch.cat(changing[key]), mask))
    stats = M.codebook_stats(torch.cat(all_indices), int(model.codebook_size))
    metrics.update({f"codebook/{k}": float(v) for k, v in stats.items()})
    metrics["tokens_per_frame"] = float(indices[0, 0].numel())  # per latent frame
    metrics["tokens_per_pixel_frame"] = indices[0].numel() / video.shape[2]  # per video frame
    media = {
        "reconstruction_grid": run_dir / "reconstruction.png",
        "side_by_side_gif": run_dir / "side_by_side.gif",
        "side_by_side_mp4": run_dir / "side_by_side.mp4",
    }
    real, fake = shown
    save_grid([real, fake], media["reconstruction_grid"])
    pair = side_by_side(real[0], fake[0])  # (C, T, H, 2W)
    save_gif(pair, media["side_by_side_gif"], fps=8, scale=4)
    save_mp4(pair, media["side_by_side_mp4"], fps=8, scale=4)
    return metrics, media, n
