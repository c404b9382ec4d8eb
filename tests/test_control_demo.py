"""Control accuracy as the demo measures it: commands held like the recording policy held its
actions, and the commanded x read confusion that says which commands a world fails.

The IDM's ceiling (its accuracy on real transitions) is measured on the recording policy's
actions, each held 1..max_action_repeat steps; commands scored against it are drawn the same way
(`held_commands`). These tests check the draw (uniform marginal, runs of 1..hold steps, hold=1 a
fresh draw every step), the confusion counts, and that a held command reaches the IDM's ceiling
on a world that follows it, and the play keys that send noop's latent action are flagged.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from test_world_eval import build_world

from worldmodel.eval import world as W
from worldmodel.eval.control import (
    control_accuracy,
    control_chance,
    control_confusion,
    control_hits,
    control_labels,
    held_commands,
)
from worldmodel.models.idm import InverseDynamicsModel
from worldmodel.play.keys import moves_like_noop, world_moves
from worldmodel.world import World, read_world_metadata

DEMO_WORLD = Path(__file__).parents[1] / "experiments" / "demo" / "world.safetensors"
MOVES = torch.tensor([1, 2, 4, 5, 7, 8])  # CoinRun's 6 distinct moves among procgen's 15 buttons


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal consecutive values of a 1-D tensor."""
    change = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(row)]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def test_held_commands_draw_from_allowed_with_uniform_marginal() -> None:
    gen = torch.Generator().manual_seed(0)
    commands = held_commands(MOVES, (4000, 8), 4, gen)  # (B, T)
    assert commands.shape == (4000, 8) and commands.dtype == torch.long
    counts = torch.bincount(commands.flatten(), minlength=15)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(MOVES.tolist())
    share = counts[MOVES].double() / commands.numel()
    assert torch.allclose(share, torch.full_like(share, 1 / 6), atol=0.015)
    # every step's marginal stays uniform too (the first and the last step)
    for t in (0, 7):
        step = torch.bincount(commands[:, t], minlength=15)[MOVES].double() / 4000
        assert torch.allclose(step, torch.full_like(step, 1 / 6), atol=0.03)


def test_held_commands_repeat_like_the_recording_policy() -> None:
    gen = torch.Generator().manual_seed(1)
    held = held_commands(MOVES, (2000, 8), 4, gen)
    fresh = held_commands(MOVES, (2000, 8), 1, gen)
    repeat_held = float((held[:, 1:] == held[:, :-1]).double().mean())
    repeat_fresh = float((fresh[:, 1:] == fresh[:, :-1]).double().mean())
    # a fresh draw repeats the previous one 1/6 of the time; runs of 1..4 steps (mean 2.5) end
    # at ~0.4 of the steps and a new draw repeats 1/6 of those: ~2/3 of the steps repeat
    assert abs(repeat_fresh - 1 / 6) < 0.02
    assert 0.6 < repeat_held < 0.75
    # a draw is never kept longer than `hold` steps (a run longer than 4 is two equal draws)
    gen = torch.Generator().manual_seed(2)
    distinct = held_commands(torch.arange(1000), (200, 16), 4, gen)  # draws rarely collide
    lengths = [n for row in distinct for n in _runs(row)]
    assert max(lengths) <= 4 and min(lengths) >= 1
    inner = [n for row in distinct for n in _runs(row)[1:-1]]  # runs cut by neither clip end
    assert sorted(set(inner)) == [1, 2, 3, 4]


def test_held_commands_are_seeded_and_check_their_arguments() -> None:
    first = held_commands(MOVES, (3, 10), 4, torch.Generator().manual_seed(5))
    again = held_commands(MOVES, (3, 10), 4, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="hold must be >= 1"):
        held_commands(MOVES, (2, 4), 0, torch.Generator())
    with pytest.raises(ValueError, match="no allowed action"):
        held_commands(MOVES[:0], (2, 4), 2, torch.Generator())


def test_control_confusion_counts_commanded_by_read() -> None:
    commands = torch.tensor([[1, 1, 4, -1], [7, 7, 7, 4]])
    labels = torch.tensor([[1, 4, 4, 2], [7, 8, -1, 4]])
    confusion = control_confusion(commands, labels, 15)
    assert confusion.shape == (15, 15) and confusion.dtype == torch.long
    assert int(confusion.sum()) == 6  # the unknown command and the unread label are left out
    assert confusion[1, 1] == 1 and confusion[1, 4] == 1 and confusion[4, 4] == 2
    assert confusion[7, 7] == 1 and confusion[7, 8] == 1
    # its diagonal share is the control accuracy over the same transitions
    assert float(confusion.diag().sum() / confusion.sum()) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="4 commands but 3 labels"):
        control_confusion(torch.zeros(4), torch.zeros(3), 15)


class _ShiftWorld:
    """A 1-D CoinRun stand-in: each move shifts a bright column by its own number of pixels,
    so a frame pair shows its move; the IDM used below reads the shift back exactly."""

    SHIFT = {1: -2, 2: -1, 4: 0, 5: 1, 7: 2, 8: 3}

    def frames(self, commands: torch.Tensor) -> torch.Tensor:
        """(B, 1, T + 1, 16, 16) in [-1, 1] driven by commands (B, T)."""
        b, t = commands.shape
        x = torch.full((b,), 6, dtype=torch.long)
        video = torch.full((b, 1, t + 1, 16, 16), -1.0)
        video[torch.arange(b), 0, 0, :, x] = 1.0
        for j in range(t):
            x = x + torch.tensor([self.SHIFT[int(a)] for a in commands[:, j]])
            x = x.clamp(0, 15)
            video[torch.arange(b), 0, j + 1, :, x] = 1.0
        return video


