"""`task=pipeline`: several training stages in one command (e.g. `experiment=demo`); `task=check`.

Each stage is a config composed from the recipe's `common` overrides, the stage's own overrides,
the command line's overrides (they reach every stage) and `stage_overrides.<stage>` (the command
line's overrides of that stage alone), trained (and evaluated) in a sub-folder of the run dir.
Later stages refer to earlier stages' checkpoints as `@NAME` (e.g.
`model.pipeline.tokenizer_checkpoint=@tokenizer`), which stands for the path that stage writes.
Every stage is composed and validated before the first one trains, so a mistake in the last stage
stops the command at once instead of after the earlier stages' training.

`task=check` composes and validates the same way and prints each stage's config (a single run's
config when there are no stages); it trains nothing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from worldmodel.config import ConfigError, causal_problems, validate
from worldmodel.eval.clips import pixel_val
from worldmodel.play import play
from worldmodel.play.task import true_to_model_actions
from worldmodel.runtime import memory_gb, release_memory
from worldmodel.tasks.train import train_task
from worldmodel.train.logging import name_stage_run
from worldmodel.world import WORLD_FILE, World

log = logging.getLogger(__name__)

# Command-line keys about the recipe itself, not about the stages' configs.
RECIPE_KEYS = ("experiment", "task", "name", "hydra", "play", "stages", "common", "stage_overrides")
# `key=@stage`: the checkpoint an earlier stage writes.
STAGE_REF = re.compile(r"=@([A-Za-z0-9_]+)$")


@dataclass
class Stage:
    """One stage of a recipe: its composed, validated config and the checkpoint it writes."""

    name: str
    label: str  # "stage 2/3 lam"
    overrides: list[str]
    cfg: DictConfig
    checkpoint: Path


def _about_recipe(override: str) -> bool:
    key = override.lstrip("~+").split("=", 1)[0]
    return re.split(r"[./@]", key, maxsplit=1)[0] in RECIPE_KEYS


def _command_line_overrides() -> list[str]:
    """The user's overrides of this run, passed on to every stage (not the recipe's own, nor
    those about the recipe: its stages, `common`, `stage_overrides`, `play`)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not _about_recipe(o)]


def _stage_overrides(cfg: DictConfig, name: str) -> list[str]:
    extra = (cfg.get("stage_overrides") or {}).get(name)
    if extra is None:
        return []
    if not isinstance(extra, ListConfig | list) or not all(isinstance(o, str) for o in extra):
        raise ConfigError(
            f"stage_overrides.{name}={extra}: expected a list of overrides, e.g. "
            f'\'+stage_overrides.{name}=["trainer.max_minutes=1","model.dim=64"]\''
        )
    return [str(o) for o in extra]


def compose_stages(cfg: DictConfig) -> list[Stage]:
    """Every stage's config, composed and validated (ConfigError naming the stage otherwise).

    `@NAME` references become the checkpoint paths the earlier stages will write; those files do
    not exist yet, and nothing here reads them. A world model over an earlier stage's tokenizer
    is also checked against that tokenizer's config (`causal_problems`).
    """
    run_dir = Path(cfg.run_dir)
    names = list(cfg.stages)
    user = _command_line_overrides()
    common = [str(o) for o in cfg.get("common") or []]
    stages: list[Stage] = []
    errors: list[str] = []
    for i, name in enumerate(names, 1):
        label = f"stage {i}/{len(names)} {name}"
        checkpoint = run_dir / name / "checkpoints" / "last.pt"
        earlier = {s.name: s for s in stages}
        overrides = []
        for o in [*common, *(str(o) for o in cfg.stages[name].overrides), *user]:
            ref = STAGE_REF.search(o)
            if ref and ref.group(1) in earlier:
                o = o[: ref.start()] + f"={earlier[ref.group(1)].checkpoint}"
            elif ref:
                errors.append(
                    f"{label}: {o} names no earlier stage (earlier: {', '.join(earlier) or 'none'})"
                )
            overrides.append(o)
        try:
            overrides += _stage_overrides(cfg, name)
            stage_cfg = compose(config_name="config", overrides=overrides)
            with open_dict(stage_cfg):
                stage_cfg.run_dir = str(run_dir / name)
                stage_cfg.stage_label = label
            name_stage_run(stage_cfg, cfg, name)  # W&B: <recipe>/<stage>, grouped by run_dir
            validate(stage_cfg)
        except (HydraException, OmegaConfBaseException, ConfigError) as e:
            hint = (
                f"\n    (command-line overrides reach every stage; one stage's go in "
                f"'+stage_overrides.{name}=[\"key=value\"]')"
                if user
                else ""
            )
            message = str(e).strip().replace("\n", "\n    ")
            errors.append(f"{label} ({' '.join(overrides)}):\n    {message}{hint}")
            continue
        tokenizer = (stage_cfg.model.get("pipeline") or {}).get("tokenizer_checkpoint")
        for prev in earlier.values():
            if tokenizer == str(prev.checkpoint):
                for problem in causal_problems(prev.cfg.model, key=f"stages.{prev.name}: model"):
                    errors.append(f"{label} reads the tokens of {prev.name}: {problem}")
        stages.append(Stage(name, label, overrides, stage_cfg, checkpoint))
    if errors:
        raise ConfigError(
            "a stage of the recipe is invalid (nothing was trained):\n  - " + "\n  - ".join(errors)
        )
    return stages


