"""Shared test set-up: configs composed through Hydra's compose API, one data cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from worldmodel.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Recorded data (CoinRun clips, decoded videos) is cached once for the whole session, in a folder
# of its own, so the suite never touches a user's cache.
os.environ.setdefault(
    "WORLDMODEL_DATA",
    str(Path(os.environ.get("TMPDIR", "/tmp")) / f"worldmodel-test-data-{os.getuid()}"),
)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The run config `python run.py <overrides>` would get, with run_dir set (no Hydra run)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir is not None else "unused"
    return cfg


def logged_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of one logged scalar in a run folder's metrics.jsonl."""
    return {r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r}


@pytest.fixture
def compose_cfg():
    return compose_config
