"""Dispatch of `task=train|eval|play` to the code that does it."""

from __future__ import annotations

from omegaconf import DictConfig


def run_task(cfg: DictConfig) -> float | None:
    """Run the task the config names; returns a scalar for sweeps (final val loss) when training."""
    if cfg.task == "train":
        from worldmodel.train.loop import train

        return train(cfg)
    if cfg.task == "eval":
        from worldmodel.eval.runner import evaluate

        evaluate(cfg)
        return None
    from worldmodel.play import play

    play(cfg)
    return None
