"""`task=train`: train a model, then (with `eval.after_train`) evaluate its last checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from worldmodel.eval.runner import evaluate
from worldmodel.train.logging import log_eval
from worldmodel.train.loop import train


def train_task(cfg: DictConfig) -> float | None:
    """Train `cfg.model`; returns the last validation loss (for sweeps)."""
    val_loss = train(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.pt"
    # One process evaluates: under torchrun every rank returns here.
    if cfg.eval.get("after_train") and last.exists() and os.environ.get("RANK", "0") == "0":
        with open_dict(cfg):
            cfg.checkpoint = str(last)
        log_eval(cfg, evaluate(cfg), cfg.run_dir)  # an eval run beside the training run
    return val_loss
