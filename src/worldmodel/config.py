"""Config helpers: the one `instantiate` every object goes through, and `validate`.

`validate(cfg)` runs before any work. It rejects impossible settings with a message that names the
offending keys, and fills in the values that follow from others (the process count a launcher
started, the per-process micro-batch). A model's own checks live with the model: a class with a
`check_config(model_cfg, data_cfg, eval_cfg) -> list[str]` is asked through its `_target_`; the
shared pieces those checks use (`resolution`, `quantizer_problems`) are here, and this module
imports nothing of the package, so models may import it.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

# Keys a model or data group may hold that are not constructor arguments: the option's name and
# the pipeline around the model.
RESERVED_KEYS = ("name", "pipeline")
# Optimizer settings lived in the model config before the `optim` group: checkpoints written then
# still hold them, so building a model from a stored config drops them; `validate` rejects them.
FORMER_OPTIM_KEYS = ("lr", "weight_decay", "betas", "warmup_steps")
TASKS = ("train", "eval", "play", "pipeline", "check")
PRECISIONS = ("fp32", "bf16")
QUANTIZERS = ("fsq", "lfq", "vq", "rvq", "gumbel")
# Launchers whose cluster config only takes effect through Hydra's multirun (`-m`).
SWEEP_CLUSTERS = ("slurm", "submitit_local")
# `trainer.strategy` with several processes (train/parallel.py)
STRATEGIES = ("ddp", "fsdp")
# `trainer.lr_schedule` kinds (train/optim.py `LRSchedule`) and `model.norm` kinds (the video
# tokenizer's `FrameNorm`); a test keeps each in step with the code that reads it.
LR_SCHEDULES = ("cosine", "constant")
NORMS = ("layer", "group")


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the keys."""


def _target(node: DictConfig) -> type:
    module, _, name = str(node._target_).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"_target_ {node._target_!r} cannot be imported: {e}") from e


def constructor_kwargs(node: DictConfig) -> dict[str, Any]:
    """The keyword arguments a `_target_` node passes to its class (reserved keys removed)."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("_target_", None)
    for key in (*RESERVED_KEYS, *FORMER_OPTIM_KEYS):
        kwargs.pop(key, None)
    return kwargs


def instantiate(node: DictConfig, **overrides: Any) -> Any:
    """Build the object a `_target_` node describes, with plain Python containers as arguments."""
    cls = _target(node)
    kwargs = constructor_kwargs(node)
    kwargs.update(overrides)
    return cls(**kwargs)


def optim_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer settings of a run (the one reader of `cfg.optim`): lr, weight_decay, betas,
    warmup_steps (`optim.warmup_steps: null` = `trainer.warmup_steps`)."""
    o, tr = cfg.optim, cfg.trainer
    warmup = o.get("warmup_steps")
    return {
        "lr": float(o.lr),
        "weight_decay": float(o.get("weight_decay", 0.0)),
        "betas": tuple(float(b) for b in o.get("betas", (0.9, 0.99))),
        "warmup_steps": int(tr.warmup_steps if warmup is None else warmup),
    }


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The number of processes a launcher started (torchrun's WORLD_SIZE), None without one."""
    environ = os.environ if environ is None else environ
    size = environ.get("WORLD_SIZE")
    return int(size) if size else None


def _check_signature(node: DictConfig, group: str, errors: list[str]) -> None:
    """Unknown keys in a `_target_` node are named before anything is built."""
    if node is None or "_target_" not in node:
        return
    try:
        cls = _target(node)
    except ConfigError as e:
        errors.append(f"{group}._target_: {e}")
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(constructor_kwargs(node)) - set(params))
    if unknown:
        valid = sorted(k for k in params if k != "self")
        errors.append(
            f"{', '.join(f'{group}.{k}' for k in unknown)}: not a parameter of "
            f"{cls.__name__} (valid: {', '.join(valid)})"
        )


def resolution(data: DictConfig) -> tuple[int, int] | None:
    """`data.resolution` (an int or [height, width]) as (height, width); None when unset."""
    res = data.get("resolution")
    if res is None:
        return None
    if isinstance(res, int):
        return res, res
    if isinstance(res, ListConfig | list | tuple) and len(res) == 2:
        return int(res[0]), int(res[1])
    raise ConfigError(f"data.resolution={res!r}: expected an int or [height, width]")


