"""Building models from configs, and models from checkpoints (with their frozen parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldmodel.config import instantiate
from worldmodel.train import checkpoint as ckpt


def build_model(model_cfg: DictConfig) -> nn.Module:
    """The model a `model` config describes; a model that re-samples with a frozen generator
    (`model.pipeline.generator_checkpoint`, e.g. Phenaki's token critic) gets it loaded."""
    model = instantiate(model_cfg)
    pipeline = model_cfg.get("pipeline") or {}
    generator = pipeline.get("generator_checkpoint")
    if generator:
        model.set_generator(load_model(generator)[0])
    return model


def load_model(
    path: str | Path, use_ema: bool = True, device: torch.device | str | None = None
) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """A model rebuilt from the config stored in its checkpoint, with (EMA) weights loaded, in
    eval mode on `device` (the CPU by default)."""
    state = ckpt.load(path)
    config = state.get("config")
    if not config or "model" not in config:
        raise ckpt.CheckpointError(f"{path} holds no stored config; cannot rebuild its model")
    cfg = OmegaConf.create(config)
    model = build_model(cfg.model)
    ckpt.check_compatible(state, model, str(path))
    model.load_state_dict(state["model"])
    if use_ema and state.get("ema"):
        model.load_state_dict(state["ema"], strict=False)
    model.eval()
    if device is not None:
        model.to(device)
    return model, cfg, state
