"""Captioned multi-game Procgen clips: captions come from what was recorded, nothing else.

`ProcgenCaptionsSource` (`data=procgen_captions`) records each game with `ProcgenSource` into that
game's own cache (reused by any single-game run with the same settings), then joins the games
into one cache. The recorded action of a frame is stored as a *joint* id

    joint = game_index * 15 + button          (procgen's 15 buttons, games in `games` order)

so a multi-game world model sees the disjoint union of the games' action spaces, and every clip
carries its game and true actions through any pipeline that passes `actions` (the token pipeline
passes only tokens, actions and mask). Each episode's manifest entry also names its game.

The caption of a clip is `caption(game, buttons)`: "<game>, <motion>", where the motion is the
direction of the dominant true action over the clip's transitions (the buttons map to the 8
compass directions; the no-op and the letter buttons are "standing still"), e.g.
"bigfish, moving left". Ties go to the direction reached first. `captions_from_actions` renders
the captions of a batch of joint ids; text-conditioned models use it when a batch has no `text`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from worldmodel.data.dataset import ClipDataset
from worldmodel.data.procgen import PROCGEN_GAMES, PROCGEN_NUM_ACTIONS, ProcgenSource
from worldmodel.data.shards import CacheWriter
from worldmodel.data.source import Source

# procgen's button combos, in order: (LEFT,DOWN) (LEFT) (LEFT,UP) (DOWN) () (UP) (RIGHT,DOWN)
# (RIGHT) (RIGHT,UP) then the letter keys D A W S Q E, which move nothing
BUTTON_DIRECTIONS = (
    "down-left",
    "left",
    "up-left",
    "down",
    None,
    "up",
    "down-right",
    "right",
    "up-right",
    None,
    None,
    None,
    None,
    None,
    None,
)
STILL = "standing still"


def motion(buttons: Sequence[int]) -> str:
    """The dominant direction of a sequence of procgen buttons: "moving left" / "standing still"."""
    words = []
    for b in buttons:
        if not 0 <= int(b) < PROCGEN_NUM_ACTIONS:
            raise ValueError(f"procgen buttons must be in [0, {PROCGEN_NUM_ACTIONS}), got {b}")
        d = BUTTON_DIRECTIONS[int(b)]
        words.append(STILL if d is None else f"moving {d}")
    if not words:
        return STILL
    counts = Counter(words)
    best = max(counts.values())
    return next(w for w in words if counts[w] == best)  # ties: the one reached first


def caption(game: str, buttons: Sequence[int]) -> str:
    """ "<game>, <motion>" for a clip of `game` whose transitions used `buttons`."""
    return f"{game}, {motion(buttons)}"


def captions_from_actions(
    actions: Tensor | np.ndarray, games: Sequence[str], mask: Tensor | np.ndarray | None = None
) -> list[str]:
    """Captions of clips of joint action ids (B, T) (see the module docstring).

    The transitions of a clip are its frames 0..T-2 (actions[:, t] leads from frame t to t+1);
    with `mask` (B, T), only transitions between two real frames count. A clip's game is the
    game of its first frame (clips never cross episodes).
    """
    acts = np.asarray(actions.cpu() if isinstance(actions, Tensor) else actions)
    if acts.ndim != 2:
        raise ValueError(f"actions must be (B, T), got shape {acts.shape}")
    real = (
        np.ones(acts.shape, dtype=bool)
        if mask is None
        else np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
    )
    limit = len(games) * PROCGEN_NUM_ACTIONS
    out = []
    for row, keep in zip(acts, real):
        if row[0] < 0 or row[0] >= limit:
            raise ValueError(
                f"joint action ids must be in [0, {limit}) for games={list(games)}, got {row[0]}"
            )
        game = games[int(row[0]) // PROCGEN_NUM_ACTIONS]
        steps = keep[:-1] & keep[1:]
        buttons = [int(a) % PROCGEN_NUM_ACTIONS for a, s in zip(row[:-1], steps) if s and a >= 0]
        out.append(caption(game, buttons))
    return out


class ProcgenCaptionsSource(Source):
    """Several procgen games in one cache, with joint (game, button) action ids.

    Args (besides those of `Source`): `games` (procgen names, order fixes the joint ids),
    `{train,val,test}_frames_per_game` (frames recorded per game and split; a test split only
    when > 0: its own levels, numbers are reported on it), and the recording settings of
    `ProcgenSource` (`num_envs`, `eval_num_envs`, level ranges, `distribution_mode`,
    `max_action_repeat`, `seed`, `env_kwargs`), shared by every game.
    """

    kind = "procgen_captions"

    def __init__(
        self,
        root: str,
        games: Sequence[str] = ("coinrun", "bigfish", "starpilot", "fruitbot"),
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        train_frames_per_game: int = 10000,
        val_frames_per_game: int = 1024,
        test_frames_per_game: int = 0,
        num_envs: int = 16,
        eval_num_envs: int | None = None,
        train_level_start: int = 0,
        train_num_levels: int = 500,
        val_level_start: int = 100000,
        val_num_levels: int = 100,
        test_level_start: int = 200000,
        test_num_levels: int = 100,
        distribution_mode: str = "hard",
        max_action_repeat: int = 4,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        super().__init__(
            root, resolution, clip_length, frame_stride, clip_stride, val_clip_stride, name
        )
        games = [str(g) for g in games]
        if not games:
            raise ValueError("data.games is empty: name at least one procgen game")
        unknown = [g for g in games if g not in PROCGEN_GAMES]
        if unknown:
            raise ValueError(
                f"data.games={games}: unknown {unknown}; valid names: {', '.join(PROCGEN_GAMES)}"
            )
        if len(set(games)) != len(games):
            raise ValueError(f"data.games={games} names a game twice")
        self.games = games
        # one ProcgenSource per game: its own cache, its own recording code
        self.sources = [
            ProcgenSource(
                root,
                env_name=g,
                resolution=resolution,
                clip_length=clip_length,
                num_envs=num_envs,
                train_frames=train_frames_per_game,
                val_frames=val_frames_per_game,
                test_frames=test_frames_per_game,
                eval_num_envs=eval_num_envs,
                train_level_start=train_level_start,
                train_num_levels=train_num_levels,
                val_level_start=val_level_start,
                val_num_levels=val_num_levels,
                test_level_start=test_level_start,
                test_num_levels=test_num_levels,
                distribution_mode=distribution_mode,
                max_action_repeat=max_action_repeat,
                seed=seed,
                env_kwargs=env_kwargs,
            )
            for g in games
        ]

    def label(self) -> str:
        return "-".join(self.games)

    def known_num_actions(self) -> int:
        return PROCGEN_NUM_ACTIONS * len(self.games)

    def recording_params(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "games": self.games,
            "per_game": [s.recording_params() for s in self.sources],
        }

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        for index, (game, source) in enumerate(zip(self.games, self.sources)):
            folder = source.prepare()  # records the game's own cache once, or reuses it
            for split in source.levels:  # train, val, and test where it records one
                clips = ClipDataset(folder, split, clip_length=1)
                frames = np.load(clips.frames_path, mmap_mode="r")
                actions = np.load(clips.actions_path)
                for ep in clips.episodes:
                    off, n = int(ep["offset"]), int(ep["length"])
                    acts = actions[off : off + n]
                    joint = np.where(acts >= 0, acts + index * PROCGEN_NUM_ACTIONS, -1)
                    writer[split].add_episode(
                        np.asarray(frames[off : off + n]),
                        joint.astype(np.int64),
                        game=game,
                        level_seed=ep.get("level_seed", -1),
                    )
        return {"num_actions": self.known_num_actions(), "games": self.games}
