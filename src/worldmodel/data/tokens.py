"""Token caches: every frame (or clip) of a split tokenized once by a frozen tokenizer.

World models train on tokens, not pixels. `token_cache` is the one entry point: it tokenizes a
split's frames with the frozen tokenizer (each frame alone; whole clips for a tokenizer that
compresses time), labels every transition with the frozen latent action model's code or the
recorded action, writes both next to the frames, and returns the clip dataset over them. It is
locked like the frame shards: the first process (rank 0, or whichever comes first) builds the
cache while the others wait on the lock and then read what it wrote; the actions file, written
last, marks a cache complete. Models are passed in already loaded: this layer never loads them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn
from tqdm import tqdm

from worldmodel.data.dataset import ClipDataset
from worldmodel.data.shards import _locked
from worldmodel.runtime import autocast

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class TokenCacheError(ValueError):
    """Frames that cannot be cached as the world model needs them."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _video(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 frames (n, C, T, H, W) -> float video in [-1, 1] on `device`."""
    return x.to(device).float().div(127.5).sub(1)


@torch.no_grad()
def tokenize_frames(tokenizer: nn.Module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Token grids (N, h, w) of uint8 frames (N, H, W, C), each frame encoded alone."""
    device = _device(tokenizer)
    out = []
    for i in tqdm(range(0, len(frames), batch), desc="tokenize", unit="batch", mininterval=2):
        x = torch.from_numpy(np.array(frames[i : i + batch]))  # (n, H, W, C) uint8
        video = _video(x.permute(0, 3, 1, 2).unsqueeze(2), device)  # (n, C, 1, H, W)
        with autocast(device):
            idx = tokenizer.tokenize(video)  # (n, 1, h, w)
        out.append(idx[:, 0].to(torch.int32).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_frames(tokenizer: nn.Module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Continuous pre-quantization latents (N, h, w, D) float16 of uint8 frames (N, H, W, C),
    each frame encoded alone (fp32: these are the targets a model's own quantizer must hit)."""
    device = _device(tokenizer)
    out = []
    for i in tqdm(range(0, len(frames), batch), desc="encode", unit="batch", mininterval=2):
        x = torch.from_numpy(np.array(frames[i : i + batch]))  # (n, H, W, C) uint8
        video = _video(x.permute(0, 3, 1, 2).unsqueeze(2), device)  # (n, C, 1, H, W)
        z = tokenizer.encode(video)[:, :, 0].float().cpu()  # (n, D, h, w)
        if not bool(torch.isfinite(z.half()).all()):
            raise TokenCacheError("the tokenizer's latents overflow float16; they cannot be cached")
        out.append(z.permute(0, 2, 3, 1).half().numpy())  # (n, h, w, D)
    return np.concatenate(out)


@torch.no_grad()
def latent_actions(
    lam: nn.Module,
    frames: np.ndarray,
    episodes: list[dict[str, Any]],
    window: int,
    batch: int = 32,
    bf16: bool = False,
) -> np.ndarray:
    """The LAM's code for every transition i -> i+1 (N,), -1 at each episode's last frame.

    Episodes are cut into windows of `window` frames that overlap by one frame, so every
    transition is inferred once, with up to `window - 1` frames of past context. `bf16` runs
    the LAM under bf16 autocast (for a LAM trained in bf16: ~1.4x faster on a CPU).
    """
    device = _device(lam)
    actions = np.full(len(frames), -1, dtype=np.int64)
    starts = []
    for ep in episodes:
        off, n = int(ep["offset"]), int(ep["length"])
        if n < 2:
            continue
        w = min(window, n)
        s = 0
        while True:
            s = min(s, n - w)
            starts.append((off + s, w))
            if s + w >= n:
                break
            s += w - 1
    for i in tqdm(range(0, len(starts), batch), desc="latent actions", mininterval=2):
        group = starts[i : i + batch]
        by_len: dict[int, list[int]] = {}
        for start, w in group:
            by_len.setdefault(w, []).append(start)
        for w, firsts in by_len.items():
            idx = np.asarray(firsts)[:, None] + np.arange(w)  # (n, w)
            x = torch.from_numpy(np.array(frames[idx.reshape(-1)]))
            x = x.reshape(len(firsts), w, *x.shape[1:])  # (n, T, H, W, C)
            video = _video(x.permute(0, 4, 1, 2, 3), device)  # (n, C, T, H, W)
            with autocast(device, bf16):
                codes = lam.infer_actions(video).cpu().numpy()  # (n, T-1)
            for row, first in zip(codes, firsts):
                actions[first : first + w - 1] = row
    return actions


class TokenClipDataset(ClipDataset):
    """Clips of token grids: `{"tokens": (T, h, w) long, "actions": (T,) long, "mask"}`."""

    def __init__(self, clips: ClipDataset, tokens_path: Path, actions_path: Path) -> None:
        super().__init__(
            clips.folder, clips.split, clips.clip_length, clips.frame_stride, clips.clip_stride
        )
        self.frames_path, self.actions_path = tokens_path, actions_path

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, actions = self._open()
        idx = self._indices(index)
        return {
            "tokens": torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)),
            "actions": torch.from_numpy(np.asarray(actions[idx], dtype=np.int64)),
            "mask": torch.ones(self.clip_length, dtype=torch.bool),
        }


