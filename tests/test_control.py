"""Control metrics on a synthetic world: an IDM trained on real transitions, then two worlds.

The environment moves a bright square by two pixels in the direction of the action (0 = stay,
1 up, 2 down, 3 left, 4 right; the frame wraps around). The "oracle" world applies the same rule
to the commanded action; the "ignoring" world returns the previous frame whatever the action.
Control accuracy and ΔtPSNR must tell them apart: high for the oracle, chance and ~0 for the
world that ignores its actions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from worldmodel.eval.control import (
    control_accuracy,
    control_chance,
    control_hits,
    control_report,
    real_transition_accuracy,
    train_idm,
)
from worldmodel.eval.metrics import delta_psnr, psnr
from worldmodel.models.idm import InverseDynamicsModel

NUM_ACTIONS, SIZE, STEP = 5, 16, 2
SHIFTS = [(0, 0), (-STEP, 0), (STEP, 0), (0, -STEP), (0, STEP)]  # (dy, dx) per action


def environment(frames: Tensor, actions: Tensor) -> Tensor:
    """The true rule: each frame (B, 1, H, W) moved by its action's shift (wrapping)."""
    return torch.stack(
        [f.roll(SHIFTS[int(a)], dims=(-2, -1)) for f, a in zip(frames, actions)]
    )  # (B, 1, H, W)


def oracle_world(frames: Tensor, actions: Tensor) -> Tensor:
    return environment(frames, actions)


def ignoring_world(frames: Tensor, actions: Tensor) -> Tensor:
    return frames.clone()


def first_frames(n: int, gen: torch.Generator) -> Tensor:
    """(n, 1, H, W): a 3x3 square at a random place on a dark background, in [-1, 1]."""
    frames = torch.full((n, 1, SIZE, SIZE), -1.0)
    ys, xs = torch.randint(0, SIZE, (2, n), generator=gen)
    for i in range(n):
        frames[i, 0, :3, :3] = 1.0
        frames[i, 0] = frames[i, 0].roll((int(ys[i]), int(xs[i])), dims=(0, 1))
    return frames


