"""Every config composes, and `validate` rejects impossible settings naming the keys."""

from __future__ import annotations

import ast

import pytest
from conftest import CONF, ROOT, compose_config
from omegaconf import OmegaConf, open_dict

from worldmodel.config import (
    ConfigError,
    causal_problems,
    constructor_kwargs,
    optim_settings,
    validate,
)

GROUPS = ("model", "data", "trainer", "cluster", "logger", "optim")


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
            ["model/quantizer=lfq", "model.quantizer.codebook_size=1000"],
            "model.quantizer.codebook_size",
        ),
        (["model.quantizer.kind=lfq"], "model.quantizer.levels: not a setting of a lfq"),
        (["model.quantizer={kind: fsq, levels: [8, 1]}"], "model.quantizer.levels"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["optim.weight_decay=-1"], "optim.weight_decay"),
        (["optim.betas=[0.9,1.5]"], "optim.betas"),
        (["+model.lr=1e-3"], "model.lr: optimizer settings are in the optim group"),
        (["model=tokenizer_cvivit", "eval.clip_length=8"], "eval.clip_length=8 does not fit"),
        (["model=videogpt_vqvae", "data.clip_length=6"], "data.clip_length=6 is not a multiple"),
        (["model=videogpt", "model.cond_frames=16"], "model.cond_frames=16 must be in"),
        (["model=videogpt", "model.heads=3"], "model.dim=128 is not divisible by model.heads=3"),
        (['+stage_overrides.lam=["model.dim=64"]'], "stage_overrides"),
        (["trainer.precision=fp16"], "trainer.precision"),
        (["trainer.batch_size=10", "trainer.grad_accum=3"], "trainer.batch_size"),
        (["trainer.accelerator=tpu"], "trainer.accelerator"),
        (["task=dance"], "task"),
        (["task=eval"], "checkpoint"),
        (["task=play", "world=a.safetensors", "checkpoint=b.pt"], "give one of them"),
        (["+model.no_such_knob=1"], "model.no_such_knob"),
        (["+data.no_such_knob=1"], "data.no_such_knob"),
    ],
)
def test_validate_rejects_and_names_the_key(overrides, named):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate(cfg)


def test_world_names_what_to_play_as_checkpoint_does():
    cfg = validate(compose_config(["task=play", "world=experiments/demo/world.safetensors"]))
    assert cfg.checkpoint == "experiments/demo/world.safetensors"
    same = ["task=eval", "world=w.safetensors", "checkpoint=w.safetensors"]
    assert validate(compose_config(same)).checkpoint == "w.safetensors"


# ------------------------------------------------------------------ optimizer settings: conf/optim


@pytest.mark.parametrize(
    "overrides, lr, weight_decay, warmup",
    [
        ([], 2e-3, 1e-4, 100),  # the tokenizer's own settings
        (["model=tokenizer_cvivit"], 1e-3, 1e-4, 100),
        (["model=videogpt_vqvae"], 3e-4, 0.0, 200),  # warmup_steps null: trainer.warmup_steps
        (["model=videogpt"], 1e-3, 0.01, 200),
        (["model=dynamics"], 2e-3, 0.0, 200),
        (["model=dynamics", "optim.lr=1e-4"], 1e-4, 0.0, 200),  # the command line wins
        (["model=dynamics", "optim.warmup_steps=7"], 2e-3, 0.0, 7),
        (["experiment=smoke_tokenizer"], 3e-3, 1e-4, 100),  # a recipe's optim block
        (["experiment=smoke_tokenizer", "optim.lr=1e-2"], 1e-2, 1e-4, 100),
        (["experiment=smoke_videogpt"], 3e-3, 0.0, 10),  # a recipe switching the model
        (["model=tokenizer_cvivit", "optim=adamw"], 2e-3, 0.0, 200),  # a plain choice
    ],
)
def test_each_model_selects_its_optimizer_settings(overrides, lr, weight_decay, warmup):
    cfg = compose_config(overrides)
    hp = optim_settings(cfg)
    assert hp["lr"] == pytest.approx(lr) and hp["weight_decay"] == pytest.approx(weight_decay)
    assert hp["warmup_steps"] == warmup and hp["betas"] == (0.9, 0.99)
    assert not {"lr", "weight_decay", "betas", "warmup_steps"} & set(cfg.model)


