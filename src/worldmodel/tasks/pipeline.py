"""`task=pipeline`: several training stages in one command (e.g. `experiment=demo`).

Each stage is a config composed from the recipe's `common` overrides, the stage's own overrides
and the command line's, trained (and evaluated) in a sub-folder of the run dir; later stages refer
to earlier stages' checkpoints as `@NAME` (e.g. `model.pipeline.tokenizer_checkpoint=@tokenizer`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from worldmodel.config import validate
from worldmodel.play import play
from worldmodel.tasks.train import train_task

log = logging.getLogger(__name__)


def _command_line_overrides() -> list[str]:
    """The user's overrides of this run, passed on to every stage (not the recipe's own)."""
    if not HydraConfig.initialized():
        return []
    skip = ("experiment=", "task=", "hydra.", "play.", "+play.", "++play.")
    return [o for o in HydraConfig.get().overrides.task if not o.startswith(skip)]


def run_stages(cfg: DictConfig) -> dict[str, str]:
    """Train each stage of `cfg.stages` in order; returns the stages' checkpoint paths.

    A stage's config is composed from `common`, the stage's own overrides and the command line's
    overrides (so `python run.py experiment=demo logger=none` reaches every stage). When
    `play.actions` is set, the last stage's model is played headless into `<run_dir>/play`.
    """
    run_dir = Path(cfg.run_dir)
    user = _command_line_overrides()
    done: dict[str, str] = {}
    for name, spec in cfg.stages.items():
        overrides = [str(o) for o in spec.overrides]
        for prev, path in done.items():
            overrides = [o.replace(f"=@{prev}", f"={path}") for o in overrides]
        overrides = [*cfg.get("common", []), *overrides, *user]
        stage_cfg = compose(config_name="config", overrides=overrides)
        with open_dict(stage_cfg):
            stage_cfg.run_dir = str(run_dir / name)
        log.info("stage %s: %s", name, " ".join(overrides))
        validate(stage_cfg)
        last = Path(stage_cfg.run_dir) / "checkpoints" / "last.pt"
        if (Path(stage_cfg.run_dir) / "eval.json").exists() and last.exists():
            log.info("stage %s already done in %s", name, stage_cfg.run_dir)
        else:
            train_task(stage_cfg)
        done[name] = str(last)
    (run_dir / "stages.json").write_text(json.dumps(done, indent=2))
    if cfg.play.get("actions") and done:
        with open_dict(cfg):
            cfg.checkpoint = list(done.values())[-1]
            cfg.run_dir = str(run_dir / "play")
        play(cfg)
    return done


def stage_summary(run_dir: str | Path) -> dict[str, Any]:
    """Every stage's eval.json, keyed by stage (for reports)."""
    out = {}
    for path in sorted(Path(run_dir).glob("*/eval.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out
