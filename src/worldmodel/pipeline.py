"""The Genie pipeline around a world model: its frozen tokenizer and LAM, and its token clips.

A world model trains on tokens, not pixels. `token_datasets` loads the frozen tokenizer and (for
`action_source=latent`) the latent action model named in `model.pipeline`, checks them against
what the world-model config needs (vocabulary, token grid, number of actions, causality), and
hands them to `worldmodel.data.tokens.token_cache`, which tokenizes every split once into a
locked cache beside the frames. With `model.pipeline.inputs: latents` (a model with its own
quantizer, e.g. genie2) the cache holds the tokenizer's continuous latents per frame. A tokenizer
that compresses time (`temporal_downsample` > 1: C-ViViT) is run on whole clips, and must be
causal. `build_datasets(cfg)` gives any run its (train, val) datasets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.data.dataset import ClipDataset
from worldmodel.data.tokens import CACHE_VERSION, token_cache
from worldmodel.models.interfaces import Tokenizer

log = logging.getLogger(__name__)
INPUTS = ("tokens", "latents")  # model.pipeline.inputs: what the world model's clips hold


class PipelineError(ValueError):
    """Frozen parts that do not fit the model that needs them; the message names the values."""


def file_key(path: str | Path) -> str:
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
        raise PipelineError(f"model.pipeline.inputs={inputs!r}: expected one of {INPUTS}")
    return inputs


def load_frozen(
    path: str | None, role: str, key: str, device: torch.device | None = None
) -> tuple[nn.Module, DictConfig]:
    """A frozen part (eval mode, no gradients) from its checkpoint, on `device`."""
    if not path:
        raise PipelineError(f"{key} is not set: the dynamics model needs a trained {role}")
    model, cfg, _ = load_model(path, device=device)
    model.requires_grad_(False)
    return model, cfg


def check_parts(
    dyn: DictConfig,
    tokenizer: Tokenizer,
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
    s = int(tokenizer.spatial_downsample)
    grid = [frame_hw[0] // s, frame_hw[1] // s]
    if list(dyn.grid) != grid:
        errors.append(
            f"model.grid={list(dyn.grid)} but the tokenizer makes {grid} tokens per "
            f"{frame_hw[0]}x{frame_hw[1]} frame"
        )
    if clip_length is not None and compresses_time(tokenizer):
        if not tokenizer.causal:
            errors.append(
                f"the tokenizer ({type(tokenizer).__name__}, temporal_downsample="
                f"{tokenizer.temporal_downsample}) is not causal: its first latent frame encodes "
                "the frames after it, so a world model's context would hold its targets; use a "
                "causal tokenizer or its temporal_downsample=1"
            )
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


def frames_per_latent(tokenizer: Tokenizer) -> int:
    """Pixel frames per latent frame of a tokenizer (its `temporal_downsample`)."""
    return int(tokenizer.temporal_downsample)


def compresses_time(tokenizer: Tokenizer) -> bool:
    """A tokenizer whose latent frames each cover several pixel frames (`temporal_downsample` >
    1, e.g. C-ViViT or VideoGPT's VQ-VAE): the pipeline then tokenizes whole clips."""
    return frames_per_latent(tokenizer) > 1


def cache_key(p: DictConfig, with_lam: bool, lam_bf16: bool = False) -> str:
    """A digest of the frozen parts a token cache depends on (their files and the action source,
    and whether the LAM labels the frames under bf16)."""
    parts = [
        CACHE_VERSION,
        file_key(p.tokenizer_checkpoint),
        action_source(p),
        file_key(p.lam_checkpoint) if with_lam else None,
    ]
    if with_lam and lam_bf16:
        parts.append("lam-bf16")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def lam_runs_bf16(lam_cfg: DictConfig | None) -> bool:
    """Whether a frozen LAM labels frames under bf16 autocast: when it was trained in bf16."""
    if lam_cfg is None:
        return False
    return str((lam_cfg.get("trainer") or {}).get("precision", "fp32")) == "bf16"


def token_datasets(
    cfg: DictConfig, train: ClipDataset, val: ClipDataset, device: torch.device | None = None
) -> tuple[Any, Any]:
    """Token clip datasets for a world-model run, each split tokenized once into a cache (on
    `device`, the run's; the CPU by default)."""
    p = cfg.model.pipeline
    source = action_source(p)
    tokenizer, _ = load_frozen(
        p.tokenizer_checkpoint, "tokenizer", "model.pipeline.tokenizer_checkpoint", device
    )
    lam = lam_cfg = None
    if source == "latent":
        lam, lam_cfg = load_frozen(
            p.lam_checkpoint, "latent action model", "model.pipeline.lam_checkpoint", device
        )
        num_actions = int(lam.num_actions)
    else:
        num_actions = train.num_actions
    inputs = pipeline_inputs(p)
    check_parts(
        cfg.model,
        tokenizer,
        train.resolution,
        num_actions,
        source,
        inputs,
        train.clip_length,
    )
    window = 2
    if lam_cfg is not None:
        window = min(int(lam_cfg.data.clip_length), int(lam_cfg.model.max_frames))
    bf16 = lam_runs_bf16(lam_cfg)
    key = cache_key(p, lam is not None, bf16)
    out = [
        token_cache(clips, key, tokenizer, lam, window, inputs, frames_per_latent(tokenizer), bf16)
        for clips in (train, val)
    ]
    return out[0], out[1]


def build_datasets(cfg: DictConfig, device: torch.device | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) clip datasets of a run: pixel clips, or token clips for a model with a
    `pipeline` (its frozen parts run on `device`)."""
    train, val = instantiate(cfg.data).datasets()
    if cfg.model.get("pipeline") is not None:
        train, val = token_datasets(cfg, train, val, device)
    return train, val
