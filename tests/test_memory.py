"""The memory test for long rollouts (`worldmodel.eval.memory`, `eval.memory`, `eval.long_horizon`).

Return pairs are found in synthetic episodes the test writes as a real frame cache (a textured
view that scrolls away and back, one that stays put, one that comes back too soon); worlds that
remember and forget are scored on them; and a tiny real world (randomly initialised tokenizer and
dynamics model, saved as checkpoints) is evaluated end to end on real recorded CoinRun frames, its
eval.json read by the comparison table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, save_checkpoint
from omegaconf import OmegaConf
from test_world_eval import DATA, TOKENIZER

from worldmodel.config import instantiate, validate
from worldmodel.data.dataset import ClipDataset
from worldmodel.data.shards import CacheWriter
from worldmodel.eval import metrics as M
from worldmodel.eval.compare import plot, render
from worldmodel.eval.memory import (
    MemorySettings,
    ReturnPair,
    find_return_pairs,
    long_rollouts,
    score_returns,
)
from worldmodel.eval.runner import evaluate
from worldmodel.world import World

SIZE = 64
STEP = 3  # pixels the view scrolls per frame


def _texture(seed: int = 0) -> np.ndarray:
    """A random RGB texture (64, 192, 3) uint8: every horizontal shift of it is another view."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (SIZE, 3 * SIZE, 3), dtype=np.uint8)


def _views(texture: np.ndarray, xs: list[int]) -> np.ndarray:
    """Frames (T, 64, 64, 3): the texture seen from horizontal positions xs."""
    return np.stack([texture[:, x : x + SIZE] for x in xs])


def _go_and_come_back(lead: int, out: int, hold: int, tail: int) -> list[int]:
    """Positions of a view that stays `lead` frames, scrolls `out` frames right, holds, comes
    back and stays."""
    there = [STEP * t for t in range(out + 1)]
    return [0] * lead + there + [there[-1]] * hold + there[::-1][1:] + [0] * tail


EPISODES = {
    # frames 0-4 at the view, 5-12 away, 13-16 held, 17-24 back, 25-36 at the view again
    "returns": _go_and_come_back(lead=4, out=8, hold=4, tail=12),
    "stays": [0] * 40,  # never leaves: no pair
    "too_soon": _go_and_come_back(lead=0, out=2, hold=0, tail=10),  # 15 frames: gaps < 16
}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ClipDataset:
    """A real frame cache with the synthetic episodes in its test split (and one train frame)."""
    folder = tmp_path_factory.mktemp("memory-cache")
    writer = CacheWriter(folder, (SIZE, SIZE, 3))
    writer["train"].add_episode(_views(_texture(9), [0]), np.zeros(1, dtype=np.int64))
    writer["val"].add_episode(_views(_texture(9), [0]), np.zeros(1, dtype=np.int64))
    for k, (name, xs) in enumerate(EPISODES.items()):
        actions = np.full(len(xs), 7, dtype=np.int64)
        writer["test"].add_episode(_views(_texture(k), xs), actions, name=name)
    writer.finish({"source": "synthetic"}, num_actions=15)
    return ClipDataset(folder, "test", clip_length=1)


def _frames(split: ClipDataset) -> np.ndarray:
    return np.load(split.frames_path, mmap_mode="r")


def test_a_view_that_goes_and_comes_back_is_found_one_that_stays_is_not(split):
    settings = MemorySettings(context_frames=2, context_after=1)  # context: frames i, i + 1
    pairs = find_return_pairs(_frames(split), split.episodes, settings)
    names = [split.episodes[p.episode]["name"] for p in pairs]
    assert names == ["returns", "returns"]  # pairs_per_episode = 2; none that stays or is short
    xs = EPISODES["returns"]
    for p in pairs:
        assert xs[p.j] == xs[p.i] and p.mse == 0.0  # the same view
        assert xs[p.i + 1] != xs[p.i]  # of equal views, the last before it left
        assert (p.c0, p.c1) == (p.i, p.i + 1) and p.offset == split.episodes[0]["offset"]
        assert 16 <= p.gap <= 32 and p.j - p.c1 == p.gap
        assert max(xs[p.c1 + 1 : p.j]) > xs[p.i]  # the view left between
        assert p.away > settings.away_mse
    assert abs(pairs[1].j - pairs[0].j) >= settings.min_gap // 2  # two return events, not frames

    # the gap is respected both ways: a shorter minimum finds the quick return too
    short = MemorySettings(min_gap=4, max_gap=8, context_frames=2)
    found = find_return_pairs(_frames(split), split.episodes, short)
    assert "too_soon" in {split.episodes[p.episode]["name"] for p in found}
    assert all(4 <= p.gap <= 8 for p in found)
    assert "stays" not in {split.episodes[p.episode]["name"] for p in found}
    # more context before frame i: the pairs start later, frame i stays in the context
    later = find_return_pairs(_frames(split), split.episodes, MemorySettings(context_frames=6))
    assert later and all(p.c0 == p.i - 4 >= 0 and p.c1 == p.i + 1 for p in later)
    capped = MemorySettings(context_frames=2, max_pairs=1)
    assert len(find_return_pairs(_frames(split), split.episodes, capped)) == 1


