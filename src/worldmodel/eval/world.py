"""World-model evaluation (`task=eval`): the latent action model and the dynamics model.

`evaluate_lam` scores a latent action model on pixel clips: the next-frame prediction of its
decoder (teacher-forced: real past frames, the code the encoder inferred for the transition), how
much of its tiny codebook it uses, and -- where the data has true actions -- how well its codes
agree with them (NMI, confusion matrix, the true-action -> code mapping, agreement).

`evaluate_dynamics` scores a dynamics model the way Genie does, in pixels through its frozen
tokenizer: teacher-forced next-frame PSNR/SSIM, autoregressive rollout PSNR against the horizon,
ΔtPSNR (rollouts with the inferred or true actions minus rollouts with random actions, paired per
clip), an FVD-style distance between real and generated clips, and generation speed. Token clips
come from `worldmodel.pipeline.token_datasets` and pixel clips from the same split with the same
enumeration, so clip i of both is the same frames. With a tokenizer that compresses time (C-ViViT,
a temporal VQ-VAE) a latent frame covers several pixel frames (`FrameLayout`): generated latent
frames are decoded together with the real latent frames before them, as one clip, and scored
against the pixel frames they cover, so rollout curves and ΔtPSNR count pixel frames for every
tokenizer.

Both return `(metrics, media, num_clips)` for `eval.runner.evaluate`, which writes eval.json.
Sampling uses a fixed `torch.Generator` (seed `cfg.seed`) and the masked-token loss runs under a
forked, seeded global RNG: the same checkpoint and config give the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from worldmodel.config import instantiate
from worldmodel.data.dataset import val_subset
from worldmodel.data.tokens import token_cache
from worldmodel.eval import metrics as M
from worldmodel.eval.fvd import FeatureStats, build_feature_net, frechet_distance, fvd_metric_name
from worldmodel.media import plot_confusion, plot_curve, save_gif, save_grid, save_mp4, side_by_side
from worldmodel.models.interfaces import LatentActions
from worldmodel.runtime import autocast
from worldmodel.world import FrameLayout, World

log = logging.getLogger(__name__)

# ΔtPSNR is reported at this horizon (Genie's t = 4), or at the largest one if rollouts are shorter.
DELTA_PSNR_T = 4


# ------------------------------------------------------------------------------------------------
# Shared helpers (also used by `worldmodel.play`)
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed global torch RNG without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def token_val(world: World, pixels: Any) -> Any:
    """The token clips of `pixels` (a split's pixel clips) for `world`, tokenized once into the
    data cache with the world's own frozen tokenizer (and LAM) on its device."""
    return token_cache(
        pixels,
        world.cache_key,
        world.tokenizer,
        world.lam,
        world.lam_window,
        world.dynamics.inputs,
        world.frames_per_latent,
    )


def pixel_val(data_cfg: DictConfig) -> Any:
    """The validation clips of a data config (recorded into its cache on first use)."""
    return instantiate(data_cfg).datasets()[1]


def text_context(model: nn.Module, clip_actions: Tensor) -> Any:
    """The conditioning a text-to-video model (phenaki: `texts_of`) generates with: the caption
    of the whole clip, rendered from its actions as in training; None for action-conditioned
    models (they read the action of each frame)."""
    if not hasattr(model, "texts_of"):
        return None
    return model.encode_text(model.texts_of({"actions": clip_actions}))


def true_action_mapping(
    pixels: Any, tokens: Any, num_codes: int
) -> tuple[Tensor, dict[int, int]] | None:
    """Confusion (true action x latent code) over a whole split and the true -> code mapping.

    Reads the split's recorded actions and the latent actions the pipeline cached beside them
    (both per frame, aligned), so it costs no model call. None when the data has no actions.
    """
    if pixels.num_actions is None:
        return None
    true = torch.from_numpy(np.load(pixels.actions_path))
    latent = torch.from_numpy(np.load(tokens.actions_path))
    confusion = M.confusion_matrix(true, latent, int(pixels.num_actions), num_codes)
    if int(confusion.sum()) == 0:
        return None
    return confusion, M.action_mapping(confusion)


class PairedClips(Dataset):
    """Token clip i and pixel clip i of one split (the same frames): one batch dict with
    `tokens`, `actions` (those the dynamics model is conditioned on), `mask` and `video`."""

    def __init__(self, tokens: Any, pixels: Any) -> None:
        if len(tokens) != len(pixels):
            raise ValueError(f"{len(tokens)} token clips but {len(pixels)} pixel clips")
        self.tokens, self.pixels = tokens, pixels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {**self.tokens[index], "video": self.pixels[index]["video"]}


def _loader(dataset: Any, cfg: DictConfig) -> DataLoader:
    """The evenly spread validation subset every evaluation scores (eval.batches x batch_size)."""
    if len(dataset) == 0:
        raise ValueError(
            f"the validation split of data={cfg.data.get('name')} has no clips of "
            f"data.clip_length={cfg.data.clip_length} frames"
        )
    n = int(cfg.eval.batches) * int(cfg.eval.batch_size)
    return DataLoader(val_subset(dataset, n), batch_size=int(cfg.eval.batch_size))


def _bf16(cfg: DictConfig) -> bool:
    return cfg.trainer.get("precision", "fp32") == "bf16"


def _progress(loader: DataLoader, cfg: DictConfig, desc: str) -> Any:
    return tqdm(loader, desc=desc, disable=not cfg.trainer.get("progress", False))


class Means:
    """Running clip-weighted means of scalar metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor | float, n: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.counts[name] = self.counts.get(name, 0) + n

    def result(self) -> dict[str, float]:
        return {k: v / max(self.counts[k], 1) for k, v in self.sums.items()}


def _frame_scores(means: Means, pred: Tensor, target: Tensor) -> None:
    """PSNR and SSIM of predicted frames (B, C, T, H, W) against the real ones."""
    b = pred.shape[0]
    means.add("psnr", M.psnr(pred, target), b)
    means.add("ssim", M.ssim(pred, target), b)


def _code_metrics(codes: Tensor, num_codes: int) -> dict[str, Any]:
    """Usage statistics of latent action codes (`codebook/...`), with the share of each code."""
    stats = M.codebook_stats(codes, num_codes)
    out: dict[str, Any] = {f"codebook/{k}": float(v) for k, v in stats.items()}
    counts = torch.bincount(codes[codes >= 0].long(), minlength=num_codes).double()
    out["codebook/fraction"] = (counts / counts.sum().clamp_min(1)).tolist()
    return out


def _alignment(
    true: Tensor, codes: Tensor, num_true: int, num_codes: int, path: Path
) -> tuple[dict[str, Any], Path | None]:
    """NMI, agreement and the true-action -> code mapping of paired labels, and the confusion
    matrix (rows = true actions, columns = codes) drawn into `path`. Empty without true actions."""
    known = true >= 0
    if not bool(known.any()):
        return {}, None
    confusion = M.confusion_matrix(true, codes, num_true, num_codes)
    mapping = M.action_mapping(confusion)
    metrics = {
        "action_nmi": M.normalized_mutual_information(true[known], codes[known]),
        "action_agreement": M.action_agreement(confusion),
        "action_mapping": {str(a): c for a, c in mapping.items()},
        "action_confusion": confusion.tolist(),
        "action_pairs": int(known.sum()),
    }
    plot_confusion(confusion, path, title="latent code per true action")
    return metrics, path


def _save_rollout_media(real: Tensor, fake: Tensor, run_dir: Path, name: str) -> dict[str, Path]:
    """GIF and MP4 of clips (B, C, T, H, W): real on the left, generated on the right, clips
    stacked top to bottom."""
    pairs = side_by_side(real, fake, gap=2)  # (B, C, T, H, 2 W + 2)
    video = rearrange(pairs, "b c t h w -> c t (b h) w")  # one tall clip
    return {
        f"{name}_gif": save_gif(video, run_dir / f"{name}.gif", fps=4, scale=2),
        f"{name}_mp4": save_mp4(video, run_dir / f"{name}.mp4", fps=4, scale=2),
    }


# ------------------------------------------------------------------------------------------------
# Latent action model
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_lam(
    model: LatentActions, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Next-frame prediction, codebook use and agreement with true actions of a LAM.

    Next frames are teacher-forced: frame t+1 is predicted from the real frames 0..t and the code
    the encoder inferred for t -> t+1; `random_action_psnr` predicts it with a uniformly random
    code instead (how much the decoder relies on the action, the LAM's own ΔPSNR). Scored on
    the validation clips of `cfg.data`, cut to the model's `max_frames`.
    """
    pixels = pixel_val(cfg.data)
    loader = _loader(pixels, cfg)
    num_codes = int(model.num_actions)
    length = min(pixels.clip_length, int(model.max_frames))
    if length < 2:
        raise ValueError(f"data.clip_length={pixels.clip_length}: a LAM needs clips of >= 2 frames")
    bf16 = _bf16(cfg)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    means = Means()
    all_codes, all_true = [], []
    shown = None
    n = 0
    for batch in _progress(loader, cfg, "eval lam"):
        video = batch["video"][:, :, :length].to(device)  # (B, C, T, H, W)
        target = video[:, :, 1:]
        b = video.shape[0]
        n += b
        with autocast(device, bf16):
            codes = model.infer_actions(video)  # (B, T-1): transition t -> t+1
            pred = model.predict_frames(video, codes)  # (B, C, T-1, H, W)
            random = torch.randint(0, num_codes, codes.shape, generator=gen, device=gen.device)
            pred_random = model.predict_frames(video, random)
        pred = pred.float().clamp(-1.0, 1.0)
        _frame_scores(means, pred, target)
        means.add("random_action_psnr", M.psnr(pred_random.float().clamp(-1.0, 1.0), target), b)
        means.add("copy_last_psnr", M.psnr(video[:, :, :-1], target), b)
        all_codes.append(codes.flatten().cpu())
        all_true.append(batch["actions"][:, : length - 1].flatten())  # aligned with the codes
        if shown is None:
            samples = int(cfg.eval.get("media_samples", 4))
            shown = [target[:samples].cpu(), pred[:samples].cpu()]

    codes, true = torch.cat(all_codes), torch.cat(all_true)
    metrics: dict[str, Any] = means.result()
    metrics["delta_psnr"] = metrics["psnr"] - metrics["random_action_psnr"]
    metrics.update(_code_metrics(codes, num_codes))
    media = {"next_frame_grid": save_grid(shown, run_dir / "next_frame.png")}
    if pixels.num_actions is not None:
        aligned, path = _alignment(
            true, codes, int(pixels.num_actions), num_codes, run_dir / "action_confusion.png"
        )
        metrics.update(aligned)
        if path is not None:
            media["action_confusion"] = path
    return metrics, media, n


# ------------------------------------------------------------------------------------------------
# Dynamics model
# ------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """MaskGIT decoding settings used for every generated frame of an evaluation."""

    steps: int = 8
    temperature: float = 1.0
    generator: torch.Generator | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "temperature": self.temperature, "generator": self.generator}


