"""A memory test for long rollouts, and rollout error on the frames that change out to 64 frames.

A world model that sees a window of `max_frames` frames forgets what it showed before: when the
agent comes back to a view it left more than a window ago, the world has to generate that view
again from what it learned, not from what it saw. The memory test measures this on real
episodes of a held-out split (`eval.memory`):

1. Return pairs (`find_return_pairs`): frames (i, j) of one episode where frame j shows the view
   of frame i again (pixel MSE in [0, 1] under `close_mse`; 1e-3 is a PSNR above 30 dB) after
   the view went away (a frame between the world's last real frame and j differs from frame i
   by more than `away_mse`; 1e-2 is a PSNR under 20 dB), so a view that stayed put does not
   count. The world gets the real frames c0..c1 = i + context_after - context_frames + 1 ..
   i + context_after (frame i is in its past) and generates frames c1 + 1 .. j under the
   recorded actions (a latent-action world: the LAM's actions of the real frames, as the rest
   of the evaluation). The gap j - c1 (the frames generated) is in [min_gap, max_gap]: with
   min_gap = 16, no real frame is left in the 15 past frames a 16-frame window conditions
   frame j on, so a windowing world has to recall the view, not copy it.
2. Scores (`score_returns`): generated frame j against the real frame j, beside copying frame i
   (what a perfect memory of the old view gives) and copying frame c1 (the last real frame
   the world saw), and the tokenizer's own reconstruction of frame j (the ceiling through the
   tokens). PSNR is the PSNR of the MSE pooled over pairs (an exact return would score a
   floored ~106 dB per frame and dominate a mean of per-frame PSNRs), its standard error
   clustered by episode through the delta method; SSIM is the mean over pairs with its
   clustered standard error.

`long_rollouts` rolls a world out for `eval.long_horizon` frames (64 in experiment=memory) after
`eval.context_frames` real frames on clips of the same split, and reports the PSNR of the pooled
MSE on the frames that change per horizon beside copying the last context frame, as the
evaluation's 8-frame curves do.

Both go through the `World` (its `dynamics.rollout`, which slides a windowing model's window and
lets a long-context model keep its own), so they run for any world model with per-frame tokens.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from worldmodel.data.dataset import val_subset
from worldmodel.eval import metrics as M
from worldmodel.eval.clips import clip_episodes, concat_rows, pixel_val, to_cpu, token_val
from worldmodel.runtime import autocast
from worldmodel.world import World

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Return pairs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySettings:
    """`eval.memory`: how return pairs are found and what the world is given (see the module)."""

    min_gap: int = 16
    max_gap: int = 32
    close_mse: float = 1e-3
    away_mse: float = 1e-2
    context_frames: int = 4
    context_after: int = 1
    pairs_per_episode: int = 2
    max_pairs: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.min_gap < 1 or self.max_gap < self.min_gap:
            problems.append(f"min_gap={self.min_gap}, max_gap={self.max_gap}: need 1 <= min <= max")
        if not 0 < self.close_mse < self.away_mse:
            problems.append(
                f"close_mse={self.close_mse}, away_mse={self.away_mse}: need 0 < close < away"
            )
        if self.context_after < 0 or self.context_frames < self.context_after + 1:
            problems.append(
                f"context_frames={self.context_frames}, context_after={self.context_after}: the "
                "context must hold frame i (context_after >= 0, context_frames > context_after)"
            )
        if self.pairs_per_episode < 1 or self.max_pairs < 1:
            problems.append("pairs_per_episode and max_pairs must be >= 1")
        if problems:
            raise ValueError("eval.memory: " + "; ".join(problems))

    @classmethod
    def from_config(cls, node: Any) -> MemorySettings:
        """The settings of an `eval.memory` node (unknown keys are an error; `enabled` is not a
        setting of the test itself)."""
        values = {str(k): v for k, v in dict(node or {}).items() if k != "enabled"}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"eval.memory.{', eval.memory.'.join(unknown)}: unknown (valid: "
                f"enabled, {', '.join(sorted(known))})"
            )
        types = {k: type(getattr(cls, k)) for k in known}
        return cls(**{k: types[k](v) for k, v in values.items()})


@dataclass(frozen=True)
class ReturnPair:
    """Frame j of an episode returns to the view of frame i (episode-local indices); the world
    gets the real frames `c0..c1` and generates `gap` = j - c1 frames."""

    episode: int  # index into the split's episode table
    offset: int  # the episode's first frame in the split's frame array
    i: int
    j: int
    c0: int
    c1: int
    mse: float  # pixel MSE (in [0, 1]) of frame j to frame i
    away: float  # the largest MSE to frame i of the frames c1 + 1 .. j - 1

    @property
    def gap(self) -> int:
        return self.j - self.c1


def _as_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (n, H, W, C) -> float32 (n, H W C) in [0, 1]."""
    return np.asarray(frames, dtype=np.float32).reshape(len(frames), -1) / 255.0


