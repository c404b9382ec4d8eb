"""Atari 2600 games (the Arcade Learning Environment through gymnasium), recorded with a policy.

Frames are the environment's RGB observations after `frameskip` emulator frames, resized
(antialiased) to `resolution`; the true actions are saved and `num_actions` is the size of the
game's action space (minimal set unless `full_action_space`). Train and val episodes are played
from different seeds, by a held random policy unless `policy` names another
(`worldmodel.data.policies`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worldmodel.data.frames import check_crop, resize_frames
from worldmodel.data.policies import (
    HeldRandomPolicy,
    checked_actions,
    make_policy,
    policy_problems,
)
from worldmodel.data.shards import CacheWriter, SplitWriter
from worldmodel.data.source import Source


def ale_env_id(game: str) -> str:
    """ "Pong" / "pong" / "ALE/Pong-v5" -> "ALE/Pong-v5" (validated against the registry)."""
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    ids = sorted(i for i in gymnasium.registry if i.startswith("ALE/") and i.endswith("-v5"))
    by_name = {i[len("ALE/") : -len("-v5")].lower(): i for i in ids}
    key = game.removeprefix("ALE/").removesuffix("-v5").lower()
    if key not in by_name:
        names = ", ".join(i[len("ALE/") : -len("-v5")] for i in ids)
        raise ValueError(f"unknown ALE game {game!r}; valid games: {names}")
    return by_name[key]


class AtariSource(Source):
    """ALE frames with true actions.

    Args (besides those of `Source`):
        game: an ALE game name ("Pong", "Breakout", ... or "ALE/Pong-v5").
        frameskip: emulator frames per step (each recorded frame is `frameskip` apart).
        repeat_action_probability: sticky actions (0.25 is the v5 default).
        full_action_space: use all 18 actions instead of the game's minimal set.
        train_frames, val_frames: frames to record per split.
        train_seed, val_seed: environment and policy seeds of the two splits (must differ).
        max_action_repeat: each random action is held for 1..max_action_repeat steps.
        policy: what plays (null = held random actions): `{_target_: ..., **kwargs}` naming a
            policy builder (see `worldmodel.data.policies`); it sees the 210x160 screen.
        max_episode_frames: cut episodes longer than this (0 = only the game's own end).
        crop: "none" (squash the 210x160 screen) or "center".
    """

    kind = "atari"

    def __init__(
        self,
        root: str,
        game: str = "Pong",
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        frameskip: int = 4,
        repeat_action_probability: float = 0.25,
        full_action_space: bool = False,
        train_frames: int = 40000,
        val_frames: int = 4096,
        train_seed: int = 0,
        val_seed: int = 1,
        max_action_repeat: int = 4,
        max_episode_frames: int = 0,
        crop: str = "none",
        policy: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        super().__init__(
            root, resolution, clip_length, frame_stride, clip_stride, val_clip_stride, name
        )
        if train_seed == val_seed:
            raise ValueError(f"train_seed and val_seed must differ, both are {train_seed}")
        self.game = ale_env_id(game)
        self.frameskip = int(frameskip)
        self.repeat_action_probability = float(repeat_action_probability)
        self.full_action_space = bool(full_action_space)
        self.frames = {"train": int(train_frames), "val": int(val_frames)}
        self.seeds = {"train": int(train_seed), "val": int(val_seed)}
        self.max_action_repeat = int(max_action_repeat)
        self.max_episode_frames = int(max_episode_frames)
        self.crop = check_crop(crop)
        self.policy = make_policy(policy)  # checked now; built per split (needs the action count)

    def label(self) -> str:
        return self.game.removeprefix("ALE/")

    def known_num_actions(self) -> int:
        env = self._make()
        try:
            return int(env.action_space.n)
        finally:
            env.close()

    def _make(self):
        import gymnasium

        ale_env_id(self.game)  # registers the ALE environments in this process
        return gymnasium.make(
            self.game,
            frameskip=self.frameskip,
            repeat_action_probability=self.repeat_action_probability,
            full_action_space=self.full_action_space,
        )

    def recording_params(self) -> dict[str, Any]:
        params = {
            "source": self.kind,
            "game": self.game,
            "resolution": list(self.resolution),
            "frameskip": self.frameskip,
            "repeat_action_probability": self.repeat_action_probability,
            "full_action_space": self.full_action_space,
            "frames": self.frames,
            "seeds": self.seeds,
            "max_action_repeat": self.max_action_repeat,
            "max_episode_frames": self.max_episode_frames,
            "crop": self.crop,
        }
        if self.policy is not None:  # only when set: earlier recordings keep their cache key
            params["policy"] = self.policy.key
        return params

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        num_actions = None
        for split in ("train", "val"):
            num_actions = self._record_split(writer[split], split)
        return {"num_actions": num_actions}

    def _record_split(self, out: SplitWriter, split: str) -> int:
        env = self._make()
        num_actions = int(env.action_space.n)
        seed = self.seeds[split]
        if self.policy is None:
            policy = HeldRandomPolicy(num_actions, 1, self.max_action_repeat, seed)
        else:
            policy = self.policy.build(num_actions, 1, seed)
        who = self.policy.name if self.policy else "HeldRandomPolicy"
        budget = self.frames[split]
        chunk = 256  # frames resized together (the resize is batched)
        with self.progress(budget, f"{self.label()} {split}") as bar:
            obs, _ = env.reset(seed=seed)
            episode = 0
            while out.num_frames < budget:
                out.begin_episode()
                frames, actions, length, done = [], [], 0, False
                while not done:
                    action = int(checked_actions(policy(obs[None]), 1, num_actions, who)[0])
                    frames.append(obs)
                    actions.append(action)
                    length += 1
                    obs, _, terminated, truncated, _ = env.step(action)
                    limit = self.max_episode_frames and length >= self.max_episode_frames
                    done = terminated or truncated or bool(limit)
                    done = done or out.num_frames + len(frames) >= budget
                    if len(frames) == chunk or done:
                        out.append(
                            resize_frames(np.stack(frames), self.resolution, self.crop),
                            np.asarray(actions, dtype=np.int64),
                        )
                        bar.update(len(frames))
                        frames, actions = [], []
                out.end_episode(seed=seed, episode=episode)
                episode += 1
                obs, _ = env.reset()
        env.close()
        return num_actions


def check_config(data: Any) -> list[str]:
    """What `validate` reports about an ALE data config before any work: the game's name and
    the recording policy."""
    problems = policy_problems(data.get("policy"))
    try:
        ale_env_id(str(data.get("game")))
    except ValueError as e:
        problems.append(f"data.game={data.get('game')!r}: {e}")
    return problems