class _ShiftIDM(InverseDynamicsModel):
    """Reads the column's shift from a frame pair (the rule of `_ShiftWorld`, no training)."""

    def __init__(self) -> None:
        super().__init__(15, in_channels=1)
        self.by_shift = {s: a for a, s in _ShiftWorld.SHIFT.items()}

    def predict(self, frames_t: torch.Tensor, frames_t1: torch.Tensor) -> torch.Tensor:
        col_t = frames_t[:, 0, 0].argmax(dim=-1)
        col_t1 = frames_t1[:, 0, 0].argmax(dim=-1)
        return torch.tensor([self.by_shift.get(int(d), 4) for d in col_t1 - col_t])


def test_held_commands_on_a_world_that_follows_them() -> None:
    """A world that follows every command is read back at the IDM's ceiling (here 1 away from
    the walls); one that ignores them stays near chance whether commands are held or not."""
    world, idm = _ShiftWorld(), _ShiftIDM()
    gen = torch.Generator().manual_seed(3)
    for hold in (1, 4):
        commands = held_commands(MOVES, (64, 3), hold, gen)  # (B, T): 3 steps stay off the walls
        video = world.frames(commands)
        prev, nxt = video[:, :, :-1], video[:, :, 1:]
        assert control_accuracy(idm, prev, nxt, commands) == 1.0
        labels = control_labels(idm, prev, nxt, commands)
        assert torch.equal(labels == commands, control_hits(idm, prev, nxt, commands))
        confusion = control_confusion(commands, labels, 15)
        assert int(confusion.sum()) == commands.numel() == int(confusion.diag().sum())
        # the world that ignores its commands: the frame stays, the IDM reads "noop" (4)
        still = video[:, :, :1].expand(-1, -1, 3, -1, -1)
        ignored = control_accuracy(idm, still, still, commands)
        assert abs(ignored - float((commands == 4).double().mean())) < 1e-9
        assert ignored <= control_chance(commands) + 1e-9


def _world_like(path: Path) -> SimpleNamespace:
    """What `world_moves` reads of a world, from an exported world file's metadata (no weights
    loaded): its action source, key mapping, action count and config."""
    meta = read_world_metadata(path)
    mapping = {int(k): int(v) for k, v in meta["true_to_model_actions"].items()}
    config = OmegaConf.create(meta["configs"]["dynamics"])
    return SimpleNamespace(
        action_source=meta["action_source"],
        true_to_model_actions=mapping,
        num_actions=int(config.model.num_actions),
        config=config,
    )


def test_demo_world_flags_the_keys_that_send_noops_code() -> None:
    """The shipped demo world's key mapping: a key whose latent action is noop's is flagged
    (`as_noop`, `moves_like_noop`), every other key is not."""
    world = _world_like(DEMO_WORLD)
    moves = world_moves(world)
    noop = moves["noop"]["model"]
    same = sorted(k for k, m in moves.items() if k != "noop" and m["model"] == noop)
    assert sorted(moves_like_noop(world)) == same
    assert all(m["as_noop"] == (k in same) for k, m in moves.items())


def test_no_move_is_noop_on_a_world_of_recorded_actions() -> None:
    world = _world_like(DEMO_WORLD)
    world.action_source, world.true_to_model_actions, world.num_actions = "true", {}, 15
    moves = world_moves(world)
    assert moves["left"]["model"] == 1 and moves["noop"]["model"] == 4
    assert moves_like_noop(world) == []
    # keys without a "noop" movement flag nothing
    assert moves_like_noop(world, {"a": 1, "b": 1}) == []


def test_evaluate_dynamics_holds_commands_and_reports_the_confusion(tmp_path) -> None:
    """`eval.control.hold=4` reaches the world evaluation: eval.json's metrics say how commands
    were held and carry the commanded x read confusion, whose diagonal share is the accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        world = build_world(tmp_path / "world")  # an untrained tiny world on real CoinRun clips
        cfg = world.config(
            world.dynamics_true,
            "eval.batches=1",
            "eval.batch_size=4",
            "eval.control.steps=4",
            "eval.control.batch_size=32",
            "eval.control.hold=4",
            run_dir=tmp_path,
        )
        metrics, _, n = W.evaluate_dynamics(World.load(cfg.checkpoint), cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert metrics["control_hold"] == 4
    # chance by construction: 1 / the actions the recording took (at most procgen's 15); the
    # draw's most frequent share is never below it
    uniform = metrics["control_chance_uniform"]
    assert 1 / 15 <= uniform <= 1 / 2 and float(1 / uniform).is_integer()
    assert metrics["control_chance"] >= uniform - 1e-9
    confusion = torch.tensor(metrics["control_confusion"])
    assert confusion.shape == (15, 15)
    assert int(confusion.sum()) == n * 8  # every commanded transition of the 8-frame rollouts
    accuracy = float(confusion.diag().sum() / confusion.sum())
    assert accuracy == pytest.approx(metrics["control_accuracy"])