def episode_returns(
    frames: np.ndarray, settings: MemorySettings
) -> list[tuple[int, int, float, float]]:
    """The return pairs (i, j, mse, away) of one episode's uint8 frames (n, H, W, C), at most
    `pairs_per_episode`: for each return frame j the closest earlier view i (of equals, the
    latest: the last frame before the view left), then the returns
    with the smallest MSE whose frames j are at least min_gap // 2 apart (one return event
    gives one pair, not one per frame of it)."""
    s = settings
    n = len(frames)
    x = _as_unit(frames)  # (n, D)
    best: dict[int, tuple[int, float, float]] = {}  # j -> (i, mse, away)
    first = s.context_frames - 1 - s.context_after  # c0 = i + context_after - L + 1 >= 0
    for i in range(max(0, first), n):
        c1 = i + s.context_after
        j_lo, j_hi = c1 + s.min_gap, min(n - 1, c1 + s.max_gap)
        if j_lo > j_hi:
            break
        mse = ((x[c1 + 1 : j_hi + 1] - x[i]) ** 2).mean(axis=1)  # frames c1 + 1 .. j_hi
        away = np.maximum.accumulate(mse)  # away[k]: the largest MSE of frames c1 + 1 .. c1 + 1 + k
        ks = np.arange(max(1, j_lo - c1 - 1), j_hi - c1)  # frame j = c1 + 1 + k
        hits = ks[(mse[ks] < s.close_mse) & (away[ks - 1] > s.away_mse)]
        for k in hits.tolist():
            j = c1 + 1 + k
            if j not in best or mse[k] <= best[j][1]:  # ties: the latest view, before it left
                best[j] = (i, float(mse[k]), float(away[k - 1]))
    chosen: list[tuple[int, int, float, float]] = []
    for j, (i, mse_j, away_j) in sorted(best.items(), key=lambda kv: (kv[1][1], kv[0])):
        if all(abs(j - other[1]) >= max(1, s.min_gap // 2) for other in chosen):
            chosen.append((i, j, mse_j, away_j))
        if len(chosen) == s.pairs_per_episode:
            break
    return sorted(chosen, key=lambda p: p[1])


def find_return_pairs(
    frames: np.ndarray, episodes: Sequence[dict[str, Any]], settings: MemorySettings
) -> list[ReturnPair]:
    """Return pairs of a split: `frames` (N, H, W, C) uint8 (a memory map is fine), `episodes`
    its table ({offset, length} each). At most `pairs_per_episode` per episode; when more than
    `max_pairs` are found, `max_pairs` of them evenly spread over the episodes (the same every
    time)."""
    pairs = []
    for e, episode in enumerate(episodes):
        offset, length = int(episode["offset"]), int(episode["length"])
        if length < settings.context_after + settings.min_gap + 1:
            continue
        for i, j, mse, away in episode_returns(frames[offset : offset + length], settings):
            c1 = i + settings.context_after
            c0 = c1 - settings.context_frames + 1
            pairs.append(ReturnPair(e, offset, i, j, c0, c1, mse, away))
    if len(pairs) > settings.max_pairs:
        keep = np.unique(np.linspace(0, len(pairs) - 1, settings.max_pairs).round().astype(int))
        pairs = [pairs[k] for k in keep]
    return pairs


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def _video(frames: np.ndarray) -> Tensor:
    """uint8 frames (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(frames))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _pooled(mse: Tensor, clusters: np.ndarray) -> tuple[float, float]:
    """PSNR of the mean of per-pair MSEs (N,) and its standard error clustered by episode (the
    delta method: d PSNR = 10 / ln 10 * d MSE / MSE)."""
    mean = float(mse.double().mean())
    stderr = float(M.clustered_stderr(mse.double(), clusters))
    return float(M.psnr_from_mse(mean)), 10.0 / math.log(10.0) * stderr / max(mean, M.MSE_FLOOR)


# A generator of return frames: the pairs of a batch -> their generated frames j, (B, C, H, W)
# in [-1, 1]; optionally also the tokenizer's reconstruction of the real frames j.
Generate = Callable[[list[ReturnPair]], tuple[Tensor, Tensor | None]]


@torch.no_grad()
def score_returns(
    pairs: list[ReturnPair], frames: np.ndarray, generate: Generate, batch_size: int = 16
) -> dict[str, Any]:
    """Memory metrics of return pairs (`memory_*`, see the module) for a generator of frames j.

    `frames` is the split's uint8 frame array; pairs are generated in batches of `batch_size`
    in the order of their gaps (a batch rolls out to its longest gap). Copying frame i and
    copying the last real frame c1 are scored on the same pairs. With no pair, only
    `memory_pairs` = 0 and `memory_episodes` = 0.
    """
    if not pairs:
        return {"memory_pairs": 0, "memory_episodes": 0}
    order = sorted(range(len(pairs)), key=lambda k: (pairs[k].gap, k))
    mse: dict[str, list[Tensor]] = {"model": [], "copy_old": [], "copy_last": [], "tokenizer": []}
    ssim: dict[str, list[Tensor]] = {"model": [], "copy_old": [], "copy_last": []}
    ordered = [pairs[k] for k in order]
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        real = _video(frames[[p.offset + p.j for p in batch]])  # (B, C, H, W)
        old = _video(frames[[p.offset + p.i for p in batch]])
        last = _video(frames[[p.offset + p.c1 for p in batch]])
        generated, recon = generate(batch)
        generated = generated.float().cpu()
        for name, pred in (("model", generated), ("copy_old", old), ("copy_last", last)):
            mse[name].append(M.frame_mse(pred, real))
            ssim[name].append(M.ssim(pred, real, reduction="none"))
        if recon is not None:
            mse["tokenizer"].append(M.frame_mse(recon.float().cpu(), real))
    clusters = np.array([p.episode for p in ordered])
    out: dict[str, Any] = {
        "memory_pairs": len(pairs),
        "memory_episodes": len(np.unique(clusters)),
        "memory_gap_mean": float(np.mean([p.gap for p in ordered])),
        "memory_return_mse_mean": float(np.mean([p.mse for p in ordered])),
    }
    names = {"model": "memory", "copy_old": "memory_copy_old", "copy_last": "memory_copy_last"}
    for key, name in names.items():
        errors = torch.cat(mse[key])  # (N,)
        out[f"{name}_psnr"], out[f"{name}_psnr_stderr"] = _pooled(errors, clusters)
        values = torch.cat(ssim[key]).double()
        out[f"{name}_ssim"] = float(values.mean())
        out[f"{name}_ssim_stderr"] = float(M.clustered_stderr(values, clusters))
    if mse["tokenizer"]:
        out["memory_tokenizer_psnr"] = _pooled(torch.cat(mse["tokenizer"]), clusters)[0]
    return out


def world_generator(
    world: World,
    tokens: np.ndarray,
    actions: np.ndarray,
    frames: np.ndarray,
    sample: dict[str, Any],
) -> Generate:
    """Frames j generated by `world` for return pairs: the real token frames c0..c1 (from the
    split's per-frame `tokens`, or latents the world model quantizes itself), the conditioning
    `actions` of the split from c0 on (actions[t] leads from frame t to t + 1; those after
    frame j - 1 are unused by a causal rollout and set to 0), a rollout to the batch's longest
    gap through `world.dynamics.rollout`, decoded after the last real frame c1, and frame j of
    each pair. Also the tokenizer's reconstruction of the real frames j (decoded after frame
    j - 1, as the evaluation's teacher-forced frames are)."""
    model = world.dynamics

    def token_frames(index: np.ndarray) -> Tensor:
        """Token grids of the split's frames `index` (N, L): N clips of L consecutive frames ->
        (N, L, h, w) long. A model with codes of its own encodes each clip whole, as it was
        trained (its encoder may read the frame before, e.g. TECO's or a causal conv)."""
        raw = torch.from_numpy(np.asarray(tokens[index.reshape(-1)]))
        if model.inputs == "latents":  # (N L, h, w, D) continuous: the model's own codes
            clips = raw.float().to(world.device).unflatten(0, index.shape)  # (N, L, h, w, D)
            with autocast(world.device, world.bf16):
                return model.encode(clips)  # (N, L, h, w)
        codes = raw.long().to(world.device)  # (N L, h, w)
        return codes.reshape(*index.shape, *codes.shape[-2:])

    def generate(batch: list[ReturnPair]) -> tuple[Tensor, Tensor]:
        horizon = max(p.gap for p in batch)
        length = batch[0].c1 - batch[0].c0 + 1  # context frames, the same for every pair
        first = np.array([p.offset + p.c0 for p in batch])  # (B,)
        context = token_frames(first[:, None] + np.arange(length))  # (B, L, h, w)
        steps = length + horizon - 1  # actions a rollout of `horizon` frames reads
        acts = np.zeros((len(batch), steps), dtype=np.int64)  # (B, L + H - 1)
        for b, p in enumerate(batch):
            n = p.j - p.c0  # actions c0 .. j - 1
            acts[b, :n] = np.asarray(actions[p.offset + p.c0 : p.offset + p.j])
        if (acts < 0).any():
            raise ValueError("a return pair's context or rollout has an unknown (-1) action")
        last = _video(frames[[p.offset + p.c1 for p in batch]]).to(world.device)  # (B, C, H, W)
        with autocast(world.device, world.bf16):
            new = model.rollout(
                context, torch.from_numpy(acts).to(world.device), horizon, **sample
            )  # (B, H, h, w)
        video = world.decode_after(context, new, last)  # (B, C, H, H_px, W_px)
        picks = torch.tensor([p.gap - 1 for p in batch], device=video.device)
        generated = video[torch.arange(len(batch), device=video.device), :, picks]  # (B, C, ...)
        ends = np.array([p.offset + p.j for p in batch])
        real_tokens = token_frames(ends[:, None] + np.arange(-1, 1))[:, 1:]  # (B, 1, h, w)
        before = _video(frames[ends - 1]).to(world.device)[:, :, None]  # (B, C, 1, H, W)
        recon = world.decode_teacher_forced(real_tokens, before)[:, :, 0]
        return generated, recon

    return generate


def _unsupported(world: World, what: str) -> str | None:
    """Why `world` cannot take the memory test or long rollouts (None: it can)."""
    if world.frames_per_latent != 1:
        return f"{what} needs per-frame tokens; this tokenizer compresses time"
    if world.dynamics.conditioning != "actions":
        return f"{what} drives a world with one action a frame; this one reads text"
    return None


@torch.no_grad()
def evaluate_memory(
    world: World, cfg: DictConfig, sample: dict[str, Any], pairs_out: list | None = None
) -> dict[str, Any]:
    """The memory test of `world` on the split `cfg.eval.split` of `cfg.data` (`memory_*`
    metrics, see `score_returns`); empty, with the reason logged, for a world it does not fit.
    `sample` is the MaskGIT sampling of the evaluation (steps, temperature, generator);
    `pairs_out`, when given, receives the pairs scored."""
    why = _unsupported(world, "the memory test")
    if why is None and int(cfg.data.get("frame_stride", 1)) != 1:
        why = "the memory test reads consecutive recorded frames; data.frame_stride != 1"
    if why is not None:
        log.info("memory test not reported: %s", why)
        return {}
    settings = MemorySettings.from_config(cfg.eval.get("memory"))
    pixels = pixel_val(cfg.data, str(cfg.eval.get("split", "val")))
    tokens = token_val(world, pixels)
    frames = np.load(pixels.frames_path, mmap_mode="r")
    pairs = find_return_pairs(frames, pixels.episodes, settings)
    if pairs_out is not None:
        pairs_out.extend(pairs)
    if not pairs:
        log.warning(
            "memory test: no return pair in the %s split (%d episodes)",
            pixels.split,
            pixels.num_episodes,
        )
    generate = world_generator(
        world,
        np.load(tokens.frames_path, mmap_mode="r"),
        np.load(tokens.actions_path, mmap_mode="r"),
        frames,
        sample,
    )
    metrics = score_returns(pairs, frames, generate, int(cfg.eval.batch_size))
    log.info(
        "memory test: %d pairs from %d episodes, PSNR %.2f (copy frame i %.2f, copy last %.2f)",
        metrics["memory_pairs"],
        metrics["memory_episodes"],
        metrics.get("memory_psnr", float("nan")),
        metrics.get("memory_copy_old_psnr", float("nan")),
        metrics.get("memory_copy_last_psnr", float("nan")),
    )
    return metrics


# ------------------------------------------------------------------------------------------------
# Long rollouts
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def long_rollouts(world: World, cfg: DictConfig, sample: dict[str, Any]) -> dict[str, Any]:
    """Rollouts of `eval.long_horizon` frames after `eval.context_frames` real frames, on up to
    `eval.long_clips` clips (evenly spread) of the split: `rollout_psnr_changing_long` and
    `copy_psnr_changing_long` (the last context frame repeated), PSNR of the pooled MSE on the
    frames that change per horizon, with `changing_fraction_long_curve`, `long_clips` and
    `long_episodes`. Empty, with the reason logged, for a world it does not fit."""
    why = _unsupported(world, "eval.long_horizon")
    if why is not None:
        log.info("long rollouts not reported: %s", why)
        return {}
    horizon = int(cfg.eval.long_horizon)
    context = int(cfg.eval.get("context_frames", 1))
    data = copy.deepcopy(cfg.data)
    data.clip_length = context + horizon
    try:
        pixels = pixel_val(data, str(cfg.eval.get("split", "val")))
    except ValueError as e:
        raise ValueError(f"eval.long_horizon={horizon} after {context} real frame(s): {e}") from e
    tokens = token_val(world, pixels)
    subset = val_subset(pixels, int(cfg.eval.get("long_clips", 64)))
    indices = list(subset.indices)
    episodes = clip_episodes(pixels, indices)
    model = world.dynamics
    rows = []
    for start in range(0, len(indices), int(cfg.eval.batch_size)):
        chunk = indices[start : start + int(cfg.eval.batch_size)]
        items = [{**tokens[k], "video": pixels[k]["video"]} for k in chunk]
        batch = {key: torch.stack([it[key] for it in items]).to(world.device) for key in items[0]}
        if "latents" in batch:  # a model with its own quantizer over the tokenizer's latents
            batch["tokens"] = model.encode(batch["latents"])  # (B, T, h, w)
        video = batch["video"]  # (B, C, T, H, W)
        with autocast(world.device, world.bf16):
            new = model.rollout(
                batch["tokens"][:, :context], batch["actions"], horizon, **sample
            )  # (B, horizon, h, w)
        fake = world.decode_after(batch["tokens"][:, :context], new, video[:, :, context - 1])
        rows.append(to_cpu(M.rollout_errors(fake, video, context)))
    summary = M.rollout_psnr_summary(concat_rows(rows))
    return {
        "rollout_psnr_changing_long": summary["model_psnr_curve"],
        "copy_psnr_changing_long": summary["copy_context_psnr_curve"],
        "changing_fraction_long_curve": summary["changing_fraction_curve"],
        "long_context_frames": context,
        "long_clips": len(indices),
        "long_episodes": len(np.unique(episodes)),
    }
