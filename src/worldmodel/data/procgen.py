"""OpenAI Procgen (CoinRun and the 15 other games) recorded with a held random or a given policy.

`num_envs` environments step in one process (procgen's own vectorisation). Train episodes come
from levels `[train_level_start, train_level_start + train_num_levels)` and val episodes from a
disjoint level range, so val measures generalisation to unseen levels. Episodes are cut where
procgen starts a new one; the episodes still running when the frame budget is reached are kept
(truncated). Each episode records the level seed it was played on.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from typing import Any

import numpy as np

from worldmodel.data.frames import resize_frames
from worldmodel.data.policies import COINRUN_MOVES as COINRUN_MOVES  # named here before
from worldmodel.data.policies import (
    HeldRandomPolicy,
    checked_actions,
    make_policy,
    policy_problems,
)
from worldmodel.data.shards import CacheWriter, SplitWriter
from worldmodel.data.source import Source

PROCGEN_GAMES = (
    "bigfish",
    "bossfight",
    "caveflyer",
    "chaser",
    "climber",
    "coinrun",
    "dodgeball",
    "fruitbot",
    "heist",
    "jumper",
    "leaper",
    "maze",
    "miner",
    "ninja",
    "plunder",
    "starpilot",
)
PROCGEN_NUM_ACTIONS = 15  # every game shares procgen's 15-button action set


def import_procgen_env() -> type:
    """`procgen.ProcgenGym3Env`, imported without the notice gym prints when it is imported.

    procgen imports the unmaintained `gym` package (for its registration), whose `__init__`
    prints a four-line "Gym has been unmaintained since 2022..." notice to stderr on every
    recording; procgen itself runs on gym3 and never uses it. That notice (gym_notices' text for
    the installed gym version) is dropped; anything else written meanwhile goes through.
    """
    if "gym" not in sys.modules:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                importlib.import_module("gym")
        finally:
            text = captured.getvalue()
            try:
                from gym_notices.notices import notices

                notice = notices.get(sys.modules["gym"].__version__)
            except (ImportError, KeyError, AttributeError):  # gym failed, or no notices
                notice = None
            if notice:
                text = text.replace(notice + "\n", "", 1)
            sys.stderr.write(text)
    from procgen import ProcgenGym3Env  # heavy import, only when recording

    return ProcgenGym3Env


class ProcgenSource(Source):
    """Procgen frames (64x64 RGB natively) with the true actions (15 for every game).

    Args (besides those of `Source`):
        env_name: one of `PROCGEN_GAMES`.
        num_envs: environments stepped together.
        train_frames, val_frames: frames to record per split.
        train_level_start, train_num_levels, val_level_start, val_num_levels: level ranges
            (must not overlap).
        test_frames, test_level_start, test_num_levels: a third split of its own levels,
            recorded when test_frames > 0: numbers are reported on it, recipes chosen on val.
        eval_num_envs: environments stepped together for val and test (null = num_envs):
            many at once give many short episodes from many levels.
        distribution_mode: procgen's "easy" | "hard" | "extreme" | "memory" | "exploration".
        policy: what plays (null = held random actions): `{_target_: ..., **kwargs}` naming a
            policy builder (see `worldmodel.data.policies`), e.g. `RunRight` for CoinRun or a
            network file through `worldmodel.models.policy.CheckpointPolicy`.
        max_action_repeat: each random action is held for 1..max_action_repeat steps.
        action_set: the action ids the random policy draws from (null = all 15). CoinRun's
            buttons have 6 distinct effects: [1, 2, 4, 5, 7, 8] = left, left+jump, nothing,
            jump, right, right+jump (`COINRUN_MOVES`); the others repeat these.
        frame_skip: env steps per recorded step; the policy's action is held through them and
            the frame before each group is recorded (Atari's frame skip: the recorded motion per
            action is frame_skip times larger, and each action shows within its own step).
        seed: seeds the policy and procgen (val uses seed + 1).
        env_kwargs: further keyword arguments of `ProcgenGym3Env` (e.g. use_backgrounds).
    """

    kind = "procgen"

    def __init__(
        self,
        root: str,
        env_name: str = "coinrun",
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        num_envs: int = 16,
        train_frames: int = 40000,
        val_frames: int = 4096,
        train_level_start: int = 0,
        train_num_levels: int = 500,
        val_level_start: int = 100000,
        val_num_levels: int = 100,
        test_frames: int = 0,
        test_level_start: int = 200000,
        test_num_levels: int = 100,
        eval_num_envs: int | None = None,
        distribution_mode: str = "hard",
        max_action_repeat: int = 4,
        action_set: list[int] | None = None,
        frame_skip: int = 1,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        super().__init__(
            root, resolution, clip_length, frame_stride, clip_stride, val_clip_stride, name
        )
        if env_name not in PROCGEN_GAMES:
            raise ValueError(
                f"unknown procgen env_name {env_name!r}; valid names: {', '.join(PROCGEN_GAMES)}"
            )
        train = range(train_level_start, train_level_start + train_num_levels)
        val = range(val_level_start, val_level_start + val_num_levels)
        test = range(test_level_start, test_level_start + test_num_levels)
        if min(train_num_levels, val_num_levels, test_num_levels) < 1:
            raise ValueError("train_num_levels, val_num_levels and test_num_levels must be >= 1")
        self.levels = {"train": train, "val": val}
        self.frames = {"train": int(train_frames), "val": int(val_frames)}
        if int(test_frames) > 0:  # levels only reported on, never used to choose a recipe
            self.levels["test"], self.frames["test"] = test, int(test_frames)
        names = list(self.levels)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ra, rb = self.levels[a], self.levels[b]
                if ra.start < rb.stop and rb.start < ra.stop:
                    raise ValueError(f"{a} levels {ra} and {b} levels {rb} overlap")
        self.env_name = env_name
        self.num_envs = int(num_envs)
        # val and test: many environments at once = many short episodes from many levels
        self.eval_num_envs = int(eval_num_envs) if eval_num_envs else None
        self.distribution_mode = distribution_mode
        self.max_action_repeat = int(max_action_repeat)
        if int(frame_skip) < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
        self.frame_skip = int(frame_skip)
        self.action_set = [int(a) for a in action_set] if action_set is not None else None
        if self.action_set is not None:  # checked now, not after minutes of recording
            HeldRandomPolicy(PROCGEN_NUM_ACTIONS, 1, self.max_action_repeat, 0, self.action_set)
        self.policy = make_policy(policy)
        if self.policy is not None:  # built once now: a bad target or file fails before recording
            if self.action_set is not None:
                raise ValueError("action_set is the random policy's; with data.policy set, drop it")
            self.policy.build(PROCGEN_NUM_ACTIONS, 1, 0)
        self.seed = int(seed)
        self.env_kwargs = dict(env_kwargs or {})

    def label(self) -> str:
        return self.env_name

    def known_num_actions(self) -> int:
        return PROCGEN_NUM_ACTIONS

    def recording_params(self) -> dict[str, Any]:
        params = {
            "source": self.kind,
            "env_name": self.env_name,
            "resolution": list(self.resolution),
            "num_envs": self.num_envs,
            "frames": self.frames,
            "levels": {k: [r.start, r.stop] for k, r in self.levels.items()},
            "distribution_mode": self.distribution_mode,
            "max_action_repeat": self.max_action_repeat,
            "seed": self.seed,
            "env_kwargs": self.env_kwargs,
        }
        # each only when set: earlier recordings keep their cache key
        if self.eval_num_envs:
            params["eval_num_envs"] = self.eval_num_envs
        if self.action_set is not None:
            params["action_set"] = self.action_set
        if self.frame_skip > 1:
            params["frame_skip"] = self.frame_skip
        if self.policy is not None:
            params["policy"] = self.policy.key
        return params

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        num_actions = None
        for i, split in enumerate(self.levels):
            num_actions = self._record_split(writer[split], split, self.seed + i)
        return {"num_actions": num_actions}

    def _record_split(self, out: SplitWriter, split: str, seed: int) -> int:
        ProcgenGym3Env = import_procgen_env()
        levels = self.levels[split]
        num_envs = self.num_envs if split == "train" else self.eval_num_envs or self.num_envs
        env = ProcgenGym3Env(
            num=num_envs,
            env_name=self.env_name,
            start_level=levels.start,
            num_levels=len(levels),
            distribution_mode=self.distribution_mode,
            rand_seed=seed,
            **self.env_kwargs,
        )
        num_actions = int(env.ac_space.eltype.n)
        if self.policy is None:
            policy = HeldRandomPolicy(
                num_actions, num_envs, self.max_action_repeat, seed, self.action_set
            )
        else:
            policy = self.policy.build(num_actions, num_envs, seed)
        who = self.policy.name if self.policy else "HeldRandomPolicy"
        budget = self.frames[split]
        frames: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        actions: list[list[int]] = [[] for _ in range(num_envs)]
        level_seeds = [-1] * num_envs

        def flush(env_id: int) -> None:
            clip = np.stack(frames[env_id])
            if clip.shape[1:3] != self.resolution:
                clip = resize_frames(clip, self.resolution)
            acts = np.asarray(actions[env_id], dtype=np.int64)
            out.add_episode(clip, acts, level_seed=level_seeds[env_id])
            frames[env_id].clear()
            actions[env_id].clear()

        # envs whose episode ended inside the last frame-skip group (procgen restarts them at once)
        restarted = np.zeros(num_envs, dtype=bool)
        with self.progress(budget, f"{self.env_name} {split}") as bar:
            while True:
                _, obs, first = env.observe()
                first = first | restarted
                if first.any():
                    info = env.get_info()
                    for env_id in np.flatnonzero(first):
                        if frames[env_id]:
                            flush(env_id)
                        level_seeds[env_id] = int(info[env_id]["level_seed"])
                room = budget - out.num_frames - sum(len(f) for f in frames)
                if room <= 0:
                    break
                act = checked_actions(policy(obs["rgb"]), num_envs, num_actions, who)
                # on the last step only the first `room` envs contribute, to hit the budget exactly
                for env_id in range(min(room, num_envs)):
                    frames[env_id].append(obs["rgb"][env_id].copy())
                    actions[env_id].append(int(act[env_id]))
                env.act(act.astype(np.int32))
                restarted[:] = False
                for _ in range(self.frame_skip - 1):  # the action held, frames not recorded
                    restarted |= env.observe()[2]
                    env.act(act.astype(np.int32))
                bar.update(min(room, num_envs))
            # the episodes still running are kept, truncated, in env order
            for env_id in range(num_envs):
                if frames[env_id]:
                    flush(env_id)
        return num_actions


def check_config(data: Any) -> list[str]:
    """What `validate` reports about a procgen data config before any work: the game's name
    and the recording policy."""
    problems = policy_problems(data.get("policy"), PROCGEN_NUM_ACTIONS)
    name = data.get("env_name")
    if name not in PROCGEN_GAMES:
        problems.append(
            f"data.env_name={name!r}: not a procgen game (valid: {', '.join(PROCGEN_GAMES)})"
        )
    return problems