def test_no_recipe_or_model_holds_optimizer_keys_in_the_model():
    for path in [*(CONF / "model").glob("*.yaml"), *(CONF / "experiment").glob("*.yaml")]:
        text = path.read_text()
        assert "model.lr" not in text and "model.weight_decay" not in text, path.name
    for option in options("experiment"):
        model = compose_config([f"experiment={option}"]).model
        assert not {"lr", "weight_decay", "betas", "warmup_steps"} & set(model), option


def test_a_model_built_from_a_config_with_former_optimizer_keys():
    """Checkpoints written before the optim group hold lr etc. in their model config."""
    model = compose_config().model
    with open_dict(model):
        model.lr, model.weight_decay, model.betas, model.warmup_steps = 1e-3, 0.0, [0.9, 0.9], 5
    assert not {"lr", "weight_decay", "betas", "warmup_steps", "name"} & set(
        constructor_kwargs(model)
    )


# ------------------------------------------------------------------ quantizers: model/quantizer


@pytest.mark.parametrize("kind", ["fsq", "lfq", "vq", "rvq"])
@pytest.mark.parametrize("model", ["tokenizer", "tokenizer_cvivit", "videogpt_vqvae"])
def test_model_quantizer_group_replaces_the_node(model, kind):
    clip = ["data.clip_length=17"] if model == "tokenizer_cvivit" else []  # 1 + 2n frames
    cfg = validate(compose_config([f"model={model}", f"model/quantizer={kind}", *clip]))
    q = OmegaConf.to_container(cfg.model.quantizer)
    expected = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "quantizer" / f"{kind}.yaml"))
    assert q == expected


def test_the_quantizer_keys_validate_knows_are_those_the_quantizers_take():
    from worldmodel.config import QUANTIZER_KEYS
    from worldmodel.models.quantize import _ALLOWED

    assert {k: set(v) for k, v in QUANTIZER_KEYS.items()} == _ALLOWED


def test_each_model_keeps_its_own_quantizer_default():
    assert compose_config(["model=tokenizer"]).model.quantizer.kind == "fsq"
    assert compose_config(["model=tokenizer_cvivit"]).model.quantizer.kind == "fsq"
    vq = compose_config(["model=videogpt_vqvae"]).model.quantizer
    assert vq.kind == "vq" and vq.codebook_size == 1024 and vq.rotation_trick is False
    # a recipe's values are merged into the model's node
    smoke = compose_config(["experiment=smoke_videogpt_vqvae"]).model.quantizer
    assert smoke.kind == "vq" and smoke.codebook_size == 64 and smoke.decay == 0.9
    # a recipe's choice, and the command line's over it
    assert compose_config(["experiment=smoke_tokenizer"]).model.quantizer.levels == [8, 5, 5, 5]
    cfg = compose_config(["experiment=smoke_tokenizer", "model/quantizer=rvq"])
    assert cfg.model.quantizer.kind == "rvq" and "levels" not in cfg.model.quantizer
    # VQ settings a recipe leaves behind in another kind's node are named
    cfg = compose_config(["experiment=smoke_videogpt_vqvae", "model/quantizer=fsq"])
    with pytest.raises(
        ConfigError, match=r"model\.quantizer\.codebook_size, model\.quantizer\.decay"
    ):
        validate(cfg)


def test_the_readme_quantizer_command_composes_and_builds():
    from worldmodel.build import build_model

    cfg = validate(compose_config(["experiment=smoke_tokenizer", "model/quantizer=lfq"]))
    assert OmegaConf.to_container(cfg.model.quantizer) == {
        "kind": "lfq",
        "codebook_size": 16384,
        "entropy_loss_weight": 0.1,
        "commitment_loss_weight": 0.25,
    }
    assert build_model(cfg.model).codebook_size == 16384
    cfg = validate(compose_config(["model/quantizer=lfq", "model.quantizer.codebook_size=4096"]))
    assert OmegaConf.to_container(cfg.model.quantizer)["codebook_size"] == 4096


