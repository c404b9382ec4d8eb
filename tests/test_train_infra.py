"""The loop's parts on their own: data order, checkpoints, schedules, EMA, process groups."""

from __future__ import annotations

import collections
import itertools
import os
import pickle

import pytest
import torch
from torch import nn

from worldmodel.train import checkpoint as ckpt
from worldmodel.train.dist import env_from_environment
from worldmodel.train.optim import EMA, LRSchedule
from worldmodel.train.sampler import ResumableSampler


def take(sampler: ResumableSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_a_function_of_the_batch_index():
    full = take(ResumableSampler(50, 8, seed=3), 8 * 20)
    for batch in (0, 1, 5, 6, 13):
        resumed = take(ResumableSampler(50, 8, seed=3, start_batch=batch), 8 * (20 - batch))
        assert resumed == full[8 * batch :]


def test_sampler_epochs_are_permutations_and_differ():
    s = ResumableSampler(48, 8, seed=0)
    first, second = take(s, 48), take(s, 96)[48:]
    assert sorted(first) == list(range(48)) and sorted(second) == list(range(48))
    assert first != second


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 2), (4, 1), (1, 4)])
def test_ranks_and_micro_batches_partition_the_global_batch(world, accum):
    single = take(ResumableSampler(64, 8, seed=1), 8 * 5)
    per_rank = [
        take(ResumableSampler(64, 8, accum, r, world, seed=1), 8 * 5 // world) for r in range(world)
    ]
    micro = 8 // (accum * world)
    rebuilt = []
    for step in range(5):
        for a in range(accum):
            for r in range(world):
                start = (step * accum + a) * micro
                rebuilt += per_rank[r][start : start + micro]
    assert rebuilt == single


def test_sampler_rejects_too_little_data():
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableSampler(5, 8)


def _state(step: int) -> dict:
    model = nn.Linear(3, 2)
    return {
        "model": model.state_dict(),
        "step": step,
        "rng": ckpt.rng_state(),
        "config": {"model": {"_target_": "torch.nn.Linear"}},
    }


def test_checkpoint_keeps_last_k_and_links_last(tmp_path):
    m = ckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        m.save(_state(step), step)
    assert [p.name for p in m.step_files()] == ["step_00000020.pt", "step_00000030.pt"]
    assert m.latest()["step"] == 30
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_last_falls_back_to_previous_good(tmp_path, caplog):
    m = ckpt.CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(10), 10)
    m.save(_state(20), 20)
    # A truncated last.pt (a kill during a copy by hand, a full disk elsewhere): unlink the hard
    # link first so the step file keeps its bytes.
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "step_00000020.pt").write_bytes(b"garbage")
    state = m.latest()
    assert state["step"] == 10
    assert "unusable checkpoint" in caplog.text


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    good = tmp_path / "c.pt"
    ckpt.atomic_save({"model": {}, "step": 1}, good)

    class Unwritable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="previous c.pt is intact"):
        ckpt.atomic_save({"model": {}, "bad": Unwritable()}, good)
    assert ckpt.load(good)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load(path)
    path.write_bytes(pickle.dumps({"model": {}})[:5])
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "missing.pt")


def test_incompatible_checkpoint_names_the_difference():
    state = {"model": nn.Linear(3, 2).state_dict(), "config": {"model": {"_target_": "X"}}}
    with pytest.raises(
        ckpt.CheckpointError, match=r"weight: checkpoint \(2, 3\) vs model \(4, 3\)"
    ):
        ckpt.check_compatible(state, nn.Linear(3, 4), "c.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing in checkpoint"):
        ckpt.check_compatible(state, nn.Sequential(nn.Linear(3, 2)), "c.pt")


def test_rng_state_round_trips_through_a_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    ckpt.atomic_save({"model": {}, "rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(ckpt.load(tmp_path / "r.pt")["rng"])
    # every generator is back where it was saved: its state, then what it draws next
    assert torch.equal(torch.get_rng_state(), saved[0])
    assert random.getstate() == saved[1]
    np_state = np.random.get_state()
    assert np_state[0] == saved[2][0] and np.array_equal(np_state[1], saved[2][1])
    assert np_state[2:] == saved[2][2:]
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_lr_schedule_warms_up_then_decays():
    f = LRSchedule(10, 100, "cosine", 0.1)
    values = [f.update(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert LRSchedule(0, 100, "constant").update(77) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule(0, 10, "linear")


def test_lr_schedule_under_a_budget_is_continuous_and_resumes_where_stored():
    # One step a second; warm-up takes 30 steps of a 100 s budget, the decay the 70 s left.
    def schedule() -> LRSchedule:
        return LRSchedule(30, 10_000, "cosine", 0.1, budget_s=100.0)

    f = schedule()
    values = [f.update(s, elapsed_s=float(s)) for s in range(101)]
    assert values[29] == pytest.approx(1.0) and values[30] == pytest.approx(1.0)
    # no jump when warm-up ends (counting the 30 s of warm-up against the decay dropped 0.19)
    assert max(a - b for a, b in zip(values, values[1:])) < 0.03
    assert values[100] == pytest.approx(0.1)  # the budget is used up: fully annealed
    stored = schedule()
    for s in range(61):
        stored.update(s, elapsed_s=float(s))
    resumed = schedule()
    resumed.load_state_dict(stored.state_dict())
    assert resumed.state_dict() == stored.state_dict()
    assert resumed.update(61, 61.0) == stored.update(61, 61.0) == values[61]


def test_ema_warms_up_tracks_and_swaps_back():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = EMA(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], start + 0.9)
    for _ in range(20):
        ema.update(model)  # the decay is 0.5 from the 9th update on
    assert torch.allclose(ema.shadow["weight"], start + 1.0, atol=1e-5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 1.5, atol=1e-5)
    restored = EMA(model, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == ema.updates == 22
    with ema.swapped_into(model):
        assert torch.allclose(model.weight, start + 1.5, atol=1e-5)
    assert torch.allclose(model.weight, start + 2.0)


def test_partial_distributed_environment_is_an_error():
    assert env_from_environment({}) is None
    with pytest.raises(RuntimeError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        env_from_environment({"RANK": "0"})
    env = env_from_environment(
        collections.OrderedDict(
            RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234"
        )
    )
    assert (env.rank, env.world_size, env.master_port) == (1, 2, 1234)
    assert env.local_world_size == 2  # no LOCAL_WORLD_SIZE: all ranks taken as on this machine
    env = env_from_environment(
        dict(
            RANK="5",
            WORLD_SIZE="8",
            LOCAL_RANK="1",
            LOCAL_WORLD_SIZE="4",
            MASTER_ADDR="h",
            MASTER_PORT="1234",
        )
    )
    assert (env.world_size, env.local_world_size) == (8, 4)
