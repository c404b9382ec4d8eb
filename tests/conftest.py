"""Shared test set-up: configs composed through Hydra's compose API, one data cache per session,
`run.py` in a subprocess, checkpoints of random models, the smoke recipes' frozen tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from worldmodel.config import instantiate
from worldmodel.train.checkpoint import atomic_save
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


def run_py(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python run.py <args>` from the repository root, W&B offline (`env` adds variables);
    with `check`, a failure raises with the tail of its stderr."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def save_checkpoint(
    model_cfg: dict, data_cfg: dict, path: Path, model: nn.Module | None = None
) -> Path:
    """A checkpoint in the project's format (model weights, step 0, resolved config) of `model`,
    or of a randomly initialised `model_cfg` model; returns `path`."""
    if model is None:
        model = instantiate(OmegaConf.create(model_cfg))
    atomic_save(
        {"model": model.state_dict(), "step": 0, "config": {"model": model_cfg, "data": data_cfg}},
        path,
    )
    return path


# The frozen tokenizer of the smoke_* world-model recipes (genie2, teco, muse, var): random
# weights saved as a real checkpoint; 64x64 frames -> 8x8 latents of D = 4 (1000 FSQ codes).
SMOKE_TOKENIZER = {
    "_target_": "worldmodel.models.tokenizer.VideoTokenizer",
    "name": "tokenizer",
    "channels": [8, 16],
    "spatial_downsample": 8,
    "num_res_blocks": 1,
    "num_mid_blocks": 1,
    "quantizer": {"kind": "fsq", "levels": [8, 5, 5, 5]},
}
SMOKE_DATA = [  # the tiny recording the world-model evaluation tests use too
    "data.train_frames=300",
    "data.val_frames=300",
    "data.num_envs=4",
    "data.train_num_levels=20",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
]


@pytest.fixture
def one_thread():
    """One thread: small models gain nothing from two, and a shared machine stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg():
    return compose_config