def run_stages(cfg: DictConfig) -> dict[str, str]:
    """Train each stage of `cfg.stages` in order; returns the stages' checkpoint paths.

    Every stage is composed and validated first (`compose_stages`). A stage whose folder already
    holds `eval.json` and `checkpoints/last.pt` is not trained again. When `play.actions` is set,
    the last stage's model is played headless into `<run_dir>/play`.
    """
    run_dir = Path(cfg.run_dir)
    stages = compose_stages(cfg)
    done: dict[str, str] = {}
    resources: dict[str, dict[str, float]] = {}
    for stage in stages:
        log.info("%s: %s", stage.label, " ".join(stage.overrides))
        start = time.perf_counter()
        if (Path(stage.cfg.run_dir) / "eval.json").exists() and stage.checkpoint.exists():
            log.info("%s already done in %s", stage.label, stage.cfg.run_dir)
        else:
            train_task(stage.cfg)
        done[stage.name] = str(stage.checkpoint)
        release_memory()  # what this stage freed goes back to the OS, not to the next stage
        resources[stage.name] = {"seconds": round(time.perf_counter() - start, 1), **memory_gb()}
        log.info("%s: %s", stage.label, resources[stage.name])
        # wall time and memory per stage; peak_rss_gb is the process's peak up to the stage's end
        (run_dir / "resources.json").write_text(json.dumps(resources, indent=2))
    (run_dir / "stages.json").write_text(json.dumps(done, indent=2))
    world_file = export_world(stages[-1], run_dir) if stages else None
    if cfg.play.get("actions") and done:
        with open_dict(cfg):
            cfg.checkpoint = list(done.values())[-1]
            cfg.run_dir = str(run_dir / "play")
        play(cfg)
    if world_file is not None:
        log.info(
            "the world this run made: %s\n  play it: python run.py task=play checkpoint=%s "
            "play.interactive=true",
            world_file,
            world_file,
        )
    return done


def export_world(last: Stage, run_dir: Path) -> Path | None:
    """`<run_dir>/world.safetensors`: the last stage's world with its frozen parts and the
    game's actions mapped to the model's (learned on the validation split for latent actions);
    None when the last stage is not a world model."""
    checkpoint = Path(last.checkpoint)
    if last.cfg.model.get("pipeline") is None or not checkpoint.exists():
        return None
    world = World.from_checkpoint(checkpoint)
    world.true_to_model_actions = true_to_model_actions(world, pixel_val(last.cfg.data))
    return world.export(run_dir / WORLD_FILE, recipe=str(last.cfg.get("name", "")))


def check_task(cfg: DictConfig) -> None:
    """`task=check`: compose and validate (every stage of a recipe) and print the configs, as
    Hydra's `--cfg job` prints one; nothing is trained."""
    if not cfg.get("stages"):
        print(OmegaConf.to_yaml(cfg))
        return
    for stage in compose_stages(cfg):
        print(f"# {stage.label}: {' '.join(stage.overrides)}")
        print(OmegaConf.to_yaml(stage.cfg))
    print(f"# {len(cfg.stages)} stages composed and validated; nothing trained")


def stage_summary(run_dir: str | Path) -> dict[str, Any]:
    """Every stage's eval.json, keyed by stage (for reports)."""
    out = {}
    for path in sorted(Path(run_dir).glob("*/eval.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out
