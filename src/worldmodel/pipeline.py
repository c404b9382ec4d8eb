"""The Genie pipeline around the dynamics model: frozen tokenizer and LAM, tokens cached once.

The dynamics model trains on tokens, not pixels. `token_datasets` loads the frozen tokenizer and
(for `action_source=latent`) the latent action model named in `model.pipeline`, checks them
against what the dynamics config needs (vocabulary, token grid, number of actions), and
tokenizes every frame of a split once into a cache beside the frames. Training then reads token
clips with the same clip enumeration as the pixel clips. With `model.pipeline.inputs: latents`
(a model with its own quantizer, e.g. genie2) the cache holds the tokenizer's continuous
pre-quantization latents per frame instead, and clips carry `latents` (T, h, w, D).
A tokenizer that compresses time (`temporal_downsample` > 1: C-ViViT, VideoGPT's VQ-VAE) is run
on whole clips instead: each pixel clip is tokenized once into (T', h, w) tokens, with actions
aligned to latent frames (see `ClipwiseTokenDataset`).

`run_stages` runs several training stages in one command (`task=pipeline`): each stage is a
config composed from the stage's overrides, trained in a sub-folder of the run dir; later stages
refer to earlier stages' checkpoints as `@NAME` (e.g.
`model.pipeline.tokenizer_checkpoint=@tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from worldmodel.build import load_model
from worldmodel.data.dataset import ClipDataset

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class PipelineError(ValueError):
    """Frozen parts that do not fit the model that needs them; the message names the values."""


def _file_key(path: str | Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def action_source(pipeline: DictConfig) -> str:
    """`latent` or `true`; YAML and the command line read a bare `true` as a boolean."""
    source = pipeline.get("action_source", "latent")
    source = {True: "true", False: "latent"}.get(source, source)
    if source not in ("latent", "true"):
        raise PipelineError(f"model.pipeline.action_source={source!r}: expected latent or true")
    return source


def pipeline_inputs(pipeline: DictConfig) -> str:
    """What the model reads: `tokens` (the tokenizer's code ids) or `latents` (its continuous
    pre-quantization latents per frame, for a model with its own quantizer, e.g. genie2)."""
    inputs = pipeline.get("inputs", "tokens")
    if inputs not in INPUTS:
        raise PipelineError(f"model.pipeline.inputs={inputs!r}: expected one of {sorted(INPUTS)}")
    return inputs


def load_frozen(path: str | None, role: str, key: str) -> tuple[nn.Module, DictConfig]:
    if not path:
        raise PipelineError(f"{key} is not set: the dynamics model needs a trained {role}")
    model, cfg, _ = load_model(path)
    model.requires_grad_(False)
    return model, cfg


def check_parts(
    dyn: DictConfig,
    tokenizer: nn.Module,
    tok_cfg: DictConfig,
    frame_hw: tuple[int, int],
    num_actions: int | None,
    source: str,
    inputs: str = "tokens",
    clip_length: int | None = None,
) -> None:
    """The dynamics config must match the frozen tokenizer and the action source (and, for a
    tokenizer that compresses time, the pixel clips must split into its latent frames)."""
    errors = []
    if inputs == "latents":
        if int(dyn.latent_dim) != int(tokenizer.quantizer.dim):
            errors.append(
                f"model.latent_dim={dyn.latent_dim} but the tokenizer's latents have "
                f"{tokenizer.quantizer.dim} channels"
            )
    elif int(dyn.vocab_size) != int(tokenizer.codebook_size):
        errors.append(
            f"model.vocab_size={dyn.vocab_size} but the tokenizer has "
            f"{tokenizer.codebook_size} codes"
        )
    s = int(tok_cfg.model.spatial_downsample)
    grid = [frame_hw[0] // s, frame_hw[1] // s]
    if list(dyn.grid) != grid:
        errors.append(
            f"model.grid={list(dyn.grid)} but the tokenizer makes {grid} tokens per "
            f"{frame_hw[0]}x{frame_hw[1]} frame"
        )
    if clip_length is not None and compresses_time(tokenizer):
        if inputs != "tokens":
            errors.append(
                f"model.pipeline.inputs={inputs} needs a per-frame tokenizer, but this one "
                f"compresses time (temporal_downsample={tokenizer.temporal_downsample})"
            )
        try:
            tokenizer.latent_shape(clip_length, *frame_hw)
        except ValueError as e:
            errors.append(f"data.clip_length={clip_length} does not fit the tokenizer: {e}")
    if num_actions is None:
        errors.append(f"action_source={source} but the data has no actions")
    elif int(dyn.num_actions) != int(num_actions):
        errors.append(
            f"model.num_actions={dyn.num_actions} but the {source} actions have "
            f"{num_actions} values"
        )
    if errors:
        raise PipelineError(
            "the dynamics model does not fit its frozen parts:\n  - " + "\n  - ".join(errors)
        )


@torch.no_grad()
def tokenize_frames(tokenizer: nn.Module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Token grids (N, h, w) of uint8 frames (N, H, W, C), each frame encoded alone."""
    out = []
    for i in tqdm(range(0, len(frames), batch), desc="tokenize", unit="batch", mininterval=2):
        x = torch.from_numpy(np.array(frames[i : i + batch]))  # (n, H, W, C) uint8
        video = x.permute(0, 3, 1, 2).unsqueeze(2).float().div(127.5).sub(1)  # (n, C, 1, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            idx = tokenizer.tokenize(video)  # (n, 1, h, w)
        out.append(idx[:, 0].to(torch.int32).numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_frames(tokenizer: nn.Module, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Continuous pre-quantization latents (N, h, w, D) float16 of uint8 frames (N, H, W, C),
    each frame encoded alone (fp32: these are the targets a model's own quantizer must hit)."""
    out = []
    for i in tqdm(range(0, len(frames), batch), desc="encode", unit="batch", mininterval=2):
        x = torch.from_numpy(np.array(frames[i : i + batch]))  # (n, H, W, C) uint8
        video = x.permute(0, 3, 1, 2).unsqueeze(2).float().div(127.5).sub(1)  # (n, C, 1, H, W)
        z = tokenizer.encode(video)[:, :, 0].float()  # (n, D, h, w)
        if not bool(torch.isfinite(z.half()).all()):
            raise PipelineError("the tokenizer's latents overflow float16; they cannot be cached")
        out.append(z.permute(0, 2, 3, 1).half().numpy())  # (n, h, w, D)
    return np.concatenate(out)


@torch.no_grad()
def latent_actions(
    lam: nn.Module,
    frames: np.ndarray,
    episodes: list[dict[str, Any]],
    window: int,
    batch: int = 32,
) -> np.ndarray:
    """The LAM's code for every transition i -> i+1 (N,), -1 at each episode's last frame.

    Episodes are cut into windows of `window` frames that overlap by one frame, so every
    transition is inferred once, with up to `window - 1` frames of past context.
    """
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
            video = x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)  # (n, C, T, H, W)
            codes = lam.infer_actions(video).numpy()  # (n, T-1)
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


def frames_per_latent(tokenizer: nn.Module) -> int:
    """Pixel frames per latent frame of a tokenizer: its `temporal_downsample`, else 1."""
    return int(getattr(tokenizer, "temporal_downsample", 1))


def compresses_time(tokenizer: nn.Module) -> bool:
    """A tokenizer whose latent frames each cover several pixel frames (`temporal_downsample` >
    1, e.g. C-ViViT or VideoGPT's VQ-VAE): the pipeline then tokenizes whole clips."""
    return frames_per_latent(tokenizer) > 1


@torch.no_grad()
def tokenize_clips(tokenizer: nn.Module, clips: ClipDataset, batch: int = 32) -> np.ndarray:
    """Token grids (N_clips, T', h, w) of every clip of `clips`, each clip encoded as one video
    (a tokenizer that compresses time gives different tokens for different clip starts)."""
    frames = np.load(clips.frames_path, mmap_mode="r")
    out = []
    for i in tqdm(range(0, len(clips), batch), desc="tokenize clips", mininterval=2):
        starts = clips.starts[i : i + batch]
        idx = starts[:, None] + clips.frame_stride * np.arange(clips.clip_length)  # (n, T)
        x = torch.from_numpy(np.array(frames[idx.reshape(-1)]))  # (n T, H, W, C) uint8
        x = rearrange(x, "(n t) h w c -> n c t h w", n=len(starts))  # (n, C, T, H, W)
        video = x.float().div(127.5).sub(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(tokenizer.tokenize(video).to(torch.int32).numpy())  # (n, T', h, w)
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


# model.pipeline.inputs -> (how frames are cached, the clip dataset over that cache)
INPUTS = {
    "tokens": (tokenize_frames, TokenClipDataset),
    "latents": (encode_frames, LatentClipDataset),
}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def token_datasets(cfg: DictConfig, train: ClipDataset, val: ClipDataset) -> tuple[Any, Any]:
    """Token clip datasets for a dynamics run, tokenizing each split once into a cache."""
    p = cfg.model.pipeline
    source = action_source(p)
    tokenizer, tok_cfg = load_frozen(
        p.tokenizer_checkpoint, "tokenizer", "model.pipeline.tokenizer_checkpoint"
    )
    lam = lam_cfg = None
    if source == "latent":
        lam, lam_cfg = load_frozen(
            p.lam_checkpoint, "latent action model", "model.pipeline.lam_checkpoint"
        )
        num_actions = int(lam.num_actions)
    else:
        num_actions = train.num_actions
    inputs = pipeline_inputs(p)
    check_parts(
        cfg.model,
        tokenizer,
        tok_cfg,
        train.resolution,
        num_actions,
        source,
        inputs,
        train.clip_length,
    )
    clipwise = compresses_time(tokenizer)
    key = json.dumps(
        [
            CACHE_VERSION,
            _file_key(p.tokenizer_checkpoint),
            source,
            _file_key(p.lam_checkpoint) if lam is not None else None,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    encode, dataset = INPUTS[inputs]
    out = []
    for clips in (train, val):
        folder = clips.folder / f"{inputs}-{digest}"
        tokens_path = folder / f"{clips.split}_{inputs}.npy"
        if clipwise:  # one token clip per pixel clip: the name records the clip enumeration
            enum = f"{clips.clip_length}x{clips.frame_stride}s{clips.clip_stride}"
            tokens_path = folder / f"{clips.split}_clips{enum}_{inputs}.npy"
        actions_path = folder / f"{clips.split}_{source}_actions.npy"
        if not (tokens_path.exists() and actions_path.exists()):
            folder.mkdir(exist_ok=True)
            frames = np.load(clips.frames_path, mmap_mode="r")
            log.info("tokenizing %d %s frames into %s", len(frames), clips.split, folder)
            if clipwise:
                _save_npy(tokens_path, tokenize_clips(tokenizer, clips))
            else:
                _save_npy(tokens_path, encode(tokenizer, frames))
            if lam is not None:
                window = min(int(lam_cfg.data.clip_length), int(lam_cfg.model.max_frames))
                acts = latent_actions(lam, frames, clips.episodes, window)
            else:
                acts = np.load(clips.actions_path)
            _save_npy(actions_path, acts)  # written last: its presence marks the cache complete
        if clipwise:
            k = int(tokenizer.temporal_downsample)
            out.append(ClipwiseTokenDataset(clips, tokens_path, actions_path, k))
        else:
            out.append(dataset(clips, tokens_path, actions_path))
    return out[0], out[1]
