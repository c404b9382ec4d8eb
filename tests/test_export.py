"""Export to safetensors and back: the same weights, the same outputs, nothing unpickled."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_config
from safetensors.torch import save_file

from worldmodel.build import load_model
from worldmodel.config import validate
from worldmodel.export import export, load_exported, read_metadata
from worldmodel.train import checkpoint as ckpt
from worldmodel.train.loop import train

TINY = [
    "experiment=smoke_tokenizer",
    "logger=none",
    "trainer.progress=false",
    "trainer.max_steps=3",
    "trainer.val_at_start=false",
    "trainer.val_batches=1",
    "trainer.media_every=1000",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export_run")
    threads = torch.get_num_threads()
    try:
        train(validate(compose_config([*TINY, "trainer.threads=1"], run_dir=run_dir)))
    finally:
        torch.set_num_threads(threads)
    return run_dir / "checkpoints" / "last.pt"


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    video = torch.rand(2, 3, 4, 64, 64) * 2 - 1  # (B, C, T, H, W)
    with torch.no_grad():
        recon, _ = model.reconstruct(video)
    return recon


def test_cli_round_trip_with_ema_weights(checkpoint, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "tokenizer.safetensors"
    cmd = [sys.executable, "-m", "worldmodel.export", str(checkpoint), str(out), "--ema"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tokenizer at step 3, ema weights" in done.stdout

    model, cfg, meta = load_exported(out)
    state = ckpt.load(checkpoint)
    assert meta["step"] == 3 and meta["weights"] == "ema" and meta["model_name"] == "tokenizer"
    assert meta["config"] == state["config"]  # the resolved run config, as JSON
    assert cfg.model.quantizer.levels == [8, 5, 5, 5]
    reference, _, _ = load_model(checkpoint, use_ema=True)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(_outputs(model), _outputs(reference))
    assert not model.training


def test_training_weights_differ_from_ema(checkpoint, tmp_path):
    torch.manual_seed(0)
    train_file = export(checkpoint, tmp_path / "train.safetensors")
    ema_file = export(checkpoint, tmp_path / "ema.safetensors", ema=True)
    trained, _, meta = load_exported(train_file)
    averaged, _, _ = load_exported(ema_file)
    state = ckpt.load(checkpoint)
    assert meta["weights"] == "train"
    for key, value in state["model"].items():
        assert torch.equal(trained.state_dict()[key], value), key
    # After 3 steps with decay 0.9 the EMA sits between the init and the weights: not equal.
    diff = (_outputs(trained) - _outputs(averaged)).abs().max().item()
    assert diff > 1e-4, diff


def test_missing_ema_and_foreign_files_are_refused(checkpoint, tmp_path):
    torch.manual_seed(0)
    state = ckpt.load(checkpoint)
    no_ema = tmp_path / "no_ema.pt"
    ckpt.atomic_save({**state, "ema": None}, no_ema)
    with pytest.raises(ckpt.CheckpointError, match="no EMA weights"):
        export(no_ema, tmp_path / "x.safetensors", ema=True)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a worldmodel export"):
        read_metadata(plain)

    # A crafted file whose config names something other than a model class is not built:
    # loading must never import and call what a downloaded file says.
    good = export(checkpoint, tmp_path / "good.safetensors")
    meta = read_metadata(good)
    config = meta["config"]
    config["model"] = {"_target_": "subprocess.run", "args": ["touch", str(tmp_path / "pwned")]}
    crafted = tmp_path / "crafted.safetensors"
    from safetensors.torch import load_file

    save_file(
        load_file(str(good)),
        str(crafted),
        metadata={**{k: str(v) for k, v in meta.items()}, "config": json.dumps(config)},
    )
    with pytest.raises(ValueError, match="only classes of worldmodel.models"):
        load_exported(crafted)
    assert not (tmp_path / "pwned").exists()
