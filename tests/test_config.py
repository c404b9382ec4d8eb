"""Every config composes, and `validate` rejects impossible settings naming the keys."""

from __future__ import annotations

import pytest
from conftest import CONF, compose_config

from worldmodel.config import ConfigError, constructor_kwargs, validate

GROUPS = ("model", "data", "trainer", "cluster", "logger")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        overrides = [f"{group}={option}"]
        if option == "video_folder":
            overrides.append("data.folder=/nonexistent")
        cfg = compose_config(overrides)
        assert cfg[group] is not None
        if "_target_" in cfg.get(group, {}):
            constructor_kwargs(cfg[group])  # resolves every interpolation


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    validate(cfg)
    assert cfg.trainer.micro_batch * cfg.trainer.devices * cfg.trainer.grad_accum == (
        cfg.trainer.batch_size
    )


PIPELINES = [
    e for e in options("experiment") if "stages:" in (CONF / "experiment" / f"{e}.yaml").read_text()
]


@pytest.mark.parametrize("experiment", PIPELINES)
def test_every_stage_of_a_pipeline_recipe_composes_and_validates(experiment, tmp_path):
    """Each stage of a multi-stage recipe (task=pipeline) is a config of its own: composed from
    `common` and its overrides (earlier stages' checkpoints as paths), it must validate."""
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.task == "pipeline" and cfg.stages
    for name, spec in cfg.stages.items():
        overrides = [str(o) for o in spec.overrides]
        for prev in cfg.stages:
            overrides = [o.replace(f"=@{prev}", f"={tmp_path / prev}.pt") for o in overrides]
        assert not any("=@" in o for o in overrides), (
            name,
            overrides,
        )  # names no stage of the recipe
        stage = compose_config([*cfg.get("common", []), *overrides])
        validate(stage)
        assert stage.task == "train", name


def test_defaults_are_the_design():
    cfg = compose_config()
    assert cfg.task == "train"
    assert cfg.model.name == "tokenizer"
    assert cfg.data.name == "procgen" and cfg.data.env_name == "coinrun"
    assert cfg.trainer.name == "cpu"
    assert cfg.cluster.name == "local"
    assert cfg.logger.name == "wandb"


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.resolution=66"], "data.resolution"),
        (["model.spatial_downsample=3"], "model.spatial_downsample"),
        (["model.temporal_downsample=2", "data.clip_length=16"], "data.clip_length"),
        (["model.temporal_downsample=3"], "model.temporal_downsample"),
        (["model.quantizer.kind=pq"], "model.quantizer.kind"),
        (
            ["model.quantizer.kind=lfq", "+model.quantizer.codebook_size=1000"],
            "model.quantizer.codebook_size",
        ),
        (["model.quantizer={kind: fsq, levels: [8, 1]}"], "model.quantizer.levels"),
        (["trainer.precision=fp16"], "trainer.precision"),
        (["trainer.batch_size=10", "trainer.grad_accum=3"], "trainer.batch_size"),
        (["trainer.accelerator=tpu"], "trainer.accelerator"),
        (["task=dance"], "task"),
        (["task=eval"], "checkpoint"),
        (["+model.no_such_knob=1"], "model.no_such_knob"),
        (["+data.no_such_knob=1"], "data.no_such_knob"),
    ],
)
def test_validate_rejects_and_names_the_key(overrides, named):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate(cfg)
