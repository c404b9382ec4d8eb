"""Weights for sharing: a checkpoint's model as safetensors, its resolved config as metadata.

    python -m worldmodel.export CHECKPOINT OUT.safetensors [--ema]

A checkpoint holds everything a run needs to continue (optimizer, RNG, data position); the
exported file holds only the model's tensors (the EMA weights with `--ema`) plus, in the
safetensors metadata, the run's resolved config as JSON, the model name, the step and the source.
safetensors stores raw tensors and no code, so a downloaded file cannot run anything when loaded.

`load_exported(path)` rebuilds the model from the stored config and loads the weights. The config
names the class to build (`model._target_`); only classes of `worldmodel.models` are accepted, so a
crafted file cannot make the loader import and call something else.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from worldmodel.build import build_model
from worldmodel.train import checkpoint as ckpt

FORMAT = "worldmodel-safetensors/1"
ALLOWED_PACKAGE = "worldmodel.models."


def export(checkpoint: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the model weights of `checkpoint` (its EMA weights with `ema`) to `out`."""
    state = ckpt.load(checkpoint)
    config = state.get("config")
    if not config or "model" not in config:
        raise ckpt.CheckpointError(f"{checkpoint} holds no stored config; cannot export it")
    if ema and not state.get("ema"):
        raise ckpt.CheckpointError(
            f"{checkpoint} has no EMA weights (trainer.ema_decay was null); export without --ema"
        )
    cfg = OmegaConf.create(config)
    model = build_allowed(cfg.model)
    ckpt.check_compatible(state, model, str(checkpoint))
    model.load_state_dict(state["model"])
    if ema:
        # The EMA covers the floating-point tensors; integer buffers come from the weights.
        model.load_state_dict(state["ema"], strict=False)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "model_name": str(cfg.model.get("name", type(model).__name__)),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "step": str(int(state.get("step", 0))),
        "weights": "ema" if ema else "train",
        "source": Path(checkpoint).name,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_model(model, str(tmp), metadata=metadata)  # shared tensors are stored once
    tmp.replace(out)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, with `config` parsed from JSON."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a worldmodel export (metadata format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    meta["config"] = json.loads(meta["config"])
    meta["step"] = int(meta["step"])
    return meta


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """(model in eval mode, its run config, the file's metadata) from an exported file."""
    meta = read_metadata(path)
    cfg = OmegaConf.create(meta["config"])
    model = build_allowed(cfg.model)
    load_model(model, str(path), strict=True, device=str(device))  # raises on any mismatch
    return model.to(device).eval(), cfg, meta


def build_allowed(model_cfg: DictConfig) -> nn.Module:
    """The model of a config read from a file: only classes of `worldmodel.models` are built, so
    a crafted file cannot make the loader import and call something else."""
    target = str(model_cfg.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if not module.startswith(ALLOWED_PACKAGE):
        raise ValueError(
            f"model._target_={target!r}: only classes of {ALLOWED_PACKAGE.rstrip('.')} are built "
            "from an exported file"
        )
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model._target_={target!r} is not an nn.Module class")
    return build_model(model_cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worldmodel.export",
        description="Export a checkpoint's model weights and config to a safetensors file.",
    )
    parser.add_argument("checkpoint", help="a checkpoint, e.g. RUN_DIR/checkpoints/last.pt")
    parser.add_argument("out", help="the file to write, e.g. tokenizer.safetensors")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, ema=args.ema)
    meta = read_metadata(out)
    size_mb = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({size_mb:.2f} MB): {meta['model_name']} at step {meta['step']}, "
        f"{meta['weights']} weights"
    )


if __name__ == "__main__":
    main()
