"""`task=eval`: score any checkpoint on any data config and write `eval.json` plus pictures.

The model comes from the checkpoint (its stored config), the data from the current config, so a
CoinRun tokenizer can be scored on another procgen game or on Atari. Every model writes the same
`eval.json` schema: {schema, model, checkpoint, step, data, num_clips, metrics, media}.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.data.dataset import val_subset
from worldmodel.eval import metrics as M
from worldmodel.pipeline import frames_per_latent

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
TOKENIZERS = ("tokenizer", "tokenizer_cvivit", "videogpt_vqvae")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` on the validation split of `cfg.data`; returns eval.json's dict."""
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    model, mcfg, state = load_model(cfg.checkpoint)
    name = mcfg.model.get("name", type(model).__name__)
    data_cfg = cfg.data.copy()
    if cfg.eval.get("clip_length"):  # e.g. a tokenizer trained on single frames, shown on clips
        data_cfg.clip_length = int(cfg.eval.clip_length)
    _, val = instantiate(data_cfg).datasets()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if name in TOKENIZERS:
        metrics, media, n = evaluate_tokenizer(model, val, cfg, run_dir)
    elif name == "lam":
        from worldmodel.eval.world import evaluate_lam

        metrics, media, n = evaluate_lam(model, cfg, run_dir, state)
    elif mcfg.model.get("pipeline") is not None:
        from worldmodel.eval.world import evaluate_dynamics

        metrics, media, n = evaluate_dynamics(model, cfg, run_dir, state)
        if name == "phenaki" and len(model.games or []) > 1:  # text -> which game, per game
            from worldmodel.eval.text_video import evaluate_text_video

            text_metrics, text_media, _ = evaluate_text_video(model, cfg, run_dir, state)
            metrics = {**text_metrics, **metrics}
            media = {**text_media, **media}
    else:
        raise NotImplementedError(f"task=eval has no evaluation for model {name!r}")
    result = {
        "schema": SCHEMA_VERSION,
        "model": name,
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "step": int(state.get("step", 0)),
        "data": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k in ("name", "env_name", "game", "folder", "resolution", "clip_length")
        },
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


def _reconstruct(model: nn.Module, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction (B, C, T, H, W), indices (B, t, h, w)) of clips. A per-frame tokenizer
    built for shorter clips than these (VideoGPT's VQ-VAE with max_frames=1, as the pipeline uses
    it) reconstructs each frame alone."""
    b, t = video.shape[0], video.shape[2]
    limit = getattr(model, "max_latent_frames", None)
    if frames_per_latent(model) == 1 and limit is not None and t > limit:
        recon, indices = model.reconstruct(rearrange(video, "b c t h w -> (b t) c 1 h w"))
        return (
            rearrange(recon, "(b t) c 1 h w -> b c t h w", b=b),
            rearrange(indices, "(b t) 1 h w -> b t h w", b=b),
        )
    return model.reconstruct(video)


@torch.no_grad()
def evaluate_tokenizer(
    model: nn.Module, val: Any, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, float], dict[str, Path], int]:
    """Reconstruction PSNR / SSIM / LPIPS and codebook use over held-out clips."""
    from worldmodel.media import save_gif, save_grid, save_mp4, side_by_side

    subset = val_subset(val, int(cfg.eval.batches) * int(cfg.eval.batch_size))
    loader = DataLoader(subset, batch_size=int(cfg.eval.batch_size))
    lpips = _lpips(cfg)
    sums: dict[str, float] = {}
    all_indices, shown = [], None
    n = 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16")
    for batch in tqdm(loader, desc="eval", disable=not cfg.trainer.progress):
        video = batch["video"]
        with amp:
            recon, indices = _reconstruct(model, video)
        recon = recon.float().clamp(-1, 1)
        b = video.shape[0]
        scores = {"psnr": M.psnr(recon, video), "ssim": M.ssim(recon, video)}
        if lpips is not None:
            scores["lpips"] = lpips(recon, video)
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
        all_indices.append(indices.flatten())
        if shown is None:
            shown = (video[: int(cfg.eval.media_samples)], recon[: int(cfg.eval.media_samples)])
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
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