@torch.no_grad()
def _teacher_forced(
    world: World, batch: dict[str, Tensor], sampling: Sampling, bf16: bool, means: Means
) -> tuple[Tensor, Tensor]:
    """Generate every frame t >= 1 from the real tokens of frames 0..t-1 and the action that led
    to it; score the decoded frames against the real pixels. Returns (real, generated) frames
    (B, C, L-1, H, W), L = the frames that fit the model's window."""
    model = world.dynamics
    video = batch["video"]  # (B, C, T, H, W)
    layout = FrameLayout.of(world.tokenizer, video.shape[2], batch["tokens"].shape[1])
    length = min(batch["tokens"].shape[1], model.max_frames)
    tokens = batch["tokens"][:, :length]  # (B, L, h, w)
    actions = batch["actions"][:, :length]  # (B, L)
    b = tokens.shape[0]
    with autocast(world.device, bf16):
        cache = text_context(model, actions)
        if cache is None:
            cache = model.new_cache(tokens[:, :1], actions[:, :0])
        generated = [
            model.generate_next(tokens[:, :t], actions[:, :t], cache=cache, **sampling.kwargs())
            for t in range(1, length)
        ]
    generated = torch.stack(generated, dim=1)  # (B, L-1, h, w)
    if layout.k == 1:
        pred = world.decode(generated)  # (B, C, L-1, H, W)
    else:  # frame t decoded after the real frames 0..t-1 it was generated from
        pred = torch.cat(
            [world.decode_after(tokens[:, :t], generated[:, t - 1 : t]) for t in range(1, length)],
            dim=2,
        )
    span = layout.span(1, length)
    real = video[:, :, span]  # (B, C, n, H, W): the pixel frames of latent frames 1..L-1
    _frame_scores(means, pred, real)
    means.add("token_acc", (generated == tokens[:, 1:]).float().mean(), b)
    means.add("copy_last_psnr", M.psnr(video[:, :, span.start - 1 : span.stop - 1], real), b)
    recon = world.decode_after(tokens[:, :1], tokens[:, 1:])
    means.add("tokenizer_psnr", M.psnr(recon, real), b)
    return real, pred


