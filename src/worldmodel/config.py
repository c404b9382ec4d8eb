"""Config helpers: the one `instantiate` every object goes through, and `validate`.

`validate(cfg)` runs before any work. It rejects impossible settings with a message that names the
offending keys, and fills in the values that follow from others (per-process micro-batch, the token
grid of a tokenizer).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

# Keys a model or data group may hold that are not constructor arguments: they configure the
# optimizer or the pipeline around the model, or name the option.
RESERVED_KEYS = ("name", "lr", "weight_decay", "betas", "warmup_steps", "pipeline")
TASKS = ("train", "eval", "play", "pipeline")
PRECISIONS = ("fp32", "bf16")
QUANTIZERS = ("fsq", "lfq", "vq", "rvq")


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
    for key in RESERVED_KEYS:
        kwargs.pop(key, None)
    return kwargs


def instantiate(node: DictConfig, **overrides: Any) -> Any:
    """Build the object a `_target_` node describes, with plain Python containers as arguments."""
    cls = _target(node)
    kwargs = constructor_kwargs(node)
    kwargs.update(overrides)
    return cls(**kwargs)


def optim_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer settings of a run: lr, weight_decay, betas, warmup_steps (the one reader)."""
    m, tr = cfg.model, cfg.trainer
    return {
        "lr": float(m.lr),
        "weight_decay": float(m.get("weight_decay", 0.0)),
        "betas": tuple(float(b) for b in m.get("betas", (0.9, 0.99))),
        "warmup_steps": int(m.get("warmup_steps", tr.warmup_steps)),
    }


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


def _resolution(data: DictConfig) -> tuple[int, int] | None:
    res = data.get("resolution")
    if res is None:
        return None
    if isinstance(res, int):
        return res, res
    if isinstance(res, ListConfig | list | tuple) and len(res) == 2:
        return int(res[0]), int(res[1])
    raise ConfigError(f"data.resolution={res!r}: expected an int or [height, width]")


def _check_quantizer(q: DictConfig, key: str, errors: list[str]) -> None:
    kind = q.get("kind")
    if kind not in QUANTIZERS:
        errors.append(f"{key}.kind={kind!r}: expected one of {', '.join(QUANTIZERS)}")
        return
    if kind == "fsq":
        levels = q.get("levels")
        if not levels or any(int(level) < 2 for level in levels):
            errors.append(f"{key}.levels={levels}: FSQ needs a non-empty list of levels >= 2")
    elif kind == "lfq":
        size = int(q.get("codebook_size", 0))
        if size < 2 or size & (size - 1):
            errors.append(f"{key}.codebook_size={size}: LFQ needs a power of two >= 2")
    else:
        size = int(q.get("codebook_size", 0))
        if size < 2:
            errors.append(f"{key}.codebook_size={size}: {kind} needs at least 2 codes")


def _check_tokenizer(model: DictConfig, data: DictConfig, errors: list[str]) -> None:
    s = int(model.get("spatial_downsample", 1))
    t = int(model.get("temporal_downsample", 1))
    if s < 1 or s & (s - 1):
        errors.append(f"model.spatial_downsample={s}: expected a power of two")
    if t not in (1, 2, 4):
        errors.append(f"model.temporal_downsample={t}: expected 1, 2 or 4")
    res = _resolution(data)
    if res is not None and s >= 1 and any(r % s for r in res):
        errors.append(
            f"data.resolution={list(res)} is not divisible by model.spatial_downsample={s}"
        )
    clip = data.get("clip_length")
    if clip is not None and t in (2, 4) and (int(clip) - 1) % t:
        errors.append(
            f"data.clip_length={clip} does not fit model.temporal_downsample={t}: the first frame "
            f"is encoded alone, so clip_length - 1 must be a multiple of {t}"
        )
    if "quantizer" in model:
        _check_quantizer(model.quantizer, "model.quantizer", errors)


def _check_trainer(tr: DictConfig, errors: list[str]) -> None:
    if tr.precision not in PRECISIONS:
        errors.append(f"trainer.precision={tr.precision!r}: expected one of {PRECISIONS}")
    if tr.accelerator not in ("cpu", "cuda"):
        errors.append(f"trainer.accelerator={tr.accelerator!r}: expected cpu or cuda")
    elif tr.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append("trainer.accelerator=cuda but no CUDA device is visible")
    if int(tr.devices) < 1:
        errors.append(f"trainer.devices={tr.devices}: expected >= 1")
    if int(tr.grad_accum) < 1:
        errors.append(f"trainer.grad_accum={tr.grad_accum}: expected >= 1")
    if int(tr.max_steps) < 1:
        errors.append(f"trainer.max_steps={tr.max_steps}: expected >= 1")
    per_step = int(tr.devices) * int(tr.grad_accum)
    if per_step >= 1 and int(tr.batch_size) % per_step:
        errors.append(
            f"trainer.batch_size={tr.batch_size} is not divisible by trainer.devices="
            f"{tr.devices} x trainer.grad_accum={tr.grad_accum}"
        )
    if tr.ema_decay is not None and not 0.0 < float(tr.ema_decay) < 1.0:
        errors.append(f"trainer.ema_decay={tr.ema_decay}: expected null or in (0, 1)")


