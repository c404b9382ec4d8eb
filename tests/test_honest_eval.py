"""Honest world evaluation: baselines on the frames that change, errors clustered by episode,
ΔtPSNR against two baselines, control accuracy through a cached IDM.

The world is the tiny, randomly initialised one of `test_world_eval.py` on its real recorded
CoinRun clips (4 validation episodes of 75 frames); the checks are about what is reported and how
it is computed, not about how good an untrained world is.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from test_world_eval import DATA, TinyWorld, build_world
from torch.utils.data import Dataset

from worldmodel.config import instantiate
from worldmodel.data.dataset import ClipDataset, val_subset
from worldmodel.eval import control as C
from worldmodel.eval import metrics as M
from worldmodel.eval import world as W
from worldmodel.world import World

HORIZON = 8  # eval.horizon default: the 10-frame clips hold 1 context + 8 frames
CURVES = (
    "rollout_psnr",
    "rollout_psnr_changing",
    "rollout_psnr_random_changing",
    "copy_psnr_changing",
    "copy_previous_psnr_changing",
    "changing_fraction_curve",
    "delta_psnr_curve",
    "delta_psnr_curve_stderr",
    "delta_psnr_vs_other_clip_curve",
    "delta_psnr_vs_other_clip_curve_stderr",
)
SCALARS = (
    "delta_psnr",
    "delta_psnr_stderr",
    "delta_psnr_vs_other_clip",
    "delta_psnr_vs_other_clip_stderr",
    "control_accuracy",
    "control_accuracy_stderr",
    "control_accuracy_real",
    "control_chance",
    "changing_fraction",
    "next_frame_psnr_changing",
    "next_frame_copy_psnr_changing",
    "psnr",
    "tokenizer_psnr",
    "gen_fps",
    "temperature",
    "steps",
)
# a few IDM steps: these tests check the plumbing, not the IDM
SMALL = (
    "eval.batches=2",
    "eval.batch_size=4",
    "eval.control.steps=4",
    "eval.control.batch_size=32",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[TinyWorld]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield build_world(tmp_path_factory.mktemp("world"))
    torch.set_num_threads(threads)


def _finite(value) -> bool:
    return all(math.isfinite(v) for v in np.ravel(value))


@pytest.mark.parametrize("source", ["true", "latent"])
def test_evaluate_dynamics_reports_honest_metrics(world, tmp_path, monkeypatch, source):
    calls = []

    def spy(psnr_actions, psnr_baseline, clusters=None):
        calls.append((psnr_actions, psnr_baseline, clusters))
        return M.paired_difference(psnr_actions, psnr_baseline, clusters)

    monkeypatch.setattr(M, "delta_psnr", spy)
    checkpoint = world.dynamics_true if source == "true" else world.dynamics_latent
    cfg = world.config(checkpoint, *SMALL, "eval.temperature=0.5", run_dir=tmp_path)
    metrics, media, n = W.evaluate_dynamics(World.load(cfg.checkpoint), cfg, tmp_path)

    assert n == 8
    for key in CURVES:
        assert len(metrics[key]) == HORIZON and _finite(metrics[key]), key
    for key in SCALARS:
        assert _finite(metrics[key]), key
    assert metrics["action_source"] == source
    assert metrics["temperature"] == 0.5 and metrics["steps"] == 8
    assert "copy_last_psnr" not in metrics  # the floored per-frame mean it inflated is gone
    # at horizon 1 the context frame is the previous real frame: both baselines agree
    assert metrics["copy_psnr_changing"][0] == metrics["copy_previous_psnr_changing"][0]
    # an untrained world is far below copying the previous real frame where frames change
    assert metrics["next_frame_copy_psnr_changing"] > metrics["next_frame_psnr_changing"] + 5
    assert all(
        copy > model + 1
        for copy, model in zip(metrics["copy_psnr_changing"], metrics["rollout_psnr_changing"])
    )
    assert 0 < metrics["changing_fraction"] <= 1
    for key in ("control_accuracy", "control_accuracy_real", "control_chance"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["control_chance"] >= 1 / 15  # commands drawn over CoinRun's 15 actions
    assert metrics["delta_psnr_t4"] == metrics["delta_psnr"]

    # the standard errors are clustered by episode: the 8 evenly spread clips of the 28
    # validation clips come from the 4 episodes, two each
    pixels = W.pixel_val(cfg.data)
    indices = val_subset(pixels, 8).indices
    episodes = W.clip_episodes(pixels, indices)
    assert episodes.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert metrics["delta_psnr_clusters"] == 4 and metrics["delta_psnr_clips"] == 8
    (inferred, random, clusters), (_, other, other_clusters) = calls
    np.testing.assert_array_equal(clusters, episodes)
    np.testing.assert_array_equal(other_clusters, episodes)
    expected = M.clustered_stderr(inferred - random, episodes)
    assert metrics["delta_psnr_curve_stderr"] == pytest.approx(expected.tolist())
    assert metrics["delta_psnr_stderr"] == pytest.approx(float(expected[3]))
    naive = (inferred - random).double().std(dim=0) / math.sqrt(8)
    assert metrics["delta_psnr_curve_stderr"] != pytest.approx(naive.tolist())
    expected_other = M.clustered_stderr(inferred - other, episodes)
    assert metrics["delta_psnr_vs_other_clip_curve_stderr"] == pytest.approx(
        expected_other.tolist()
    )
    assert Path(media["rollout_psnr_plot"]).is_file() and Path(media["delta_psnr_plot"]).is_file()


def test_control_keys_are_left_out_without_true_actions(world, tmp_path, caplog):
    cfg = world.config(world.dynamics_true, *SMALL, run_dir=tmp_path)
    parts = World.load(cfg.checkpoint)
    no_actions = SimpleNamespace(num_actions=None)
    with caplog.at_level(logging.INFO, logger="worldmodel.eval.world"):
        assert W._control_setup(parts, cfg, no_actions, None) is None
    assert "the data has no true actions" in caplog.text

    off = world.config(world.dynamics_true, *SMALL, "eval.control.enabled=false", run_dir=tmp_path)
    metrics, _, _ = W.evaluate_dynamics(parts, off, tmp_path)
    assert not any(key.startswith("control_") for key in metrics)
    assert _finite(metrics["delta_psnr_stderr"])


def test_latent_world_commands_go_through_the_true_to_code_mapping(world, tmp_path):
    cfg = world.config(world.dynamics_latent, *SMALL, run_dir=tmp_path)
    parts = World.load(cfg.checkpoint)
    pixels = W.pixel_val(cfg.data)
    tokens = W.token_val(parts, pixels)
    _, mapping = W.true_action_mapping(pixels, tokens, parts.num_actions, onsets=True)
    control = W._control_setup(parts, cfg, pixels, tokens)
    assert not control.shared  # random codes and mapped commands are separate rollouts
    table = control.table.cpu().tolist()
    assert {a: c for a, c in enumerate(table) if c >= 0} == mapping

    parts.true_to_model_actions = {0: 1, 3: 2}  # a world that brings its own mapping
    control = W._control_setup(parts, cfg, pixels, tokens)
    assert control.table.cpu().tolist() == [1, -1, -1, 2] + [-1] * 11
    gen = torch.Generator().manual_seed(0)
    assert set(control.draw((100,), gen).tolist()) == {0, 3}


def test_commands_are_drawn_from_the_actions_the_data_recorded(world, tmp_path):
    cfg = world.config(world.dynamics_true, *SMALL, run_dir=tmp_path)
    parts = World.load(cfg.checkpoint)
    pixels = W.pixel_val(cfg.data)
    train = instantiate(cfg.data).datasets()[0]
    recorded = set(np.unique(np.load(train.actions_path)).tolist())
    # the world takes all 15 buttons; commands only those the recording policy pressed
    control = W._control_setup(parts, cfg, pixels, None)
    table = control.table.cpu().tolist()
    assert {a for a, c in enumerate(table) if c >= 0} == recorded
    assert all(table[a] == a for a in recorded)
    gen = torch.Generator().manual_seed(0)
    assert set(control.draw((2000,), gen).tolist()) == recorded
    # a mapping that names an action the data never holds leaves it out
    never = next(a for a in range(15) if a not in recorded) if len(recorded) < 15 else None
    if never is not None:
        parts.action_source = "latent"
        parts.true_to_model_actions = {never: 0, min(recorded): 1, max(recorded): 2}
        control = W._control_setup(parts, cfg, pixels, None)
        assert {a for a, c in enumerate(control.table.tolist()) if c >= 0} == {
            min(recorded),
            max(recorded),
        }


def test_clip_episodes_maps_clip_starts_to_their_episode() -> None:
    clips = SimpleNamespace(
        episodes=[{"offset": 50, "length": 30}, {"offset": 0, "length": 50}],  # any order
        starts=np.array([0, 10, 40, 50, 70]),
    )
    assert W.clip_episodes(clips, [0, 2, 3, 4]).tolist() == [1, 1, 0, 0]


def test_command_transitions_pair_each_command_with_its_frames() -> None:
    video = torch.arange(6.0).reshape(1, 1, 6, 1, 1)  # frame t holds the value t
    # per-frame tokens: commands 0..2 lead from frame 2 (the last context frame) to 10, 11, 12
    generated = torch.tensor([10.0, 11.0, 12.0]).reshape(1, 1, 3, 1, 1)
    before, after = W._command_transitions(video, generated, start=3, k=1, horizon=3)
    assert before.flatten().tolist() == [2, 10, 11] and after.flatten().tolist() == [10, 11, 12]
    # 2 pixel frames per latent frame: a command leads to the first frame of its latent frame
    generated = torch.tensor([10.0, 11.0, 12.0, 13.0]).reshape(1, 1, 4, 1, 1)
    before, after = W._command_transitions(video, generated, start=3, k=2, horizon=2)
    assert before.flatten().tolist() == [2, 11] and after.flatten().tolist() == [10, 12]


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"actions": torch.full((3,), i), "video": torch.zeros(1), "tokens": torch.zeros(1)}


def test_eval_clips_take_other_actions_from_the_next_scored_clip() -> None:
    items = _Items(10)
    clips = W.EvalClips(W.PairedClips(items, items), [1, 4, 9])
    assert len(clips) == 3
    assert [int(clips[i]["actions"][0]) for i in range(3)] == [1, 4, 9]
    assert [int(clips[i]["other_actions"][0]) for i in range(3)] == [4, 9, 1]
    assert "true_actions" in clips[0]


def test_cached_idm_trains_once_per_data_and_settings(tmp_path, monkeypatch) -> None:
    train = instantiate(compose_config(DATA).data).datasets()[0]
    folder = tmp_path / "data"  # a copy: the session's cache may already hold an IDM
    shutil.copytree(train.folder, folder, ignore=shutil.ignore_patterns("tokens-*", "idm-*"))
    clips = ClipDataset(folder, "train", train.clip_length, train.frame_stride, train.clip_stride)
    assert len(C.transition_clips(clips)) == train.num_frames - train.num_episodes

    kwargs = {"steps": 3, "batch_size": 16, "channels": 8, "hidden": 16}
    first = C.cached_idm(clips, 15, **kwargs)
    saved = list(folder.glob("idm-*.pt"))
    assert len(saved) == 1 and not list(folder.glob(".idm-*"))  # written atomically

    def fail(*args, **kwargs):
        raise AssertionError("the cached IDM was trained again")

    monkeypatch.setattr(C, "train_idm", fail)
    again = C.cached_idm(clips, 15, **kwargs)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not again.training
    monkeypatch.undo()
    C.cached_idm(clips, 15, **{**kwargs, "steps": 4})  # other settings: another IDM
    assert len(list(folder.glob("idm-*.pt"))) == 2
    # max_epochs caps the steps on a small split: 0.01 passes over 296 transitions is 1 step
    steps_trained: list[int] = []

    def record(pairs, num_actions, steps, *args, **kwargs):
        steps_trained.append(steps)
        return first

    monkeypatch.setattr(C, "train_idm", record)
    C.cached_idm(clips, 15, **{**kwargs, "steps": 1000}, max_epochs=0.01)
    assert steps_trained == [1]


def test_eval_control_settings_in_the_config() -> None:
    control = OmegaConf.to_container(compose_config([]).eval.control)
    assert control["enabled"] is True and control["steps"] > 0 and control["batch_size"] > 0