def _random_actions(
    actions: Tensor, context: int, num_actions: int, gen: torch.Generator
) -> Tensor:
    """The same actions for the context frames, uniformly random ones for the generated frames."""
    out = actions.clone()
    tail = out[:, context - 1 :]  # actions[:, t] leads to frame t + 1: these drive the rollout
    tail.copy_(torch.randint(0, num_actions, tail.shape, generator=gen, device=gen.device))
    return out


@torch.no_grad()
def _rollout(
    world: World,
    tokens: Tensor,
    actions: Tensor,
    context: int,
    horizon: int,
    sampling: Sampling,
    bf16: bool,
) -> Tensor:
    """Decoded pixel frames (B, C, n, H, W) of `horizon` latent frames generated
    autoregressively after `context` real token frames of `tokens` (B, T, h, w), driven by
    `actions` (B, T) (n = horizon for per-frame tokens)."""
    with autocast(world.device, bf16):
        generated = world.dynamics.rollout(
            tokens[:, :context], actions, horizon, **sampling.kwargs()
        )  # (B, horizon, h, w)
    return world.decode_after(tokens[:, :context], generated)


@torch.no_grad()
def generation_speed(
    world: World, tokens: Tensor, actions: Tensor, frames: int, sampling: Sampling, bf16: bool
) -> float:
    """Pixel frames per second of `generate_next` with the KV cache, one clip at a time (batch
    1), from the context `tokens` (1, c, h, w) with `actions` (1, >= c + frames - 1); decoding
    excluded. A latent frame of a tokenizer that compresses time counts as the k pixel frames it
    decodes to."""
    model = world.dynamics
    c = tokens.shape[1]
    frames = max(1, min(frames, model.max_frames - c))
    with autocast(world.device, bf16):
        text = text_context(model, actions)
        model.generate_next(tokens, actions[:, :c], cache=text, **sampling.kwargs())  # warm-up
        cache = text if text is not None else model.new_cache(tokens, actions[:, : c - 1])
        start = time.perf_counter()
        for _ in range(frames):
            t = tokens.shape[1]
            frame = model.generate_next(tokens, actions[:, :t], cache=cache, **sampling.kwargs())
            tokens = torch.cat([tokens, frame[:, None]], dim=1)
        elapsed = time.perf_counter() - start
    return frames * world.frames_per_latent / elapsed


