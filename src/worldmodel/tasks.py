"""Dispatch of `task=train|eval|play` to the code that does it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, open_dict


def run_task(cfg: DictConfig) -> float | None:
    """Run the task the config names; training returns the last validation loss (for sweeps)."""
    if cfg.task == "train":
        from worldmodel.train.loop import train

        val_loss = train(cfg)
        last = Path(cfg.run_dir) / "checkpoints" / "last.pt"
        # One process evaluates: under torchrun every rank returns here.
        if cfg.eval.get("after_train") and last.exists() and os.environ.get("RANK", "0") == "0":
            from worldmodel.eval.runner import evaluate

            with open_dict(cfg):
                cfg.checkpoint = str(last)
            evaluate(cfg)
        return val_loss
    if cfg.task == "eval":
        from worldmodel.eval.runner import evaluate

        evaluate(cfg)
        return None
    if cfg.task == "pipeline":
        from worldmodel.pipeline import run_stages

        run_stages(cfg)
        return None
    from worldmodel.play import play

    play(cfg)
    return None
