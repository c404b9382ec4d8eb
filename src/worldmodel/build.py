"""Building models and datasets from configs, and models from checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from worldmodel.config import instantiate
from worldmodel.train import checkpoint as ckpt


def build_model(model_cfg: DictConfig) -> nn.Module:
    return instantiate(model_cfg)


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """(train, val) clip datasets for the run; dynamics runs read tokens through its pipeline."""
    source = instantiate(cfg.data)
    train, val = source.datasets()
    pipeline = cfg.model.get("pipeline")
    if pipeline is not None:
        from worldmodel.pipeline import token_datasets

        train, val = token_datasets(cfg, train, val)
    return train, val


def load_model(
    path: str | Path, use_ema: bool = True
) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """A model rebuilt from the config stored in its checkpoint, with (EMA) weights loaded."""
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
    return model, cfg, state