def _delta_metrics(psnr_actions: Tensor, psnr_random: Tensor) -> dict[str, Any]:
    """ΔtPSNR per horizon t = 1..H (keys delta_psnr_t{t} and _stderr), and the headline value at
    t = 4 (or the largest horizon when rollouts are shorter)."""
    delta = M.delta_psnr(psnr_actions, psnr_random)
    mean, stderr = delta["mean"].tolist(), delta["stderr"].tolist()
    out: dict[str, Any] = {}
    for t, (m, s) in enumerate(zip(mean, stderr), start=1):
        out[f"delta_psnr_t{t}"] = m
        out[f"delta_psnr_t{t}_stderr"] = s
    t = min(DELTA_PSNR_T, len(mean))
    out.update(
        {
            "delta_psnr": mean[t - 1],
            "delta_psnr_stderr": stderr[t - 1],
            "delta_psnr_horizon": t,
            "delta_psnr_clips": int(delta["n"]),
            "delta_psnr_curve": mean,
            "delta_psnr_curve_stderr": stderr,
        }
    )
    return out


def latent_frames(world: World, pixels: Any) -> int:
    """Latent frames of the token clips of `pixels`' clips (= their frames for per-frame tokens)."""
    if world.frames_per_latent == 1:
        return int(pixels.clip_length)
    return int(world.tokenizer.latent_shape(pixels.clip_length, *pixels.resolution)[0])


def _rollout_lengths(cfg: DictConfig, clip_length: int) -> tuple[int, int]:
    """(context frames, horizon) of the rollouts; the horizon is cut to what the clips hold."""
    context = int(cfg.eval.get("context_frames", 1))
    horizon = int(cfg.eval.get("horizon", 8))
    if context < 1 or context >= clip_length:
        raise ValueError(
            f"eval.context_frames={context} must be in [1, data.clip_length={clip_length})"
        )
    if horizon < 1:
        raise ValueError(f"eval.horizon={horizon} must be >= 1")
    if context + horizon > clip_length:
        log.warning(
            "eval.horizon=%d does not fit clips of %d frames after %d context frames: using %d",
            horizon,
            clip_length,
            context,
            clip_length - context,
        )
        horizon = clip_length - context
    return context, horizon