# The settings each quantizer kind takes besides `kind` (those `build_quantizer` accepts; a test
# keeps the two in step): a key of another kind is left behind when only `kind` is changed.
_VQ_KEYS = (
    "codebook_size",
    "codebook_dim",
    "decay",
    "kmeans_init",
    "kmeans_iters",
    "threshold_ema_dead_code",
    "rotation_trick",
    "commitment_weight",
    "use_cosine_sim",
)
QUANTIZER_KEYS = {
    "fsq": ("levels",),
    "lfq": (
        "codebook_size",
        "entropy_loss_weight",
        "commitment_loss_weight",
        "diversity_gamma",
        "frac_per_sample_entropy",
    ),
    "vq": _VQ_KEYS,
    "rvq": (*_VQ_KEYS, "num_quantizers"),
    "gumbel": (
        "codebook_size",
        "tau_start",
        "tau_end",
        "tau_anneal_steps",
        "kl_weight",
        "straight_through",
    ),
}


def quantizer_problems(q: DictConfig, key: str = "model.quantizer") -> list[str]:
    """What is wrong with a quantizer node (see `models/quantize.py`), naming the keys."""
    kind = q.get("kind")
    if kind not in QUANTIZERS:
        return [f"{key}.kind={kind!r}: expected one of {', '.join(QUANTIZERS)}"]
    errors: list[str] = []
    foreign = sorted(set(q) - {"kind", *QUANTIZER_KEYS[kind]})
    if foreign:
        errors.append(
            f"{', '.join(f'{key}.{k}' for k in foreign)}: not a setting of a {kind} quantizer "
            f"(choose a quantizer with {key.replace('.', '/')}=<{'|'.join(QUANTIZERS)}>, which "
            f"replaces the node, or drop a key with ~{key}.{foreign[0]})"
        )
    if kind == "fsq":
        levels = q.get("levels")
        if not levels or any(int(level) < 3 for level in levels):
            errors.append(f"{key}.levels={levels}: FSQ needs a non-empty list of levels >= 3")
    elif kind == "lfq":
        size = int(q.get("codebook_size") or 0)
        if size < 2 or size & (size - 1):
            errors.append(f"{key}.codebook_size={size}: LFQ needs a power of two >= 2")
    elif kind == "gumbel":
        errors.extend(_gumbel_problems(q, key))
    else:
        size = int(q.get("codebook_size") or 0)
        if size < 2:
            errors.append(f"{key}.codebook_size={size}: {kind} needs at least 2 codes")
    return errors


