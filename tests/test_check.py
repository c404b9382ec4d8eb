"""The configuration front door: `python run.py --help`, `validate` (and so `task=check`) naming
every bad value before any work, `debug=tiny` shrinking any recipe and each of its stages, and
`search=optuna` running a hyper-parameter search through Hydra's sweeper."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from worldmodel.config import LR_SCHEDULES, NORMS, TASKS, ConfigError, validate
from worldmodel.data import procgen
from worldmodel.data.procgen import PROCGEN_GAMES
from worldmodel.models.tokenizer import FrameNorm
from worldmodel.tasks import pipeline
from worldmodel.tasks.train import train_task
from worldmodel.train.optim import LRSchedule

TINY = yaml.safe_load((CONF / "debug" / "tiny.yaml").read_text())["debug"]


def run_py(*args: str, data: Path) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in the repository, recording (if it did) into `data`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "WORLDMODEL_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def help_examples(text: str) -> list[list[str]]:
    section = text[text.index("== Examples ==") :]
    return [shlex.split(line) for line in section.splitlines() if line.strip().startswith("python")]


# --- the help page ---------------------------------------------------------------------------


def test_help_lists_tasks_groups_recipes_and_examples(tmp_path):
    out = run_py("--help", data=tmp_path / "data")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for task in TASKS:
        assert f"\n  {task} " in text, task
    for group in ("model", "data", "trainer", "optim", "cluster", "logger", "experiment"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"\n{group}: {', '.join(options)}\n" in text, group
    assert "\ndebug: tiny" in text and "\nsearch: optuna" in text
    recipes = text[text.index("== Recipes") : text.index("== Examples")]
    for recipe in (CONF / "experiment").glob("*.yaml"):
        assert recipe.stem in recipes, (
            f"experiment={recipe.stem}: add a line for it to conf/hydra/help/worldmodel.yaml"
        )
    assert len(help_examples(text)) == 5
    assert not list(tmp_path.iterdir()), "--help did work"


def test_help_examples_compose_and_validate():
    template = yaml.safe_load((CONF / "hydra" / "help" / "worldmodel.yaml").read_text())["template"]
    examples = help_examples(template)
    assert len(examples) == 5
    for words in examples:
        overrides = [w for w in words[words.index("run.py") + 1 :] if w != "-m"]
        cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
        validate(cfg)


# --- validate: every bad value named, all in one message ---------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        (
            ["data.env_name=notagame"],
            "data.env_name='notagame': not a procgen game (valid: bigfish",
        ),
        (["data=atari", "data.game=Notagame"], "data.game='Notagame': unknown ALE game"),
        (["trainer.lr_schedule=linear"], "trainer.lr_schedule='linear': expected one of cosine"),
        (["model.norm=batch"], "model.norm='batch': expected one of layer, group"),
        (["trainer.batch_size=0"], "trainer.batch_size=0: expected >= 1"),
        (["trainer.grad_accum=4", "trainer.batch_size=6"], "trainer.batch_size=6 is not divisible"),
        (["+trainer.micro_batch=3"], "trainer.micro_batch=3 x trainer.devices=1 x"),
        (["trainer.val_batches=0"], "trainer.val_batches=0: expected >= 1"),
        (["data=video_folder"], "data.folder: a mandatory value (???) is not set"),
        (["+eval.extra.deep=???"], "eval.extra.deep: a mandatory value (???) is not set"),
        (["trainer.max_steps=abc"], "abc"),
    ],
)
def test_validate_names_the_bad_value(overrides, named):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides))
    assert named in str(e.value)


def test_every_error_in_one_message():
    overrides = ["data=video_folder", "trainer.batch_size=0", "trainer.lr_schedule=step"]
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*overrides, "model.norm=batch", "+optim.extra=???"]))
    for key in ("data.folder", "optim.extra", "trainer.batch_size=0", "lr_schedule", "model.norm"):
        assert key in str(e.value), key


@pytest.mark.parametrize("game", ["Breakout", "pong", "ALE/MsPacman-v5"])
def test_ale_game_names_are_accepted(game):
    validate(compose_config(["data=atari", f"data.game={game}"]))


def test_every_procgen_game_is_accepted():
    validate(compose_config(["data.env_name=starpilot"]))
    for game in PROCGEN_GAMES:
        assert procgen.check_config({"env_name": game}) == []


def test_the_valid_values_are_those_the_code_reads():
    for kind in LR_SCHEDULES:
        LRSchedule(warmup_steps=1, max_steps=10, kind=kind)
    with pytest.raises(ValueError):
        LRSchedule(warmup_steps=1, max_steps=10, kind="linear")
    for kind in NORMS:
        FrameNorm(8, kind)
    with pytest.raises(ValueError):
        FrameNorm(8, "batch")


def test_task_check_exits_with_every_error_and_does_no_work(tmp_path):
    data = tmp_path / "data"
    out = run_py(
        "task=check",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data.env_name=notagame",
        "trainer.batch_size=0",
        "trainer.lr_schedule=linear",
        data=data,
    )
    assert out.returncode != 0
    assert "invalid configuration" in out.stderr
    assert f"valid: {', '.join(PROCGEN_GAMES)}" in out.stderr
    assert "trainer.batch_size=0" in out.stderr and "trainer.lr_schedule='linear'" in out.stderr
    assert not data.exists(), "task=check recorded data"
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- debug=tiny --------------------------------------------------------------------------------


def assert_tiny(cfg, label: str) -> None:
    caps = TINY["caps"]
    for key in ("max_steps", "batch_size", "val_batches", "val_every", "ckpt_every"):
        assert cfg.trainer[key] <= caps["trainer"][key], f"{label}: trainer.{key}"
    frames = [k for k in caps["data"] if k.endswith(("_frames", "_per_game")) and k in cfg.data]
    assert frames, f"{label}: no recorded frames capped"
    for key in frames:
        assert cfg.data[key] <= caps["data"][key], f"{label}: data.{key}"
    assert cfg.eval.batches <= caps["eval"]["batches"], label
    model = cfg.model
    for key in ("dim", "depth", "enc_depth", "dec_depth", "num_mid_blocks", "refiner_width"):
        if key in model:
            assert model[key] <= TINY["model"][key], f"{label}: model.{key}"
    channels = model.get("channels") or []
    for width in [channels] if isinstance(channels, int) else channels:
        assert width <= TINY["model"]["channels"], label


def test_debug_tiny_shrinks_every_stage_of_the_demo(tmp_path):
    """`python run.py experiment=demo debug=tiny task=check`: the recipe's stages set their sizes
    as overrides, and each stage still comes out at the tiny sizes; nothing is trained."""
    out = run_py(
        "experiment=demo",
        "debug=tiny",
        "task=check",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        data=tmp_path / "data",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parts = re.split(r"^# stage ", out.stdout, flags=re.M)[1:]
    demo = yaml.safe_load((CONF / "experiment" / "demo.yaml").read_text())
    assert [p.split(":")[0].split()[1] for p in parts] == list(demo["stages"])
    for part in parts:
        label, body = part.split("\n", 1)
        cfg = OmegaConf.create(yaml.safe_load(body.split("\n# ")[0]))
        assert_tiny(cfg, label)
        assert "debug=tiny" in label  # the command line's overrides reach every stage
    tokenizer = OmegaConf.create(yaml.safe_load(parts[0].split("\n", 1)[1]))
    assert list(tokenizer.model.channels) == [16, 16]  # the recipe's [64, 128], each level capped
    assert not (tmp_path / "run" / "tokenizer").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_debug_tiny_shrinks_every_recipe(experiment, tmp_path, monkeypatch):
    """Each recipe, and each stage of a pipeline (given `debug=tiny` as run.py's command line
    passes it on), composes, validates and comes out at the tiny sizes."""
    cfg = compose_config([f"experiment={experiment}", "debug=tiny"], run_dir=tmp_path)
    validate(cfg)
    if not cfg.get("stages"):
        assert_tiny(cfg, experiment)
        return
    monkeypatch.setattr(pipeline, "_command_line_overrides", lambda: ["debug=tiny"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        stages = pipeline.compose_stages(cfg)
    assert len(stages) == len(cfg.stages)
    for stage in stages:
        assert_tiny(stage.cfg, f"{experiment}: {stage.label}")


def test_debug_tiny_comes_after_the_recipe_and_keeps_smaller_values():
    cfg = validate(compose_config(["debug=tiny", "experiment=smoke_tokenizer"]))
    assert cfg.trainer.max_steps == 4 and cfg.trainer.batch_size == 4
    assert cfg.data.train_frames == 512 and cfg.eval.batches == 1
    cfg = validate(
        compose_config(["experiment=smoke_tokenizer", "debug=tiny", "trainer.max_steps=2"])
    )
    assert cfg.trainer.max_steps == 2
    cfg = validate(compose_config(["debug=tiny", "trainer.grad_accum=3", "trainer.batch_size=9"]))
    assert cfg.trainer.batch_size == 3 and cfg.trainer.micro_batch == 1  # still divisible


def test_debug_tiny_keeps_a_clip_length_the_model_needs():
    cfg = validate(
        compose_config(["debug=tiny", "model.temporal_downsample=2", "data.clip_length=9"])
    )
    assert cfg.data.clip_length == 5  # 4 would not fit: (T - 1) % 2 == 0
    cfg = validate(
        compose_config(["debug=tiny", "model=dynamics", "model.pipeline.tokenizer_checkpoint=x"])
    )
    assert cfg.data.clip_length == 16  # the tokens of a tokenizer: its clip length stays


def test_a_smoke_recipe_with_debug_tiny_trains_in_seconds(tmp_path):
    overrides = ["experiment=smoke_tokenizer", "debug=tiny", "logger=none"]
    cfg = validate(compose_config(overrides, run_dir=tmp_path))
    val_loss = train_task(cfg)
    assert val_loss is not None and val_loss == val_loss  # a number, not NaN
    assert (tmp_path / "checkpoints" / "last.pt").exists()


# --- search=optuna -----------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="hydra-optuna-sweeper is not installed (pip install hydra-optuna-sweeper==1.3.0)",
)
def test_search_optuna_runs_its_trials_and_writes_the_study(tmp_path):
    data = Path(os.environ["WORLDMODEL_DATA"])  # the session's cache: recording is shared
    out = run_py(
        "-m",
        "experiment=smoke_tokenizer",
        "search=optuna",
        "hydra.sweeper.n_trials=2",
        "debug=tiny",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
        data=data,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay"}
    assert results["best_value"] > 0
    trials = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert trials == ["0", "1"]
    for trial in trials:  # each trial a run of its own with its sampled settings
        overrides = (tmp_path / trial / ".hydra" / "overrides.yaml").read_text()
        assert "optim.lr=" in overrides
        assert (tmp_path / trial / "checkpoints" / "last.pt").exists()


def test_a_search_needs_a_run_that_returns_its_loss():
    """The objective is what `task=train` returns: a pipeline or `task=eval` under search=optuna
    is rejected before its first trial works."""
    overrides = ["experiment=smoke_genie", "search=optuna"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        assert hydra_cfg.hydra.sweeper.n_trials == 20
        with pytest.raises(ConfigError, match="search=optuna with task=pipeline"):
            validate(compose_config(overrides))
        validate(compose_config(["experiment=smoke_tokenizer", "search=optuna"]))
    finally:
        HydraConfig.instance().cfg = None