@torch.no_grad()
def evaluate_dynamics(
    world: World, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Next-frame quality, rollouts vs horizon, ΔtPSNR, FVD and speed of a world.

    `cfg` is the eval run's config (data, eval); the world brings its frozen tokenizer/LAM, the
    action source, its device and precision. With a tokenizer that compresses time,
    eval.context_frames and eval.horizon count latent frames, and the rollout curves count the
    pixel frames they decode to.
    """
    model, device = world.dynamics, world.device
    pixels = pixel_val(cfg.data)
    layout = FrameLayout.of(world.tokenizer, pixels.clip_length, latent_frames(world, pixels))
    loader = _loader(PairedClips(token_val(world, pixels), pixels), cfg)
    context, horizon = _rollout_lengths(cfg, layout.latents)
    span = layout.span(context, context + horizon)  # the pixel frames the rollouts generate
    bf16 = world.bf16
    gen = world.generator(int(cfg.seed))
    sampling = Sampling(int(cfg.eval.get("steps", 8)), float(cfg.eval.get("temperature", 1.0)), gen)
    feature_net = build_feature_net(cfg.eval.get("fvd_weights"), seed=int(cfg.seed)).to(device)
    real_feats, fake_feats = FeatureStats(), FeatureStats()
    means = Means()
    psnr_actions, psnr_random = [], []
    shown: dict[str, tuple[Tensor, Tensor]] = {}
    samples = int(cfg.eval.get("media_samples", 4))
    n = 0
    for i, batch in enumerate(_progress(loader, cfg, "eval dynamics")):
        batch = {k: v.to(device) for k, v in batch.items()}
        if "latents" in batch:  # a model with its own quantizer over the tokenizer's latents
            batch["tokens"] = model.encode(batch["latents"])  # (B, T, h, w) its codes
        b = batch["tokens"].shape[0]
        n += b
        window = {k: batch[k][:, : model.max_frames] for k in ("tokens", "actions", "mask")}
        with seeded(int(cfg.seed) + i), autocast(device, bf16):
            _, loss_metrics = model.loss(window)
        for key in ("ce", "masked_acc"):
            means.add(key, loss_metrics[key], b)
        real_next, pred_next = _teacher_forced(world, batch, sampling, bf16, means)

        tokens, actions, video = batch["tokens"], batch["actions"], batch["video"]
        random = _random_actions(actions, context, world.num_actions, gen)
        fake = _rollout(world, tokens, actions, context, horizon, sampling, bf16)
        fake_random = _rollout(world, tokens, random, context, horizon, sampling, bf16)
        real = video[:, :, span]  # (B, C, n, H, W)
        psnr_actions.append(M.psnr(fake, real, reduction="none").cpu())  # (B, n)
        psnr_random.append(M.psnr(fake_random, real, reduction="none").cpu())
        # FVD compares whole clips: the real context frames followed by the real / generated ones
        real_clip = video[:, :, : span.stop]
        fake_clip = torch.cat([video[:, :, : span.start], fake], dim=2)
        real_feats.update(feature_net(real_clip).cpu())
        fake_feats.update(feature_net(fake_clip).cpu())
        if not shown:
            shown["next"] = (real_next[:samples].cpu(), pred_next[:samples].cpu())
            shown["rollout"] = (real_clip[:samples].cpu(), fake_clip[:samples].cpu())
            first = (tokens[:1, :context], actions[:1])

    psnr_actions_t, psnr_random_t = torch.cat(psnr_actions), torch.cat(psnr_random)  # (N, H)
    metrics: dict[str, Any] = means.result()
    metrics["rollout_psnr"] = psnr_actions_t.mean(dim=0).tolist()
    metrics["rollout_psnr_random"] = psnr_random_t.mean(dim=0).tolist()
    metrics.update(_delta_metrics(psnr_actions_t, psnr_random_t))
    if n >= 2:
        metrics[fvd_metric_name(feature_net)] = frechet_distance(
            real_feats.mean, real_feats.cov, fake_feats.mean, fake_feats.cov
        )
    else:
        log.warning("FVD needs at least 2 clips, got %d: not reported", n)
    metrics["gen_fps"] = generation_speed(world, *first, horizon, sampling, bf16)

    label = "latent actions" if world.action_source == "latent" else "true actions"
    horizons = list(range(1, span.stop - span.start + 1))  # pixel frames after the context
    media = {
        "next_frame_grid": save_grid(list(shown["next"]), run_dir / "next_frame.png"),
        "rollout_psnr_plot": plot_curve(
            horizons,
            {label: metrics["rollout_psnr"], "random actions": metrics["rollout_psnr_random"]},
            run_dir / "rollout_psnr.png",
            title=f"rollout PSNR after {span.start} real frame(s)",
        ),
        "delta_psnr_plot": plot_curve(
            horizons,
            {"ΔtPSNR": metrics["delta_psnr_curve"]},
            run_dir / "delta_psnr.png",
            ylabel="ΔtPSNR (dB)",
            title=f"{label} vs random ({n} clips, ± stderr)",
            yerr={"ΔtPSNR": metrics["delta_psnr_curve_stderr"]},
        ),
        **_save_rollout_media(*shown["rollout"], run_dir, "rollout"),
    }
    return metrics, media, n
