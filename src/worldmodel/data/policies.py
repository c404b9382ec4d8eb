"""Recording policies: what chooses the actions while procgen and ALE games are recorded.

A policy sees the current observations of the `N` environments stepped together, uint8
(N, H, W, C) at the environment's own size (procgen 64x64, ALE 210x160, before any resize to the
recording's resolution), and returns one action id per environment, (N,) integers in
[0, num_actions). `data.policy` in a procgen or ALE config says which:

- null: `HeldRandomPolicy`, uniform random actions each held for 1..`max_action_repeat` steps
  (the recordings made before policies could be chosen, whose caches keep their keys).
- `{_target_: module.name, **kwargs}`: any importable callable that builds a policy,
  `target(num_actions=..., num_envs=..., seed=..., **kwargs) -> policy` with
  `policy(obs) -> actions`. A class whose instances are callable is one (subclassing `Policy`
  documents it); a function that returns a closure is another. `seed` differs per split, so
  a random policy plays the train and the held-out levels with different draws.
  Built in: `RunRight` (CoinRun: runs right and jumps) and
  `worldmodel.models.policy.CheckpointPolicy` (a trained policy network read from a file).

The policy enters the cache key only when one is set: the target's name, its keyword
arguments and a digest of its source code (editing the policy records anew), or what the
target's own `cache_identity(**kwargs)` returns (a checkpoint: its file's sha256).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from omegaconf import OmegaConf

# procgen's buttons (env.get_combos()) with a distinct effect in CoinRun, by name
COINRUN_MOVES = {"left": 1, "left+jump": 2, "noop": 4, "jump": 5, "right": 7, "right+jump": 8}
# what the recorder passes to a policy's target itself; a config may not set them
RECORDER_ARGS = ("num_actions", "num_envs", "seed")


class Policy(ABC):
    """Chooses the actions of `num_envs` environments stepped together, one step at a time.

    One named by `data.policy` takes `(num_actions, num_envs, seed, **settings)` in its
    constructor; `HeldRandomPolicy`, the default, is built by the recorders from their own keys.
    """

    @abstractmethod
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Action ids (N,) of the observations (N, H, W, C) uint8."""


class HeldRandomPolicy(Policy):
    """Uniform random actions, each held for a random 1..`max_repeat` steps, for `num` agents.

    Holding actions makes the agent travel (a fresh action every step mostly jitters in place),
    so recorded clips show motion that depends on the action. `choices` restricts the draw to
    some action ids (e.g. a game's distinct moves, leaving out buttons that do the same). The
    observations are not looked at.
    """

    def __init__(
        self,
        num_actions: int,
        num: int,
        max_repeat: int,
        seed: int,
        choices: list[int] | None = None,
    ):
        if max_repeat < 1:
            raise ValueError(f"max_action_repeat must be >= 1, got {max_repeat}")
        if choices is not None:
            bad = [a for a in choices if not 0 <= int(a) < num_actions]
            if not choices or bad:
                raise ValueError(
                    f"action_set {list(choices)}: needs one or more action ids in "
                    f"[0, {num_actions})" + (f"; outside: {bad}" if bad else "")
                )
        self.num_actions = num_actions
        self.choices = np.asarray(
            sorted({int(a) for a in choices}) if choices is not None else range(num_actions)
        )
        self.max_repeat = max_repeat
        self.rng = np.random.default_rng(seed)
        self.actions = np.zeros(num, dtype=np.int64)
        self.left = np.zeros(num, dtype=np.int64)

    def __call__(self, obs: np.ndarray | None = None) -> np.ndarray:
        new = self.left <= 0
        n = int(new.sum())
        if n:
            self.actions[new] = self.choices[self.rng.integers(0, len(self.choices), size=n)]
            self.left[new] = self.rng.integers(1, self.max_repeat + 1, size=n)
        self.left -= 1
        return self.actions.copy()


class RunRight(Policy):
    """A scripted CoinRun runner: mostly right or right+jump, now and then back or waiting.

    Each move is held for 1..`max_repeat` steps. CoinRun's coin is at the right end of the
    level, past crates, gaps and enemies that a jump clears, so running right and jumping often
    goes much further into each level (and reaches the coin far more often) than uniformly
    random buttons, which mostly jitter near the start. `jump`, `back` and `wait` are the
    chances of right+jump, a move to the left (with or without a jump) and standing still; the
    rest is plain right. The ids are procgen's (`COINRUN_MOVES`); in the other procgen games the
    same buttons mean the same directions.
    """

    def __init__(
        self,
        num_actions: int,
        num_envs: int,
        seed: int,
        jump: float = 0.5,
        back: float = 0.1,
        wait: float = 0.05,
        max_repeat: int = 6,
    ):
        probs = {"jump": jump, "back": back, "wait": wait}
        if any(not 0.0 <= p <= 1.0 for p in probs.values()) or jump + back + wait > 1.0:
            raise ValueError(f"RunRight: jump, back and wait must be in [0, 1], sum <= 1: {probs}")
        if max_repeat < 1:
            raise ValueError(f"RunRight: max_repeat must be >= 1, got {max_repeat}")
        if num_actions <= max(COINRUN_MOVES.values()):
            raise ValueError(f"RunRight plays procgen's 15 buttons; this game has {num_actions}")
        m = COINRUN_MOVES
        self.moves = np.array([m["right"], m["right+jump"], m["left"], m["left+jump"], m["noop"]])
        self.probs = np.array([1 - jump - back - wait, jump, back / 2, back / 2, wait])
        self.max_repeat = int(max_repeat)
        self.rng = np.random.default_rng(seed)
        self.actions = np.full(num_envs, m["right"], dtype=np.int64)
        self.left = np.zeros(num_envs, dtype=np.int64)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        new = self.left <= 0
        n = int(new.sum())
        if n:
            self.actions[new] = self.rng.choice(self.moves, size=n, p=self.probs)
            self.left[new] = self.rng.integers(1, self.max_repeat + 1, size=n)
        self.left -= 1
        return self.actions.copy()