def _gumbel_problems(q: DictConfig, key: str) -> list[str]:
    """A gumbel quantizer's settings (`models/quantize.py` `GumbelQuantize`)."""
    errors = []
    size = q.get("codebook_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 2:
        errors.append(f"{key}.codebook_size={size}: gumbel needs an int >= 2 codes")
    for name in ("tau_start", "tau_end"):
        tau = q.get(name, 1.0)
        if isinstance(tau, bool) or not isinstance(tau, int | float) or tau <= 0:
            errors.append(f"{key}.{name}={tau}: the Gumbel-softmax temperature must be > 0")
    steps = q.get("tau_anneal_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        errors.append(f"{key}.tau_anneal_steps={steps}: must be an int >= 0")
    weight = q.get("kl_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        errors.append(f"{key}.kl_weight={weight}: must be a number >= 0")
    if not isinstance(q.get("straight_through", False), bool):
        errors.append(f"{key}.straight_through={q.get('straight_through')}: must be true or false")
    return errors


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys anywhere in `cfg` whose value is Hydra's mandatory `???`, unset."""
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif node == "???":
            out.append(prefix[:-1])

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _check_data(data: DictConfig | None, errors: list[str]) -> None:
    """A data source's module may define `check_config(data_cfg) -> list[str]` (e.g. the game's
    name), asked here so a bad value stops the run before the model is built."""
    if data is None or "_target_" not in data:
        return
    try:
        cls = _target(data)
    except ConfigError:
        return  # reported by _check_signature
    check = getattr(importlib.import_module(cls.__module__), "check_config", None)
    if callable(check):
        errors.extend(check(data))


def _check_strategy(tr: DictConfig, errors: list[str]) -> None:
    """`trainer.strategy` (train/parallel.py): FSDP shards over the processes, so it needs at
    least two; one process trains without any wrapper (strategy ddp)."""
    strategy = tr.get("strategy", "ddp")
    if strategy not in STRATEGIES:
        errors.append(f"trainer.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    elif strategy == "fsdp" and int(tr.devices) < 2:
        errors.append(
            f"trainer.strategy=fsdp with trainer.devices={tr.devices}: FSDP shards the model over "
            "the processes and one process has nothing to shard it with; use trainer.devices>=2 "
            "(or a launcher with several processes), or trainer.strategy=ddp for one process"
        )
    elif strategy == "fsdp" and tr.get("compile"):
        errors.append(
            "trainer.compile=true with trainer.strategy=fsdp: compiling a sharded model is not "
            "supported here; set trainer.compile=false or trainer.strategy=ddp"
        )


def _check_trainer(tr: DictConfig, errors: list[str]) -> None:
    if tr.precision not in PRECISIONS:
        errors.append(f"trainer.precision={tr.precision!r}: expected one of {PRECISIONS}")
    if tr.accelerator not in ("cpu", "cuda"):
        errors.append(f"trainer.accelerator={tr.accelerator!r}: expected cpu or cuda")
    # Whether a CUDA device is visible is asked where the device is taken (train/dist.py), not
    # here: a GPU recipe validates on a machine without one (`task=check` on a login node).
    if int(tr.devices) < 1:
        errors.append(f"trainer.devices={tr.devices}: expected >= 1")
    if int(tr.grad_accum) < 1:
        errors.append(f"trainer.grad_accum={tr.grad_accum}: expected >= 1")
    if int(tr.max_steps) < 1:
        errors.append(f"trainer.max_steps={tr.max_steps}: expected >= 1")
    if int(tr.val_batches) < 1:
        errors.append(f"trainer.val_batches={tr.val_batches}: expected >= 1")
    if tr.get("lr_schedule", "cosine") not in LR_SCHEDULES:
        errors.append(
            f"trainer.lr_schedule={tr.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}"
        )
    per_step = int(tr.devices) * int(tr.grad_accum)
    if int(tr.batch_size) < 1:
        errors.append(f"trainer.batch_size={tr.batch_size}: expected >= 1 (clips per step)")
    elif per_step >= 1 and int(tr.batch_size) % per_step:
        errors.append(
            f"trainer.batch_size={tr.batch_size} is not divisible by trainer.devices="
            f"{tr.devices} x trainer.grad_accum={tr.grad_accum}"
        )
    elif (
        per_step >= 1
        and tr.get("micro_batch") is not None
        and int(tr.micro_batch) * per_step != int(tr.batch_size)
    ):  # a micro-batch given on the command line must be the one the loop will use
        errors.append(
            f"trainer.micro_batch={tr.micro_batch} x trainer.devices={tr.devices} x "
            f"trainer.grad_accum={tr.grad_accum} != trainer.batch_size={tr.batch_size} "
            "(drop trainer.micro_batch, it follows from the others, or make grad_accum = "
            "batch_size / (devices x micro_batch))"
        )
    if tr.ema_decay is not None and not 0.0 < float(tr.ema_decay) < 1.0:
        errors.append(f"trainer.ema_decay={tr.ema_decay}: expected null or in (0, 1)")
    _check_strategy(tr, errors)


def causal_problems(tokenizer_cfg: DictConfig, key: str = "model") -> list[str]:
    """A world model trains on whole clips of a tokenizer that compresses time
    (`temporal_downsample` > 1); unless the tokenizer is causal (a latent frame reads no later
    pixel frame), the tokens of its context frames encode the frames it is asked to predict.
    `tokenizer_cfg` is the tokenizer's model config (e.g. from its checkpoint); `key` prefixes the
    key names in the messages."""
    cls = _target(tokenizer_cfg)
    default = inspect.signature(cls.__init__).parameters.get("temporal_downsample")
    t = tokenizer_cfg.get("temporal_downsample")
    if t is None and default is not None and default.default is not inspect.Parameter.empty:
        t = default.default
    t = int(t or 1)
    if t > 1 and not getattr(cls, "causal", True):
        return [
            f"{key}.temporal_downsample={t} with {key}._target_={tokenizer_cfg._target_}: "
            f"{cls.__name__} is not causal (its first latent frame encodes the {t - 1} frames "
            "after it), so a world model's context tokens would hold its targets; train the "
            f"tokenizer with {key}.temporal_downsample=1 or use a causal one"
        ]
    return []


def _check_model(cfg: DictConfig, errors: list[str]) -> None:
    """The model's own checks (`check_config` on its class), the former optimizer keys."""
    model = cfg.model
    for key in FORMER_OPTIM_KEYS:
        if key in model:
            errors.append(f"model.{key}: optimizer settings are in the optim group (optim.{key})")
    if model is None or "_target_" not in model:
        return
    if "norm" in model and model.norm not in NORMS:
        errors.append(f"model.norm={model.norm!r}: expected one of {', '.join(NORMS)}")
    try:
        cls = _target(model)
    except ConfigError:
        return  # reported by _check_signature
    check = getattr(cls, "check_config", None)
    if callable(check):
        errors.extend(check(model, cfg.data, cfg.eval))


def _check_optim(o: DictConfig | None, errors: list[str]) -> None:
    if o is None:
        errors.append("optim: missing (conf/optim: the optimizer settings)")
        return
    if float(o.lr) <= 0:
        errors.append(f"optim.lr={o.lr}: expected > 0")
    if float(o.get("weight_decay", 0.0)) < 0:
        errors.append(f"optim.weight_decay={o.weight_decay}: expected >= 0")
    betas = o.get("betas", [0.9, 0.99])
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        errors.append(f"optim.betas={list(betas)}: expected two values in [0, 1)")
    warmup = o.get("warmup_steps")
    if warmup is not None and int(warmup) < 0:
        errors.append(f"optim.warmup_steps={warmup}: expected null or >= 0")


def _check_launch(cfg: DictConfig, errors: list[str]) -> None:
    """A cluster that submits through Hydra's launcher does nothing without `-m`: the run would
    train here, in this process, instead."""
    name = (cfg.get("cluster") or {}).get("name")
    if (
        name in SWEEP_CLUSTERS
        and HydraConfig.initialized()
        and HydraConfig.get().mode != RunMode.MULTIRUN
    ):
        errors.append(
            f"cluster={name} submits jobs through Hydra's launcher, which only runs with -m: "
            f"python run.py -m cluster={name} ... (one job per run of the sweep)"
        )
    search = HydraConfig.get().runtime.choices.get("search") if HydraConfig.initialized() else None
    if search and search != "null" and cfg.task != "train":
        errors.append(
            f"search={search} with task={cfg.task}: a search's objective is the validation loss "
            "that task=train returns (search one stage of a recipe with its own overrides)"
        )


def _cap(node: DictConfig, caps: Mapping[str, Any]) -> None:
    """Lower each number of `node` to its cap in `caps` (nested alike); null, 0 and absent keys
    stay as they are."""
    for key, cap in caps.items():
        if key not in node:
            continue
        value = node[key]
        if isinstance(cap, Mapping) and isinstance(value, DictConfig):
            _cap(value, cap)
        elif isinstance(value, ListConfig) and not isinstance(cap, Mapping):
            node[key] = [min(v, cap) for v in value]
        elif isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
            node[key] = type(value)(cap)


def _model_problems(cfg: DictConfig) -> list[str]:
    errors: list[str] = []
    _check_signature(cfg.model, "model", errors)
    _check_model(cfg, errors)
    return errors


def apply_debug(cfg: DictConfig) -> None:
    """Shrink the run in place to the sizes `debug=<option>` gives (conf/debug/), a no-op without
    one. It runs inside `validate`, after every override, so a pipeline's stages, which set their
    sizes as overrides, are shrunk too. Model widths and the clip length change only where the
    model's own checks still pass (a model reading a tokenizer's tokens keeps its clip length)."""
    debug = cfg.get("debug")
    if not debug:
        return
    caps = OmegaConf.to_container(debug.get("caps") or {}, resolve=True)
    assert isinstance(caps, dict)
    with open_dict(cfg):
        for group, group_caps in caps.items():
            if isinstance(cfg.get(group), DictConfig):
                _cap(cfg[group], group_caps)
        for group, values in (debug.get("set") or {}).items():
            node = cfg.get(group)
            for key, value in (values or {}).items():
                if isinstance(node, DictConfig) and key in node:
                    node[key] = value
        tr = cfg.trainer
        per_step = int(tr.devices) * int(tr.grad_accum)
        if per_step >= 1:  # the capped batch still splits across processes and micro-batches
            tr.batch_size = max(per_step, int(tr.batch_size) // per_step * per_step)
        model = cfg.get("model")
        if not isinstance(model, DictConfig) or "_target_" not in model:
            return
        before = _model_problems(cfg)
        original = OmegaConf.to_container(model, resolve=False)
        _cap(model, OmegaConf.to_container(debug.get("model") or {}, resolve=True))
        if not set(_model_problems(cfg)) <= set(before):  # the model does not allow these sizes
            cfg.model = model = original
        data = cfg.data
        if (model.get("pipeline") or {}).get("tokenizer_checkpoint") or "clip_length" not in data:
            return
        clip = data.clip_length
        for shorter in debug.get("clip_lengths") or []:
            if shorter >= clip:
                break
            data.clip_length = shorter
            if set(_model_problems(cfg)) <= set(before):
                break
            data.clip_length = clip


def _memory_problems(eval_cfg: Any) -> list[str]:
    """What the memory test and long rollouts of a world evaluation (`eval.memory`,
    `eval.long_horizon`; `worldmodel.eval.memory`) cannot do, found before any training."""
    problems = []
    if int(eval_cfg.get("long_horizon") or 0) < 0:
        problems.append(f"eval.long_horizon={eval_cfg.long_horizon}: must be >= 0 (0 = off)")
    memory = eval_cfg.get("memory") or {}
    if not memory.get("enabled", False):
        return problems
    gaps = int(memory.get("min_gap", 16)), int(memory.get("max_gap", 32))
    if not 1 <= gaps[0] <= gaps[1]:
        problems.append(f"eval.memory.min_gap/max_gap={gaps}: need 1 <= min_gap <= max_gap")
    close, away = float(memory.get("close_mse", 1e-3)), float(memory.get("away_mse", 1e-2))
    if not 0 < close < away:
        problems.append(f"eval.memory.close_mse={close}, away_mse={away}: need 0 < close < away")
    frames, after = int(memory.get("context_frames", 4)), int(memory.get("context_after", 1))
    if after < 0 or frames <= after:
        problems.append(
            f"eval.memory.context_frames={frames}, context_after={after}: the context must hold "
            "frame i (context_after >= 0, context_frames > context_after)"
        )
    return problems


def validate(cfg: DictConfig, environ: Mapping[str, str] | None = None) -> DictConfig:
    """Reject impossible settings (naming the keys) and fill in derived values, in place.

    Under a launcher (torchrun's WORLD_SIZE in `environ`, default `os.environ`) the process count
    is the launcher's: `trainer.devices` is set to it (it only says how many processes to spawn
    when nothing launched this one).
    """
    errors = [
        f"{key}: a mandatory value (???) is not set; give it, e.g. {key}=VALUE"
        for key in missing_keys(cfg)
    ]
    world = launcher_world_size(environ)
    if world is not None and world != int(cfg.trainer.devices):
        with open_dict(cfg):
            cfg.trainer.devices = world
    if not errors:  # debug=<option>: the run shrunk before it is checked
        apply_debug(cfg)
    split = (cfg.get("eval") or {}).get("split", "val")
    if split not in ("train", "val", "test"):
        errors.append(f"eval.split={split!r}: expected train, val or test")
    errors.extend(_memory_problems(cfg.get("eval") or {}))
    if cfg.task not in TASKS:
        errors.append(f"task={cfg.task!r}: expected one of {', '.join(TASKS)}")
    world = cfg.get("world")
    if world:  # `world=PATH` names what to play or evaluate, as `checkpoint=PATH` does
        if cfg.get("checkpoint") and str(cfg.checkpoint) != str(world):
            errors.append(f"world={world} and checkpoint={cfg.checkpoint}: give one of them")
        else:
            with open_dict(cfg):
                cfg.checkpoint = str(world)
    if cfg.task in ("eval", "play") and not cfg.get("checkpoint"):
        errors.append(f"task={cfg.task} needs world=PATH (or checkpoint=PATH)")
    stages = cfg.get("stages")
    if cfg.get("stage_overrides") and not stages:
        errors.append("stage_overrides: only a multi-stage recipe (task=pipeline) has stages")
    elif stages:
        unknown = sorted(set(cfg.get("stage_overrides") or {}) - set(stages))
        if unknown:
            errors.append(
                f"{', '.join(f'stage_overrides.{k}' for k in unknown)}: no such stage "
                f"(the recipe's stages: {', '.join(stages)})"
            )
    checks = [
        lambda: _check_launch(cfg, errors),
        lambda: _check_trainer(cfg.trainer, errors),
        lambda: _check_optim(cfg.get("optim"), errors),
        lambda: _check_signature(cfg.data, "data", errors),
        lambda: _check_data(cfg.data, errors),
    ]
    # A recipe's own model is not trained (its stages are, each checked on its own).
    if cfg.task == "train" or (cfg.task == "check" and not stages):
        checks.append(lambda: _check_signature(cfg.model, "model", errors))
        checks.append(lambda: _check_model(cfg, errors))
    for check in checks:
        try:
            check()
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            pass  # a check that reads an unset `???` value: named above
        except ConfigError as e:
            errors.append(str(e))
        except (ValueError, TypeError) as e:  # e.g. int("abc"): the message names the value
            errors.append(f"{type(e).__name__}: {e}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    with open_dict(cfg):
        tr = cfg.trainer
        tr.micro_batch = int(tr.batch_size) // (int(tr.devices) * int(tr.grad_accum))
    return cfg