class LatentClipDataset(TokenClipDataset):
    """Clips of frame latents: `{"latents": (T, h, w, D) float, "actions": (T,) long, "mask"}`."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        latents, actions = self._open()
        idx = self._indices(index)
        return {
            "latents": torch.from_numpy(np.asarray(latents[idx], dtype=np.float32)),
            "actions": torch.from_numpy(np.asarray(actions[idx], dtype=np.int64)),
            "mask": torch.ones(self.clip_length, dtype=torch.bool),
        }


@torch.no_grad()
def tokenize_clips(tokenizer: nn.Module, clips: ClipDataset, batch: int = 32) -> np.ndarray:
    """Token grids (N_clips, T', h, w) of every clip of `clips`, each clip encoded as one video
    (a tokenizer that compresses time gives different tokens for different clip starts)."""
    frames = np.load(clips.frames_path, mmap_mode="r")
    device = _device(tokenizer)
    out = []
    for i in tqdm(range(0, len(clips), batch), desc="tokenize clips", mininterval=2):
        starts = clips.starts[i : i + batch]
        idx = starts[:, None] + clips.frame_stride * np.arange(clips.clip_length)  # (n, T)
        x = torch.from_numpy(np.array(frames[idx.reshape(-1)]))  # (n T, H, W, C) uint8
        x = rearrange(x, "(n t) h w c -> n c t h w", n=len(starts))  # (n, C, T, H, W)
        with autocast(device):
            out.append(tokenizer.tokenize(_video(x, device)).to(torch.int32).cpu().numpy())
    if not out:
        return np.zeros((0, 0, 0, 0), dtype=np.int32)
    return np.concatenate(out)


class ClipwiseTokenDataset(TokenClipDataset):
    """Token clips of a tokenizer that compresses time: `{"tokens": (T', h, w), "actions": (T',),
    "mask": (T',)}` from a cache of one token clip per pixel clip (same enumeration).

    Actions are aligned to latent frames: `actions[j]` is the recorded (or latent) action at the
    LAST pixel frame of latent frame j, i.e. the one that leads out of it into latent frame j + 1
    (the dataset's per-frame rule, `actions[t]` leads from frame t to t + 1). The last frames of
    the latent frames are counted back from the clip's last frame in steps of k =
    temporal_downsample: frames 0, k, 2k, .. for a causal tokenizer (first frame alone: C-ViViT),
    k - 1, 2k - 1, .. for one that encodes whole groups (VideoGPT). The other k - 1 actions
    inside a latent frame are not represented.
    """

    def __init__(
        self, clips: ClipDataset, tokens_path: Path, actions_path: Path, temporal_downsample: int
    ) -> None:
        super().__init__(clips, tokens_path, actions_path)
        self.temporal_downsample = temporal_downsample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, actions = self._open()
        frames = self._indices(index)  # (T,) pixel frame indices of the clip
        clip = np.asarray(tokens[index], dtype=np.int64)  # (T', h, w)
        steps = len(clip)
        last = self.clip_length - 1 - self.temporal_downsample * np.arange(steps)[::-1]  # (T',)
        idx = frames[last]  # the pixel frame that ends each latent frame
        return {
            "tokens": torch.from_numpy(clip),
            "actions": torch.from_numpy(np.asarray(actions[idx], dtype=np.int64)),
            "mask": torch.ones(steps, dtype=torch.bool),
        }


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def token_cache(
    clips: ClipDataset,
    key: str,
    tokenizer: nn.Module,
    lam: nn.Module | None = None,
    lam_window: int = 2,
    inputs: str = "tokens",
    frames_per_latent: int = 1,
    lam_bf16: bool = False,
) -> TokenClipDataset:
    """The token clip dataset of `clips`, tokenized once into `<cache>/<inputs>-<key>/`.

    `key` names the frozen parts (e.g. a digest of their checkpoints and the action source): a
    new tokenizer or LAM gets a new folder. `inputs` is "tokens" (code ids per frame) or
    "latents" (the tokenizer's continuous latents per frame). With `frames_per_latent` > 1 (a
    tokenizer that compresses time) every clip is tokenized as one video. Actions are the LAM's
    codes when `lam` is given (inferred under bf16 autocast with `lam_bf16`: the key must say
    so), else the recorded ones.
    """
    if inputs not in ("tokens", "latents"):
        raise ValueError(f"inputs={inputs!r}: expected tokens or latents")
    clipwise = frames_per_latent > 1
    if clipwise and inputs != "tokens":
        raise ValueError("a tokenizer that compresses time is cached as tokens of whole clips")
    source = "latent" if lam is not None else "true"
    folder = clips.folder / f"{inputs}-{key}"
    tokens_path = folder / f"{clips.split}_{inputs}.npy"
    if clipwise:  # one token clip per pixel clip: the name records the clip enumeration
        enum = f"{clips.clip_length}x{clips.frame_stride}s{clips.clip_stride}"
        tokens_path = folder / f"{clips.split}_clips{enum}_{inputs}.npy"
    actions_path = folder / f"{clips.split}_{source}_actions.npy"
    if not (tokens_path.exists() and actions_path.exists()):
        with _locked(folder.with_name(f".{folder.name}.lock")):
            # another process may have built it while this one waited for the lock
            if not (tokens_path.exists() and actions_path.exists()):
                _build(
                    clips,
                    tokenizer,
                    lam,
                    lam_window,
                    inputs,
                    clipwise,
                    tokens_path,
                    actions_path,
                    lam_bf16,
                )
    if clipwise:
        return ClipwiseTokenDataset(clips, tokens_path, actions_path, frames_per_latent)
    if inputs == "latents":
        return LatentClipDataset(clips, tokens_path, actions_path)
    return TokenClipDataset(clips, tokens_path, actions_path)


def _build(
    clips: ClipDataset,
    tokenizer: nn.Module,
    lam: nn.Module | None,
    lam_window: int,
    inputs: str,
    clipwise: bool,
    tokens_path: Path,
    actions_path: Path,
    lam_bf16: bool = False,
) -> None:
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.load(clips.frames_path, mmap_mode="r")
    log.info("tokenizing %d %s frames into %s", len(frames), clips.split, tokens_path.parent)
    if clipwise:
        _save_npy(tokens_path, tokenize_clips(tokenizer, clips))
    elif inputs == "latents":
        _save_npy(tokens_path, encode_frames(tokenizer, frames))
    else:
        _save_npy(tokens_path, tokenize_frames(tokenizer, frames))
    if lam is not None:
        acts = latent_actions(lam, frames, clips.episodes, lam_window, bf16=lam_bf16)
    else:
        acts = np.load(clips.actions_path)
    _save_npy(actions_path, acts)  # written last: its presence marks the cache complete
