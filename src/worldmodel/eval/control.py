"""Control accuracy: does a world model do what its actions say? Read back with an IDM.

An inverse-dynamics model (`models.idm.InverseDynamicsModel`) is trained on real transitions of
the data (`train_idm`). It then labels transitions the world model generated under commanded
actions; the share it labels with the commanded action is the control accuracy. Three numbers
are reported together (`control_report`):

- accuracy_real: the IDM on real held-out transitions, the ceiling (actions with the same
  effect, e.g. CoinRun's several "no-op"s, keep it below 1).
- accuracy_generated: the IDM on generated transitions.
- chance: the share of the most frequent commanded action (`control_chance`). When commands
  are drawn independently of the frames (random commands, the recommended protocol), no
  predictor that looks only at frames can expect to beat it, and a world that ignores its
  actions scores about this much. For uniformly random commands it is about 1 / num_actions
  (slightly above, by sampling noise).

Commands (`held_commands`): uniform draws from the actions the recording took, each held for
1..`eval.control.hold` steps. The ceiling is measured on the recording policy's transitions, and
where actions have inertia (CoinRun) a transition shows the previous action too, so commands are
drawn the way the recording drew its actions (hold = its `data.max_action_repeat`); hold = 1 is a
fresh draw every step, against which the same IDM reads real transitions much less often.
`control_confusion` counts commanded x read actions: which commands a world renders as which.

Transitions: generated frame t of a rollout follows `prev_frames[:, :, t]` (the last context
frame for the first generated frame, then the previous generated frame) under command
`commanded_actions[:, t]`.

`cached_idm` trains the IDM of a recorded data set once, on every transition of its train split
(at the split's frame stride, so it reads the same steps the clips hold), and keeps it beside the
data cache as `idm-<hash of the settings>.pt`: later evaluations of any model on that data load it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from worldmodel.data.dataset import ClipDataset
from worldmodel.data.shards import params_hash
from worldmodel.metrics import RunningMeans
from worldmodel.models.idm import InverseDynamicsModel

log = logging.getLogger(__name__)

# Bumped when the IDM or its training changes, so older cached IDMs are not reused.
IDM_VERSION = 1


def train_idm(
    train_clips: Dataset,
    num_actions: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> InverseDynamicsModel:
    """Train an IDM on the real transitions of a clip dataset with AdamW; deterministic.

    Args:
        train_clips: items {video: (C, T, H, W) in [-1, 1], actions: (T,) long, optional mask};
            every transition t -> t+1 with a known action is a training example.
        num_actions: size of the action set.
        steps: optimizer steps (the data is cycled, reshuffled each pass).
        batch_size, lr, weight_decay: clips per step and AdamW's settings (constant rate).
        seed: seeds the initialisation and the shuffling; the caller's global RNG is untouched.
        model_kwargs: passed to `InverseDynamicsModel` (in_channels is read from the data).
    Returns:
        The trained model, in eval mode.
    """
    in_channels = int(train_clips[0]["video"].shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InverseDynamicsModel(num_actions, in_channels=in_channels, **model_kwargs)
    model.to(device).train()
    loader = DataLoader(
        train_clips,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_clips) >= batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    means = RunningMeans()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    with torch.enable_grad():  # also when called from inside a no_grad evaluation
        for step, batch in zip(range(steps), batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, metrics = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= steps - 20:  # the last steps' training loss and accuracy, for the log
                means.update(metrics)
    log.info("IDM after %d steps: %s", steps, means.result())
    return model.eval()


def transition_clips(clips: ClipDataset) -> ClipDataset:
    """Every transition of a clip dataset's split as a clip of 2 frames, `frame_stride` apart
    like the frames of `clips` (the pairs an IDM trained for those clips has to read)."""
    return ClipDataset(clips.folder, clips.split, 2, clips.frame_stride, clip_stride=1)


def cached_idm(
    train_clips: ClipDataset,
    num_actions: int,
    steps: int,
    batch_size: int = 128,
    max_epochs: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> InverseDynamicsModel:
    """The IDM of a recorded split: loaded from its data cache folder, or trained and saved there.

    Trained with `train_idm` on every transition of the split (`transition_clips`), `batch_size`
    transitions a step, for `steps` steps but at most `max_epochs` passes over them (a tiny data
    set is not trained for hundreds of epochs). The file is `<clips folder>/idm-<hash>.pt`, the
    hash over these settings and the split, so a change of any of them trains a new one; it is a
    state dict written to a temporary file and renamed (a reader never sees half a file) and is
    loaded with `weights_only=True`.

    Returns:
        The IDM on `device`, in eval mode.
    """
    pairs = transition_clips(train_clips)
    if len(pairs) == 0:
        raise ValueError(f"{train_clips.folder}/{train_clips.split} holds no transition")
    if max_epochs is not None:
        steps = min(steps, max(1, math.ceil(max_epochs * len(pairs) / batch_size)))
    in_channels = int(train_clips.channels)
    settings = {
        "version": IDM_VERSION,
        "split": train_clips.split,
        "frames": train_clips.num_frames,
        "frame_stride": train_clips.frame_stride,
        "num_actions": num_actions,
        "in_channels": in_channels,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "model": model_kwargs,
    }
    path = Path(train_clips.folder) / f"idm-{params_hash(settings)}.pt"
    if path.is_file():
        model = InverseDynamicsModel(num_actions, in_channels=in_channels, **model_kwargs)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("IDM loaded from %s", path)
        return model.to(device).eval()
    log.info("training an IDM on %d transitions of %s (%d steps)", len(pairs), pairs, steps)
    model = train_idm(
        pairs, num_actions, steps, batch_size, seed=seed, device=device, **model_kwargs
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    log.info("IDM saved to %s", path)
    return model


def _pairs(
    prev_frames: Tensor, next_frames: Tensor, actions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, T, H, W) x2 and (B, T), or (B, C, H, W) x2 and (B,) -> frames (N, C, H, W) x2 and
    actions (N,) on the frames' device, every transition kept."""
    if prev_frames.shape != next_frames.shape:
        raise ValueError(f"frames differ: {tuple(prev_frames.shape)} {tuple(next_frames.shape)}")
    if prev_frames.ndim == 5:
        prev_frames = rearrange(prev_frames, "B C T H W -> (B T) C H W")
        next_frames = rearrange(next_frames, "B C T H W -> (B T) C H W")
    if actions.numel() != prev_frames.shape[0]:
        raise ValueError(
            f"{actions.numel()} actions for {prev_frames.shape[0]} transitions (actions must be "
            f"(B, T) for (B, C, T, H, W) frames, (B,) for (B, C, H, W))"
        )
    return prev_frames, next_frames, actions.reshape(-1).to(prev_frames.device)