def _check_cvivit(model: DictConfig, data: DictConfig, ev: DictConfig, errors: list[str]) -> None:
    """C-ViViT learns position embeddings for one frame size and up to max_frames latent frames;
    the clips it trains on (and is evaluated on after training) must fit both."""
    res = _resolution(data)
    try:
        size = _resolution(OmegaConf.create({"resolution": model.get("image_size")}))
    except ConfigError:
        errors.append(f"model.image_size={model.get('image_size')}: expected an int or [H, W]")
        size = None
    if res is not None and size is not None and size != res:
        errors.append(f"model.image_size={list(size)} must equal data.resolution={list(res)}")
    t, frames = int(model.get("temporal_downsample", 1)), int(model.get("max_frames", 16))
    for key, clip in (
        ("data.clip_length", data.get("clip_length")),
        ("eval.clip_length", ev.get("clip_length")),
    ):
        if clip is None or t < 1:
            continue
        if (int(clip) - 1) % t:
            if key == "eval.clip_length":  # data.clip_length: reported by _check_tokenizer
                errors.append(
                    f"{key}={clip} does not fit model.temporal_downsample={t}: the first frame "
                    f"is encoded alone, so {key} - 1 must be a multiple of {t}"
                )
        elif 1 + (int(clip) - 1) // t > frames:
            errors.append(
                f"{key}={clip} makes {1 + (int(clip) - 1) // t} latent frames, more than "
                f"model.max_frames={frames}"
            )


def _check_videogpt_vqvae(model: DictConfig, data: DictConfig, errors: list[str]) -> None:
    """VideoGPT's VQ-VAE is not causal: clips split into whole groups of temporal_downsample."""
    s = int(model.get("spatial_downsample", 4))
    t = int(model.get("temporal_downsample", 4))
    if s not in (2, 4, 8):
        errors.append(f"model.spatial_downsample={s}: expected 2, 4 or 8")
    if t not in (1, 2, 4):
        errors.append(f"model.temporal_downsample={t}: expected 1, 2 or 4")
    res = _resolution(data)
    if res is not None and s >= 1 and any(r % s for r in res):
        errors.append(
            f"data.resolution={list(res)} is not divisible by model.spatial_downsample={s}"
        )
    if res is not None and _resolution(model) != res:
        errors.append(
            f"model.resolution={model.get('resolution')} must equal data.resolution={list(res)} "
            "(it sizes the latent position embeddings)"
        )
    clip = data.get("clip_length")
    if clip is not None and t >= 1 and int(clip) % t:
        errors.append(f"data.clip_length={clip} is not a multiple of model.temporal_downsample={t}")
    if clip is not None and int(clip) > int(model.get("max_frames", 16)):
        errors.append(f"data.clip_length={clip} exceeds model.max_frames={model.max_frames}")
    if int(model.get("channels", 240)) % int(model.get("heads", 2)):
        errors.append(f"model.channels={model.channels} is not divisible by model.heads")
    if "quantizer" in model:
        _check_quantizer(model.quantizer, "model.quantizer", errors)


def _check_videogpt(model: DictConfig, data: DictConfig, errors: list[str]) -> None:
    """The prior's window must hold a clip, and a clip more frames than the prompt."""
    clip, frames = data.get("clip_length"), int(model.get("max_frames", 8))
    if clip is not None and int(clip) > frames:
        errors.append(f"data.clip_length={clip} exceeds model.max_frames={frames}")
    cond = int(model.get("cond_frames", 1))
    if clip is not None and not 0 <= cond < int(clip):
        errors.append(f"model.cond_frames={cond} must be in [0, data.clip_length={clip})")
    if int(model.get("dim", 128)) % int(model.get("heads", 4)):
        errors.append(f"model.dim={model.dim} is not divisible by model.heads={model.heads}")


def validate(cfg: DictConfig) -> DictConfig:
    """Reject impossible settings (naming the keys) and fill in derived values, in place."""
    errors: list[str] = []
    if cfg.task not in TASKS:
        errors.append(f"task={cfg.task!r}: expected one of {', '.join(TASKS)}")
    if cfg.task in ("eval", "play") and not cfg.get("checkpoint"):
        errors.append(f"task={cfg.task} needs checkpoint=PATH")
    _check_trainer(cfg.trainer, errors)
    _check_signature(cfg.data, "data", errors)
    if cfg.task == "train":
        _check_signature(cfg.model, "model", errors)
        if cfg.model.get("name") in ("tokenizer", "tokenizer_cvivit"):
            _check_tokenizer(cfg.model, cfg.data, errors)
            if cfg.model.name == "tokenizer_cvivit":
                _check_cvivit(cfg.model, cfg.data, cfg.eval, errors)
        elif cfg.model.get("name") == "videogpt_vqvae":
            _check_videogpt_vqvae(cfg.model, cfg.data, errors)
        elif cfg.model.get("name") == "videogpt":
            _check_videogpt(cfg.model, cfg.data, errors)
    for key in ("lr", "weight_decay"):
        if key in cfg.model and float(cfg.model[key]) < 0:
            errors.append(f"model.{key}={cfg.model[key]}: expected >= 0")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    with open_dict(cfg):
        tr = cfg.trainer
        tr.micro_batch = int(tr.batch_size) // (int(tr.devices) * int(tr.grad_accum))
    return cfg
