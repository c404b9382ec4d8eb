"""Multi-stage recipes (`task=pipeline`, `task=check`): every stage is composed and validated
before any training, one stage can be targeted from the command line, each stage carries its
label, and a run folder is named after its recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from worldmodel.config import ConfigError
from worldmodel.tasks import pipeline

PIPELINES = sorted(
    p.stem for p in (CONF / "experiment").glob("*.yaml") if "stages:" in p.read_text()
)


@pytest.fixture
def hydra_conf():
    """Hydra's config search path, as `run.py` has it while a pipeline composes its stages."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def recipe(overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def with_stages(cfg: DictConfig, stages: dict[str, list[str]]) -> DictConfig:
    with open_dict(cfg):
        cfg.stages = OmegaConf.create({k: {"overrides": v} for k, v in stages.items()})
        cfg.common = []
    return cfg


@pytest.mark.parametrize("experiment", PIPELINES)
def test_every_stage_of_every_recipe_composes_and_validates(experiment, tmp_path, hydra_conf):
    cfg = recipe([f"experiment={experiment}"], tmp_path)
    assert cfg.task == "pipeline" and cfg.name == experiment
    stages = pipeline.compose_stages(cfg)
    assert [s.name for s in stages] == list(cfg.stages)
    for i, stage in enumerate(stages, 1):
        assert stage.label == f"stage {i}/{len(stages)} {stage.name}"
        assert stage.cfg.stage_label == stage.label and stage.cfg.task == "train"
        assert stage.cfg.run_dir == str(tmp_path / stage.name)
        assert stage.checkpoint == tmp_path / stage.name / "checkpoints" / "last.pt"
        assert not any("=@" in o for o in stage.overrides), stage.overrides
        tokenizer = (stage.cfg.model.get("pipeline") or {}).get("tokenizer_checkpoint")
        if tokenizer is not None:  # an earlier stage's checkpoint
            assert tokenizer in {str(s.checkpoint) for s in stages[: i - 1]}


def test_stage_overrides_reach_one_stage(tmp_path, hydra_conf):
    cfg = recipe(
        ["experiment=smoke_genie", '+stage_overrides.dynamics=["model.dim=64","model.heads=4"]'],
        tmp_path,
    )
    stages = {s.name: s.cfg for s in pipeline.compose_stages(cfg)}
    assert stages["dynamics"].model.dim == 64 and stages["dynamics"].model.heads == 4
    assert stages["lam"].model.dim == 32  # smoke_lam's own
    assert not stages["dynamics"].stage_overrides  # not passed on


def test_command_line_overrides_reach_every_stage(tmp_path, hydra_conf, monkeypatch):
    monkeypatch.setattr(pipeline, "_command_line_overrides", lambda: ["trainer.max_steps=7"])
    cfg = recipe(["experiment=smoke_genie"], tmp_path)
    assert {s.cfg.trainer.max_steps for s in pipeline.compose_stages(cfg)} == {7}
    # an override only some stages' models take: every stage is named, with the way out
    monkeypatch.setattr(pipeline, "_command_line_overrides", lambda: ["model.num_res_blocks=2"])
    with pytest.raises(ConfigError) as e:
        pipeline.compose_stages(cfg)
    message = str(e.value)
    assert "stage 2/3 lam" in message and "stage 3/3 dynamics" in message
    assert "stage 1/3 tokenizer" not in message and "nothing was trained" in message
    assert "+stage_overrides.lam=" in message


def test_about_the_recipe_overrides_stay_out_of_the_stages():
    for override in [
        "experiment=demo",
        "task=check",
        "name=x",
        "play.actions=[1]",
        "+stage_overrides.lam=[a]",
        "hydra.run.dir=x",
        "hydra/launcher=basic",
        "stages.lam.overrides=[]",
    ]:
        assert pipeline._about_recipe(override), override
    for override in ["logger=none", "trainer.max_steps=3", "+model.x=1", "optim.lr=1e-3"]:
        assert not pipeline._about_recipe(override), override


def test_a_bad_last_stage_stops_the_command_before_the_first_trains(
    tmp_path, hydra_conf, monkeypatch
):
    trained = []
    monkeypatch.setattr(pipeline, "train_task", lambda cfg: trained.append(cfg.stage_label))
    cfg = recipe(
        ["experiment=smoke_genie", '+stage_overrides.dynamics=["+model.no_such_knob=1"]'], tmp_path
    )
    with pytest.raises(ConfigError, match=r"stage 3/3 dynamics(.|\n)*model\.no_such_knob"):
        pipeline.run_stages(cfg)
    assert trained == [] and not (tmp_path / "stages.json").exists()