def test_bad_memory_settings_are_named():
    with pytest.raises(ValueError, match="min_gap"):
        MemorySettings(min_gap=20, max_gap=10)
    with pytest.raises(ValueError, match="close_mse"):
        MemorySettings(close_mse=0.1, away_mse=0.01)
    with pytest.raises(ValueError, match="eval.memory.min_gapp"):
        MemorySettings.from_config({"enabled": True, "min_gapp": 3})
    cfg = compose_config(["eval.memory.enabled=true", "eval.memory.context_frames=1"])
    with pytest.raises(ValueError, match="eval.memory.context_frames=1"):
        validate(cfg)


def _video(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def test_a_world_that_remembers_scores_high_and_one_that_forgets_low(split):
    frames = _frames(split)
    pairs = find_return_pairs(frames, split.episodes, MemorySettings(context_frames=2))

    def remembers(batch: list[ReturnPair]):  # shows the old view again
        return _video(frames[[p.offset + p.i for p in batch]]), None

    def holds_last(batch: list[ReturnPair]):  # forgot: repeats the last frame it saw
        return _video(frames[[p.offset + p.c1 for p in batch]]), None

    def blank(batch: list[ReturnPair]):  # forgot everything
        return torch.zeros(len(batch), 3, SIZE, SIZE), None

    good = score_returns(pairs, frames, remembers)
    assert good["memory_pairs"] == 2 and good["memory_episodes"] == 1
    assert good["memory_psnr"] > 60 and good["memory_psnr"] == good["memory_copy_old_psnr"]
    assert good["memory_ssim"] == pytest.approx(1.0)
    for forgets in (holds_last, blank):
        bad = score_returns(pairs, frames, forgets)
        assert bad["memory_psnr"] < 15 and bad["memory_ssim"] < 0.2
        assert bad["memory_copy_old_psnr"] == good["memory_copy_old_psnr"]  # baselines: the data's
    # the last real frame the world saw is another view: copying it is no memory
    assert good["memory_copy_last_psnr"] < 15
    assert score_returns([], frames, blank) == {"memory_pairs": 0, "memory_episodes": 0}


def test_memory_stderr_is_clustered_by_episode(split):
    """Pairs of one episode share an error: the standard error counts episodes, not pairs."""
    frames = _frames(split)
    base = find_return_pairs(frames, split.episodes, MemorySettings(context_frames=2))[0]
    # six pairs from three episodes (the same frames, labelled as three episodes)
    pairs = [
        ReturnPair(e, base.offset, base.i, base.j, base.c0, base.c1, 0.0, 1.0)
        for e in (0, 0, 1, 1, 2, 2)
    ]
    noise = torch.tensor([0.10, 0.12, 0.30, 0.32, 0.50, 0.52])  # per pair, in [-1, 1] units

    def noisy(batch: list[ReturnPair]):
        real = _video(frames[[p.offset + p.j for p in batch]])
        signs = torch.where(
            torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0
        )
        return real.clamp(-0.4, 0.4) + signs * noise[: len(batch), None, None, None], None

    out = score_returns(pairs, frames, noisy, batch_size=6)
    real = _video(frames[[base.offset + base.j] * 6])
    generated, _ = noisy(pairs)
    mse = M.frame_mse(generated, real).double()  # (6,)
    episodes = np.array([0, 0, 1, 1, 2, 2])
    expected = 10 / math.log(10) * float(M.clustered_stderr(mse, episodes)) / float(mse.mean())
    assert out["memory_psnr"] == pytest.approx(float(M.psnr_from_mse(mse.mean())), abs=1e-4)
    assert out["memory_psnr_stderr"] == pytest.approx(expected, rel=1e-6)
    independent = (
        10 / math.log(10) * float(M.clustered_stderr(mse, np.arange(6))) / float(mse.mean())
    )
    assert out["memory_psnr_stderr"] != pytest.approx(independent, rel=1e-3)
    assert out["memory_episodes"] == 3


# ------------------------------------------------------------------------------------------------
# A tiny real world, evaluated end to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """A dynamics checkpoint (8-frame window, recorded actions) over a tiny tokenizer."""
    root = tmp_path_factory.mktemp("memory-world")
    torch.manual_seed(0)
    cfg = compose_config(DATA)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    instantiate(cfg.data).datasets()  # record the clips once
    tokenizer = save_checkpoint(TOKENIZER, data, root / "tokenizer.pt")
    dynamics = {
        "_target_": "worldmodel.models.dynamics.DynamicsModel",
        "name": "dynamics",
        "grid": [8, 8],
        "max_frames": 8,  # a window shorter than the 16-frame gaps: it cannot see the old view
        "dim": 32,
        "depth": 1,
        "heads": 2,
        "vocab_size": 125,
        "num_actions": 15,
        "pipeline": {"tokenizer_checkpoint": str(tokenizer), "action_source": "true"},
    }
    return save_checkpoint(dynamics, data, root / "dynamics.pt")


def _evaluate(checkpoint: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(
        [
            *DATA,
            f"checkpoint={checkpoint}",
            "eval.batches=1",
            "eval.batch_size=4",
            "eval.steps=2",
            "eval.temperature=0",
            "eval.control.enabled=false",
            *overrides,
        ],
        run_dir=run_dir,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        evaluate(validate(cfg))
    finally:
        torch.set_num_threads(threads)
    return json.loads((run_dir / "eval.json").read_text())


MEMORY_KEYS = (
    "memory_psnr",
    "memory_psnr_stderr",
    "memory_copy_old_psnr",
    "memory_copy_last_psnr",
    "memory_pairs",
    "memory_episodes",
    "rollout_psnr_changing_long",
    "copy_psnr_changing_long",
)


def test_eval_json_has_the_memory_test_when_enabled_and_compare_shows_it(tiny_world, tmp_path):
    run = tmp_path / "pipeline" / "dynamics"
    result = _evaluate(
        tiny_world, run, "eval.memory.enabled=true", "eval.long_horizon=12", "eval.long_clips=4"
    )
    m = result["metrics"]
    assert set(MEMORY_KEYS) <= set(m)
    # the real val episodes (4 of 75 frames) hold 3 returns 16-32 frames after the context
    assert m["memory_pairs"] == 3 and m["memory_episodes"] == 3
    assert 16 <= m["memory_gap_mean"] <= 32
    for key in ("memory_psnr", "memory_copy_old_psnr", "memory_copy_last_psnr"):
        assert 0 < m[key] < 110 and m[f"{key}_stderr"] > 0
    # an untrained world is far from the old view that copying frame i gives (> 30 dB)
    assert m["memory_copy_old_psnr"] > 30 > m["memory_psnr"]
    assert 0 < m["memory_tokenizer_psnr"] < 40
    assert len(m["rollout_psnr_changing_long"]) == len(m["copy_psnr_changing_long"]) == 12
    assert m["long_clips"] == 4 and m["long_context_frames"] == 1
    assert (run / result["media"]["long_rollout_psnr_plot"]).stat().st_size > 1000
    # the 8-frame figures do not move when the memory test is added
    plain = _evaluate(tiny_world, tmp_path / "plain")["metrics"]
    assert not set(MEMORY_KEYS) & set(plain) and "long_rollout_psnr_plot" not in plain
    assert plain["rollout_psnr"] == m["rollout_psnr"]

    # the comparison table of a pipeline run dir shows the memory column, the plots the curve
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").symlink_to(tiny_world)
    table = render(run.parent)
    assert "memory PSNR / copy old / copy last (dB)" in table
    row = next(line for line in table.splitlines() if line.startswith("| dynamics"))
    assert (
        f"{m['memory_psnr']:.2f} ± {m['memory_psnr_stderr']:.2f} / "
        f"{m['memory_copy_old_psnr']:.2f} / {m['memory_copy_last_psnr']:.2f} (3 pairs)"
    ) in row
    pictures = plot(run.parent, tmp_path / "plots")
    assert tmp_path / "plots" / "rollout_psnr_long.png" in pictures


def test_long_rollouts_longer_than_the_episodes_are_named(tiny_world):
    cfg = compose_config([*DATA, f"checkpoint={tiny_world}", "eval.long_horizon=200"])
    with pytest.raises(ValueError, match="eval.long_horizon=200 after 1 real frame"):
        long_rollouts(World.load(tiny_world), cfg, {"steps": 1})