# ------------------------------------------------------------------ a model checks its own config


def test_validate_asks_the_models_class(monkeypatch):
    """`validate` dispatches to `check_config` of the `_target_` class, for any class."""
    from worldmodel.models.tokenizer import VideoTokenizer

    seen = []

    def check(model, data, ev):
        seen.append((model.name, data.name, "horizon" in ev))
        return ["model.something: wrong"]

    monkeypatch.setattr(VideoTokenizer, "check_config", staticmethod(check))
    with pytest.raises(ConfigError, match="model.something: wrong"):
        validate(compose_config())
    assert seen == [("tokenizer", "procgen", True)]


def test_models_define_their_checks_and_config_names_no_model():
    from worldmodel.models.tokenizer import VideoTokenizer
    from worldmodel.models.tokenizer_cvivit import CViViT
    from worldmodel.models.videogpt import VideoGPT
    from worldmodel.models.videogpt_vqvae import VideoGPTVQVAE

    for cls in (VideoTokenizer, CViViT, VideoGPTVQVAE, VideoGPT):
        assert "check_config" in vars(cls), cls.__name__
    source = (ROOT / "src" / "worldmodel" / "config.py").read_text()
    for name in ("tokenizer_cvivit", "videogpt_vqvae", '"videogpt"', "_check_tokenizer"):
        assert name not in source, name
    imports = [
        node.module or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
    ]
    assert not [m for m in imports if m.startswith("worldmodel")], imports


def test_causal_problems_name_a_non_causal_tokenizer_that_compresses_time():
    vqvae = compose_config(["model=videogpt_vqvae", "model.temporal_downsample=4"]).model
    (problem,) = causal_problems(vqvae)
    assert "model.temporal_downsample=4" in problem and "not causal" in problem
    assert "model._target_=worldmodel.models.videogpt_vqvae.VideoGPTVQVAE" in problem
    per_frame = compose_config(["model=videogpt_vqvae", "model.temporal_downsample=1"]).model
    assert causal_problems(per_frame) == []
    with open_dict(vqvae):
        del vqvae.temporal_downsample  # the class default (4) counts
    assert causal_problems(vqvae)
    # causal tokenizers may compress time
    cvivit = compose_config(["model=tokenizer_cvivit", "model.temporal_downsample=2"]).model
    assert causal_problems(cvivit) == []


# ------------------------------------------------------------------ launchers


def test_a_launchers_process_count_replaces_trainer_devices():
    cfg = validate(compose_config(["trainer.batch_size=8"]), environ={"WORLD_SIZE": "2"})
    assert cfg.trainer.devices == 2 and cfg.trainer.micro_batch == 4
    cfg = validate(compose_config(["trainer=ddp", "trainer.devices=4"]), environ={})
    assert cfg.trainer.devices == 4  # no launcher: trainer.devices processes are spawned
    with pytest.raises(
        ConfigError, match="trainer.batch_size=8 is not divisible by trainer.devices=3"
    ):
        validate(compose_config(["trainer.batch_size=8"]), environ={"WORLD_SIZE": "3"})


def test_the_readmes_commands_compose_and_validate():
    """Every `python run.py` / torchrun line of the README's "Running things" (sweeps aside)."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running things") : readme.index("## Other systems")]
    commands = [
        shlex.split(line.split("  #")[0])
        for line in section.splitlines()
        if line.startswith(("python run.py", "torchrun ")) and " -m " not in line
    ]
    assert len(commands) >= 10
    for words in commands:
        overrides = words[words.index("run.py") + 1 :]
        cfg = compose_config(overrides)
        if cfg.trainer.accelerator == "cpu":
            validate(cfg, environ={"WORLD_SIZE": "4"} if words[0] == "torchrun" else {})


def test_eval_split_must_name_a_split(compose_cfg):
    cfg = compose_cfg(["eval.split=tset"])
    with pytest.raises(ConfigError, match="eval.split='tset'"):
        validate(cfg)
    assert validate(compose_cfg(["eval.split=test"])).eval.split == "test"