def import_target(name: str) -> Callable[..., Any]:
    """The object `module.name` names (a class, a function), or a ValueError saying why not."""
    module, _, attr = str(name).rpartition(".")
    if not module:
        raise ValueError(f"data.policy._target_ {name!r}: expected module.name")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data.policy._target_ {name!r} cannot be imported: {e}") from e
    if not callable(target):
        raise ValueError(f"data.policy._target_ {name!r} is not callable")
    return target


def _code_digest(target: Callable[..., Any]) -> str | None:
    """sha256 (16 hex digits) of the target's source text, None where Python has none."""
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class PolicySpec:
    """A `data.policy` node, checked: its target imported, its arguments matched to the target's
    signature, its cache identity computed (a checkpoint is read and checked here, before any
    recording). `build(num_actions, num_envs, seed)` makes the policy of one split."""

    def __init__(self, node: Mapping[str, Any]):
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise ValueError(
                "data.policy must be null (held random actions) or a mapping with a _target_ "
                f"naming the callable that builds the policy, got {node!r}"
            )
        self.name = str(node["_target_"])
        self.kwargs = {str(k): v for k, v in node.items() if k != "_target_"}
        self.target = import_target(self.name)
        taken = sorted(set(self.kwargs) & set(RECORDER_ARGS))
        if taken:
            raise ValueError(
                f"data.policy.{', data.policy.'.join(taken)}: set by the recorder, not the config"
            )
        try:
            params = inspect.signature(self.target).parameters
        except (TypeError, ValueError):  # builtins without a signature: checked when called
            params = {}
        if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            missing = [a for a in RECORDER_ARGS if a not in params]
            if missing:
                raise ValueError(
                    f"data.policy._target_ {self.name!r} must accept (num_actions, num_envs, "
                    f"seed, **settings); it lacks {', '.join(missing)}"
                )
            unknown = sorted(set(self.kwargs) - set(params))
            if unknown:
                valid = sorted(set(params) - set(RECORDER_ARGS) - {"self"})
                raise ValueError(
                    f"data.policy.{', data.policy.'.join(unknown)}: not a parameter of "
                    f"{self.name} (valid: {', '.join(valid) or 'none'})"
                )
        identity = getattr(self.target, "cache_identity", None)
        if callable(identity):
            self.key = {"_target_": self.name, **identity(**self.kwargs)}
        else:
            self.key = {"_target_": self.name, **self.kwargs, "code": _code_digest(self.target)}

    def build(self, num_actions: int, num_envs: int, seed: int) -> Callable[[np.ndarray], Any]:
        return self.target(num_actions=num_actions, num_envs=num_envs, seed=seed, **self.kwargs)


def make_policy(node: Mapping[str, Any] | None) -> PolicySpec | None:
    """The checked `data.policy` node (None = the held random policy)."""
    return None if node is None else PolicySpec(node)


def policy_problems(node: Any, num_actions: int | None = None) -> list[str]:
    """What `validate` reports about a `data.policy` node before any work (empty: none): an
    unimportable target, unknown settings, an unreadable or mismatched checkpoint, and (given
    the game's `num_actions`) a policy that cannot be built for it."""
    if node is None:
        return []
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        spec = PolicySpec(node)
        if num_actions is not None:
            spec.build(num_actions, 1, 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        message = str(e)
        return [message if message.startswith("data.policy") else f"data.policy: {message}"]
    return []


def checked_actions(actions: Any, num_envs: int, num_actions: int, name: str) -> np.ndarray:
    """A policy's answer as (num_envs,) int64 ids, or a ValueError naming the policy."""
    try:
        out = np.asarray(actions)
    except Exception as e:  # an object numpy cannot read
        raise ValueError(f"policy {name} returned {type(actions).__name__}: {e}") from e
    if out.shape != (num_envs,) or not np.issubdtype(out.dtype, np.integer):
        raise ValueError(
            f"policy {name} must return {num_envs} integer action ids (one per environment), "
            f"got shape {out.shape} dtype {out.dtype}"
        )
    if out.size and (out.min() < 0 or out.max() >= num_actions):
        raise ValueError(
            f"policy {name} returned actions {out.tolist()}: ids must be in [0, {num_actions})"
        )
    return out.astype(np.int64)