def _flatten_transitions(
    prev_frames: Tensor, next_frames: Tensor, actions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`_pairs` with the transitions of unknown actions (< 0) dropped."""
    prev, nxt, actions = _pairs(prev_frames, next_frames, actions)
    keep = actions >= 0
    return prev[keep], nxt[keep], actions[keep]


@torch.no_grad()
def control_labels(
    idm: InverseDynamicsModel,
    prev_frames: Tensor,
    next_frames: Tensor,
    actions: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """The action the IDM reads from each transition, long of the shape of `actions` ((B, T)
    for frames (B, C, T, H, W), (B,) for (B, C, H, W)), on the CPU; -1 where the action is
    unknown (< 0)."""
    prev, nxt, flat = _pairs(prev_frames, next_frames, actions)
    keep = flat >= 0
    labels = torch.full(flat.shape, -1, dtype=torch.long, device=flat.device)
    if bool(keep.any()):
        idm.eval()
        device = next(idm.parameters()).device
        chunks = zip(prev[keep].split(batch_size), nxt[keep].split(batch_size))
        read = torch.cat([idm.predict(p.to(device), n.to(device)) for p, n in chunks])
        labels[keep] = read.to(flat.device)
    return labels.reshape(actions.shape).cpu()


@torch.no_grad()
def control_hits(
    idm: InverseDynamicsModel,
    prev_frames: Tensor,
    next_frames: Tensor,
    actions: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """Whether the IDM labels each transition with its action: bool of the shape of `actions`
    ((B, T) for frames (B, C, T, H, W), (B,) for (B, C, H, W)), on the CPU; False where the
    action is unknown (< 0). Per-clip rows give per-clip accuracies (for clustered errors)."""
    labels = control_labels(idm, prev_frames, next_frames, actions, batch_size)
    return (labels >= 0) & (labels == actions.reshape(labels.shape).cpu())


def control_accuracy(
    idm: InverseDynamicsModel,
    prev_frames: Tensor,
    generated_frames: Tensor,
    commanded_actions: Tensor,
    batch_size: int = 256,
) -> float:
    """Share of transitions the IDM labels with the commanded action.

    Args:
        idm: a trained `InverseDynamicsModel`.
        prev_frames, generated_frames: (B, C, T, H, W) (or (B, C, H, W)): the frame each command
            was applied to and the frame that followed (real or generated).
        commanded_actions: (B, T) (or (B,)) long; negative entries are left out.
    Returns:
        Accuracy in [0, 1]; nan when no transition has a known action.
    """
    hits = control_hits(idm, prev_frames, generated_frames, commanded_actions, batch_size)
    known = commanded_actions.reshape(-1).cpu() >= 0
    if not bool(known.any()):
        return float("nan")
    return float(hits.reshape(-1)[known].double().mean())


def held_commands(
    allowed: Tensor, shape: tuple[int, int], hold: int, generator: torch.Generator
) -> Tensor:
    """Commands the way a held random policy plays: rows of (B, T) action ids, each a uniform
    draw from `allowed` kept for a uniform 1..`hold` steps (`hold=1`: a fresh draw every step).

    Why: an IDM's accuracy on real transitions (the ceiling of control accuracy) is measured on
    the recording policy's actions, and CoinRun's inertia shows the previous action in a
    transition too. On data held 1-4 steps the demo's IDM reads 0.74 of real test transitions,
    on the same game recorded with a fresh action every step only 0.56: commands scored against
    that ceiling have to be drawn the same way. The marginal of every step stays uniform over
    `allowed`, so chance is unchanged.

    Args:
        allowed: (A,) long, the action ids to draw from (on the generator's device).
        shape: (B, T).
        hold: the longest a draw is kept, >= 1.
        generator: the source of randomness (its device is used).
    """
    if hold < 1:
        raise ValueError(f"eval.control.hold must be >= 1, got {hold}")
    if allowed.numel() == 0:
        raise ValueError("held_commands: no allowed action to draw from")
    b, t = shape
    device = generator.device
    draws = torch.randint(0, allowed.numel(), (b, t), generator=generator, device=device)
    if hold > 1:
        lengths = torch.randint(1, hold + 1, (b, t), generator=generator, device=device)
        # a new draw starts where the running sum of hold lengths lands: (B, T) run index
        ends = lengths.cumsum(dim=1)  # (B, T) the step after each run
        run = torch.searchsorted(ends, torch.arange(t, device=device).repeat(b, 1), right=True)
        draws = draws.gather(1, run)  # run r < t always: the lengths are >= 1
    return allowed.to(device)[draws]


def control_confusion(commands: Tensor, labels: Tensor, num_actions: int) -> Tensor:
    """(A, A) long counts of commanded action (rows) x the action the IDM read (columns), over
    the transitions whose command is known (>= 0): which commands the world renders as which."""
    commands = torch.as_tensor(commands).reshape(-1).long().cpu()
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if commands.shape != labels.shape:
        raise ValueError(f"{commands.numel()} commands but {labels.numel()} labels")
    keep = (commands >= 0) & (labels >= 0)
    index = commands[keep] * num_actions + labels[keep]
    counts = torch.bincount(index, minlength=num_actions * num_actions)
    return counts.reshape(num_actions, num_actions)


def control_chance(commanded_actions: Tensor) -> float:
    """Chance level of control accuracy: the share of the most frequent commanded action.

    The best accuracy of any fixed guess, and (for commands drawn independently of the frames)
    the most any labelling of frames can expect, which is what a world that ignores its actions
    gets. Negative entries are left out; nan when none is known.
    """
    actions = torch.as_tensor(commanded_actions).reshape(-1).long().cpu()
    actions = actions[actions >= 0]
    if actions.numel() == 0:
        return float("nan")
    return float(torch.bincount(actions).max() / actions.numel())


@torch.no_grad()
def real_transition_accuracy(
    idm: InverseDynamicsModel, clips: Dataset, batch_size: int = 32
) -> float:
    """IDM accuracy on every real transition (with a known action) of a clip dataset: the
    ceiling a perfectly controllable world model could reach."""
    correct = total = 0
    device = next(idm.parameters()).device
    for batch in DataLoader(clips, batch_size=batch_size, shuffle=False):
        video, actions = batch["video"], batch["actions"][:, :-1]
        if "mask" in batch:
            real = batch["mask"][:, :-1] & batch["mask"][:, 1:]
            actions = actions.masked_fill(~real, -1)
        prev, nxt, labels = _flatten_transitions(video[:, :, :-1], video[:, :, 1:], actions)
        if labels.numel():
            pred = idm.eval().predict(prev.to(device), nxt.to(device))
            correct += int((pred == labels.to(device)).sum())
            total += labels.numel()
    return correct / total if total else float("nan")


def control_report(
    idm: InverseDynamicsModel,
    real_clips: Dataset,
    prev_frames: Tensor,
    generated_frames: Tensor,
    commanded_actions: Tensor,
) -> dict[str, float]:
    """Control accuracy on real held-out transitions (the ceiling), on generated transitions,
    and its chance level (`control_chance` of the commands), as plain floats."""
    return {
        "accuracy_real": real_transition_accuracy(idm, real_clips),
        "accuracy_generated": control_accuracy(
            idm, prev_frames, generated_frames, commanded_actions
        ),
        "chance": control_chance(commanded_actions),
    }
