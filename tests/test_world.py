"""The World: one object for a trained world, loaded from a checkpoint, a run folder or a world
file, played step by step, exported to one file and read back with the same frames."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, save_checkpoint
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_world_eval import DATA, DYNAMICS, TOKENIZER, build_world

from worldmodel.eval.runner import evaluate
from worldmodel.world import World, read_world_metadata, to_uint8_frame


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield build_world(tmp_path_factory.mktemp("world"))
    torch.set_num_threads(threads)


PROMPT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_a_world_steps_from_an_image_and_replays_after_reset(world) -> None:
    w = World.load(world.dynamics_true)
    w.configure(steps=2, temperature=1.0, seed=3)
    first = w.reset(PROMPT)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    frames = [w.step(a) for a in (7, 7, 1)]
    again = w.rollout([7, 7, 1])  # reset() without a prompt: same prompt, same random stream
    assert again.shape == (4, 64, 64, 3)
    assert all(np.array_equal(a, b) for a, b in zip(frames, again[1:]))
    other = w.rollout([1, 1, 1])
    assert not np.array_equal(other, again), "different actions gave the same frames"
    with pytest.raises(ValueError, match=r"action 15 is outside \[0, 15\)"):
        w.step(15)
    with pytest.raises(ValueError, match="one picture"):
        w.reset(np.zeros((2, 64, 64, 3), np.uint8))


def test_encode_and_decode_round_trip_shapes(world) -> None:
    w = World.load(world.dynamics_latent)
    tokens = w.encode(PROMPT[None])  # (1, h, w)
    assert tokens.shape == (1, *w.dynamics.grid)
    video = w.decode(tokens[:, None])
    assert video.shape == (1, 3, 1, 64, 64) and float(video.abs().max()) <= 1.0
    assert w.action_source == "latent" and w.lam is not None and w.num_actions == 4


@pytest.mark.parametrize("half", [False, True])
def test_an_exported_world_plays_like_its_checkpoint(world, tmp_path, half) -> None:
    w = World.load(world.dynamics_latent)
    w.true_to_model_actions = {7: 2, 1: 0}
    path = w.export(tmp_path / "world.safetensors", half=half)
    meta = read_world_metadata(path)
    text = json.dumps(meta["configs"])
    assert str(world.tokenizer) not in text and str(tmp_path) not in text  # no absolute paths
    # the frozen parts travel in the file: it still loads once their checkpoints are gone
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(path, moved)
    loaded = World.load(moved)
    assert loaded.lam is not None and loaded.true_to_model_actions == {7: 2, 1: 0}
    w.configure(steps=2, temperature=0.0)
    loaded.configure(steps=2, temperature=0.0)
    ref, got = w.rollout([0, 1, 2], PROMPT), loaded.rollout([0, 1, 2], PROMPT)
    if half:  # fp16 storage: close, not equal
        assert np.abs(ref.astype(int) - got.astype(int)).mean() < 8
    else:
        assert np.array_equal(ref, got)


def test_bad_world_files_get_a_clear_error(world, tmp_path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors world file"):
        World.load(junk)
    single = tmp_path / "single.safetensors"
    save_file({"x": torch.zeros(2)}, str(single), metadata={"format": "worldmodel-safetensors/1"})
    with pytest.raises(ValueError, match="not a world file"):
        World.load(single)
    with pytest.raises(FileNotFoundError, match="no such world file"):
        World.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a world model's checkpoint"):
        World.load(world.tokenizer)


def test_task_eval_takes_a_world_file(world, tmp_path) -> None:
    path = World.load(world.dynamics_true).export(tmp_path / "world.safetensors")
    cfg = world.config(path, "eval.batches=1", "eval.batch_size=2", run_dir=tmp_path / "eval")
    result = evaluate(cfg)
    assert result["kind"] == "world" and result["num_clips"] == 2
    assert np.isfinite(result["metrics"]["delta_psnr"])


def test_a_run_folder_with_a_world_file_loads_it_with_its_key_mapping(world, tmp_path) -> None:
    parts = World.load(world.dynamics_true)
    parts.true_to_model_actions = {1: 0, 7: 1}
    run = tmp_path / "run"
    run.mkdir()
    parts.export(run / "world.safetensors")
    assert World.load(run).true_to_model_actions == {1: 0, 7: 1}


def test_the_export_command_writes_a_world(world, tmp_path) -> None:
    out = tmp_path / "cli.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "worldmodel.world", str(world.dynamics_true), str(out), "--half"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and read_world_metadata(out)["dtype"] == "float16"


def test_a_refining_world_starts_from_its_prompt_and_decodes_from_the_last_frame(tmp_path):
    torch.manual_seed(0)
    cfg = compose_config(DATA)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    tokenizer = save_checkpoint({**TOKENIZER, "refiner_width": 8}, data, tmp_path / "tokenizer.pt")
    pipeline = {"tokenizer_checkpoint": str(tokenizer), "action_source": "true"}
    dyn = {**DYNAMICS, "vocab_size": 125, "num_actions": 15, "pipeline": pipeline}
    w = World.load(save_checkpoint(dyn, data, tmp_path / "dynamics.pt"))
    assert w.tokenizer.refines
    first = w.reset(PROMPT)
    assert np.array_equal(first, PROMPT)  # the prompt itself, not its coarse decoding
    frames = w.rollout([1, 2, 3])
    assert frames.shape == (4, 64, 64, 3)
    # a fresh refiner adds nothing: each frame equals its tokens' coarse decoding
    coarse = w.decode(w.state.tokens[:, 1:])
    assert np.array_equal(frames[-1], to_uint8_frame(coarse[0, :, -1]))
    with torch.no_grad():
        w.tokenizer.refiner.out.bias.fill_(0.5)  # a refiner that changes frames
    assert not np.array_equal(w.rollout([1, 2, 3])[-1], frames[-1])
