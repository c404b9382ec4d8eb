"""Dispatch of `task=train|eval|play|pipeline|check` to the code that does it (the top layer)."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from worldmodel.eval.runner import evaluate
from worldmodel.play import play
from worldmodel.tasks.pipeline import check_task, run_stages
from worldmodel.tasks.train import train_task
from worldmodel.train.logging import log_eval, name_wandb_run


def _eval(cfg: DictConfig) -> None:
    log_eval(cfg, evaluate(cfg), cfg.run_dir)


def _pipeline(cfg: DictConfig) -> None:
    run_stages(cfg)


TASKS: dict[str, Callable[[DictConfig], float | None]] = {
    "train": train_task,
    "eval": _eval,
    "play": play,
    "pipeline": _pipeline,
    "check": check_task,
}


def run_task(cfg: DictConfig) -> float | None:
    """Run the task the config names; training returns the last validation loss (for sweeps)."""
    name_wandb_run(cfg)  # a sweep's runs are grouped by its folder
    return TASKS[str(cfg.task)](cfg)