class SquareClips(Dataset):
    """Clips {video (1, T, H, W), actions (T,), mask (T,)} of the environment, random actions."""

    def __init__(self, num_clips: int, length: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.actions = torch.randint(0, NUM_ACTIONS, (num_clips, length), generator=gen)
        frames = [first_frames(num_clips, gen)]
        for t in range(length - 1):
            frames.append(environment(frames[-1], self.actions[:, t]))
        self.video = torch.stack(frames, dim=2)  # (N, 1, T, H, W)

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        length = self.video.shape[2]
        return {
            "video": self.video[i],
            "actions": self.actions[i],
            "mask": torch.ones(length, dtype=torch.bool),
        }


def rollout(world, first: Tensor, actions: Tensor) -> Tensor:
    """Frames (B, 1, H, W) after `first` under actions (B, H) -> (B, 1, H, h, w)."""
    frames = [first]
    for t in range(actions.shape[1]):
        frames.append(world(frames[-1], actions[:, t]))
    return torch.stack(frames[1:], dim=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_idm() -> InverseDynamicsModel:
    return train_idm(SquareClips(256, 6, seed=0), NUM_ACTIONS, steps=120, seed=0)


def test_idm_loss_and_predict_shapes() -> None:
    torch.manual_seed(0)
    idm = InverseDynamicsModel(NUM_ACTIONS, in_channels=1, channels=8, hidden=16)
    clips = SquareClips(3, 4, seed=1)
    batch = {"video": clips.video, "actions": clips.actions.clone()}
    batch["actions"][0] = -1  # unknown actions are left out
    loss, metrics = idm.loss(batch)
    loss.backward()
    assert loss.ndim == 0 and set(metrics) == {"ce", "accuracy"}
    assert all(p.grad is not None for p in idm.parameters())
    pair = clips.video[:, :, :2]  # (B, C, 2, H, W) and (B, 2C, H, W) are the same input
    torch.testing.assert_close(idm(pair), idm(pair.transpose(1, 2).flatten(1, 2)))
    assert idm.predict(pair[:, :, 0], pair[:, :, 1]).shape == (3,)
    batch["actions"][:] = -1
    empty, _ = idm.loss(batch)
    assert empty.item() == 0.0 and empty.requires_grad


def test_train_idm_is_deterministic() -> None:
    clips = SquareClips(16, 4, seed=2)
    a = train_idm(clips, NUM_ACTIONS, steps=3, batch_size=8, seed=5, channels=8, hidden=16)
    b = train_idm(clips, NUM_ACTIONS, steps=3, batch_size=8, seed=5, channels=8, hidden=16)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not a.training


def test_control_chance() -> None:
    assert control_chance(torch.tensor([[0, 1, 1, -1], [2, 1, 0, 3]])) == pytest.approx(3 / 7)
    assert control_chance(torch.arange(5).repeat(4)) == pytest.approx(0.2)


def test_oracle_world_is_controllable_and_ignoring_world_is_not(trained_idm) -> None:
    test = SquareClips(64, 5, seed=1)
    horizon = test.video.shape[2] - 1
    gen = torch.Generator().manual_seed(7)
    commands = torch.randint(0, NUM_ACTIONS, (len(test), horizon), generator=gen)
    first = test.video[:, :, 0]
    real = test.video[:, :, 1:]
    true_actions = test.actions[:, :horizon]

    results = {}
    for name, world in [("oracle", oracle_world), ("ignoring", ignoring_world)]:
        generated = rollout(world, first, commands)  # (B, 1, H, h, w)
        prev = torch.cat([first[:, :, None], generated[:, :, :-1]], dim=2)
        report = control_report(trained_idm, test, prev, generated, commands)
        # ΔtPSNR: rollouts under the true actions minus under random actions, per horizon.
        under_true = rollout(world, first, true_actions)
        under_random = rollout(world, first, commands)
        delta = delta_psnr(
            psnr(under_true, real, reduction="none"), psnr(under_random, real, reduction="none")
        )
        results[name] = (report, delta)

    oracle, oracle_delta = results["oracle"]
    ignoring, ignoring_delta = results["ignoring"]
    chance = control_chance(commands)
    assert oracle["chance"] == ignoring["chance"] == chance < 0.3
    assert oracle["accuracy_real"] == ignoring["accuracy_real"] > 0.95  # the ceiling
    assert oracle["accuracy_generated"] > 0.95
    assert abs(ignoring["accuracy_generated"] - chance) < 0.1
    assert ignoring["accuracy_generated"] <= chance + 0.02
    assert (oracle_delta["mean"] > 10).all()  # dB; the true-action rollout is exact here
    assert (oracle_delta["mean"] - 3 * oracle_delta["stderr"] > 0).all()
    assert ignoring_delta["mean"].abs().max().item() == 0.0


def test_control_accuracy_flat_inputs_and_unknown_commands(trained_idm) -> None:
    clips = SquareClips(32, 2, seed=3)
    prev, nxt = clips.video[:, :, 0], clips.video[:, :, 1]
    actions = clips.actions[:, 0].clone()
    assert control_accuracy(trained_idm, prev, nxt, actions) > 0.9
    actions[:16] = -1  # left out, not counted as wrong
    assert control_accuracy(trained_idm, prev, nxt, actions) > 0.9
    assert real_transition_accuracy(trained_idm, clips) > 0.9
    with pytest.raises(ValueError, match="actions"):
        control_accuracy(trained_idm, prev, nxt, actions[:5])


def test_control_hits_per_transition(trained_idm) -> None:
    clips = SquareClips(8, 4, seed=4)
    prev, nxt = clips.video[:, :, :-1], clips.video[:, :, 1:]
    actions = clips.actions[:, :-1].clone()  # (B, T-1)
    actions[0, 1] = -1  # unknown: never a hit, left out of the accuracy
    hits = control_hits(trained_idm, prev, nxt, actions)
    assert hits.shape == actions.shape and hits.dtype == torch.bool and not hits[0, 1]
    known = actions >= 0
    assert control_accuracy(trained_idm, prev, nxt, actions) == pytest.approx(
        hits[known].double().mean().item()
    )
    wrong = (actions + 1) % NUM_ACTIONS  # a command the frames do not show
    assert control_hits(trained_idm, prev, nxt, wrong).double().mean() < 0.2