def test_run_stages_trains_each_stage_in_order_with_its_label(tmp_path, hydra_conf, monkeypatch):
    trained = []
    monkeypatch.setattr(
        pipeline, "train_task", lambda cfg: trained.append((cfg.stage_label, cfg.run_dir))
    )
    cfg = recipe(["experiment=smoke_genie", "play.actions=[]"], tmp_path)
    done = pipeline.run_stages(cfg)
    assert trained == [
        ("stage 1/3 tokenizer", str(tmp_path / "tokenizer")),
        ("stage 2/3 lam", str(tmp_path / "lam")),
        ("stage 3/3 dynamics", str(tmp_path / "dynamics")),
    ]
    assert done["dynamics"] == str(tmp_path / "dynamics" / "checkpoints" / "last.pt")
    assert (tmp_path / "stages.json").is_file()


def test_a_reference_must_name_an_earlier_stage(tmp_path, hydra_conf):
    cfg = with_stages(
        recipe(["experiment=smoke_genie"], tmp_path),
        {
            "lam": ["experiment=smoke_lam", "checkpoint=@tokenizer"],
            "tokenizer": ["experiment=smoke_tokenizer"],
        },
    )
    with pytest.raises(ConfigError, match=r"stage 1/2 lam: checkpoint=@tokenizer names no earlier"):
        pipeline.compose_stages(cfg)


def test_a_world_model_over_a_non_causal_tokenizer_stage_is_rejected(tmp_path, hydra_conf):
    """VideoGPT's VQ-VAE compressing time would let the prior's context tokens hold its targets:
    the recipe stops before the VQ-VAE trains, naming the tokenizer stage's keys."""
    prior = [
        "experiment=smoke_videogpt",
        "model.pipeline.tokenizer_checkpoint=@vqvae",
        "data.clip_length=4",
    ]
    cfg = with_stages(
        recipe(["experiment=smoke_genie"], tmp_path),
        {"vqvae": ["experiment=smoke_videogpt_vqvae"], "prior": prior},
    )
    with pytest.raises(ConfigError) as e:
        pipeline.compose_stages(cfg)
    assert "stage 2/2 prior reads the tokens of vqvae" in str(e.value)
    assert "stages.vqvae: model.temporal_downsample=2" in str(e.value)
    assert "not causal" in str(e.value)
    per_frame = ["experiment=smoke_videogpt_vqvae", "model.temporal_downsample=1"]
    with_stages(cfg, {"vqvae": [*per_frame, "data.clip_length=1"], "prior": prior})
    assert [s.name for s in pipeline.compose_stages(cfg)] == ["vqvae", "prior"]


def test_a_run_folder_is_named_after_its_recipe(hydra_conf, monkeypatch):
    def run_dir(overrides: list[str]) -> str:
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return str(cfg.hydra.run.dir)

    monkeypatch.delenv("WORLDMODEL_RUN_STAMP", raising=False)
    assert run_dir([]).endswith("_tokenizer")
    assert run_dir(["model=lam"]).endswith("_lam")
    assert run_dir(["experiment=demo"]).endswith("_demo")
    assert run_dir(["experiment=smoke_tokenizer"]).endswith("_smoke_tokenizer")
    assert run_dir(["name=mine"]).endswith("_mine")
    monkeypatch.setenv("WORLDMODEL_RUN_STAMP", "2001-02-03/04-05-06")  # torchrun: one folder
    assert run_dir(["experiment=demo"]) == "outputs/2001-02-03/04-05-06_demo"


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_task_check_prints_every_stage_and_trains_nothing(tmp_path):
    out = run_py(
        "experiment=smoke_genie",
        "task=check",
        f"hydra.run.dir={tmp_path}",
        "logger=none",
        '+stage_overrides.dynamics=["model.dim=64"]',
    )
    assert out.returncode == 0, out.stderr[-3000:]
    headers = [line for line in out.stdout.splitlines() if line.startswith("# stage")]
    assert [h.split(":")[0] for h in headers] == [
        "# stage 1/3 tokenizer",
        "# stage 2/3 lam",
        "# stage 3/3 dynamics",
    ]
    dynamics = out.stdout[out.stdout.index("# stage 3/3 dynamics") :]
    assert "\n  dim: 64\n" in dynamics and "logger=none" in headers[0]
    assert f"tokenizer_checkpoint: {tmp_path}/tokenizer/checkpoints/last.pt" in dynamics
    assert not (tmp_path / "stages.json").exists() and not (tmp_path / "tokenizer").exists()

    out = run_py(
        "experiment=smoke_genie", "task=check", f"hydra.run.dir={tmp_path}", "model.norm=group"
    )
    assert out.returncode != 0
    assert "stage 2/3 lam" in out.stderr and "nothing was trained" in out.stderr
