"""The captioned multi-game procgen source: joint action ids and the splits it records."""

from __future__ import annotations

import numpy as np
import pytest

from worldmodel.data.captions import ProcgenCaptionsSource
from worldmodel.data.procgen import PROCGEN_NUM_ACTIONS


def _source(tmp_path, **kw) -> ProcgenCaptionsSource:
    return ProcgenCaptionsSource(
        str(tmp_path),
        games=["coinrun", "bigfish"],
        clip_length=4,
        train_frames_per_game=64,
        val_frames_per_game=32,
        num_envs=4,
        **kw,
    )


def test_test_split_holds_its_own_levels_and_joint_actions(tmp_path) -> None:
    source = _source(
        tmp_path,
        test_frames_per_game=32,
        eval_num_envs=8,
        test_level_start=300000,
        test_num_levels=50,
    )
    test = source.split("test")
    assert test.num_frames == 2 * 32  # both games
    assert test.num_episodes == 2 * 8  # eval_num_envs environments per game
    seeds = [int(e["level_seed"]) for e in test.episodes]
    assert all(300000 <= s < 300050 for s in seeds)
    games = [e["game"] for e in test.episodes]
    assert games.count("coinrun") == games.count("bigfish") == 8
    actions = np.load(test.actions_path)
    known = actions[actions >= 0]
    assert known.max() < 2 * PROCGEN_NUM_ACTIONS
    offsets = {e["game"]: int(e["offset"]) for e in reversed(test.episodes)}  # first of each
    assert actions[offsets["bigfish"]] >= PROCGEN_NUM_ACTIONS  # bigfish's ids follow coinrun's
    train_seeds = {int(e["level_seed"]) for e in source.split("train").episodes}
    assert not train_seeds & set(seeds)


def test_without_test_frames_there_is_no_test_split(tmp_path) -> None:
    source = _source(tmp_path)
    source.split("val")
    with pytest.raises(ValueError, match="test"):
        source.split("test")
