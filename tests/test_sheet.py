"""The key sheet: the shipped world played with key sequences from its shipped start frames."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from worldmodel.play.prompts import load_prompts
from worldmodel.play.sheet import key_actions, key_sheet, main, parse_keys
from worldmodel.world import World

DEMO = ROOT / "experiments" / "demo"


@pytest.fixture(scope="module")
def world() -> World:
    world = World.load(DEMO / "world.safetensors")
    world.configure(steps=2, temperature=0.0, seed=0)
    return world


def test_parse_keys_and_bad_keys(world):
    assert parse_keys("right:3, left:2,up") == [("right", 3), ("left", 2), ("up", 1)]
    for bad in ("", "right:x", "right:0"):
        with pytest.raises(ValueError, match="--keys"):
            parse_keys(bad)
    with pytest.raises(ValueError, match=r"moves \['fly'\] are not playable"):
        key_actions(world, [("fly", 2)])


def test_sheet_rows_follow_the_keys(world, tmp_path):
    prompts = load_prompts(DEMO / "prompts.npz")[:2]
    right = key_actions(world, parse_keys("right:4"))
    left = key_actions(world, parse_keys("left:4"))
    sheet = key_sheet(world, prompts, right, every=2, scale=2, gap=1)
    h, w = prompts.shape[1:3]
    assert sheet.shape == (2 * 2 * h + 1, 3 * (2 * w + 1) - 1, 3)  # 2 rows of frames 0, 2, 4
    # the first frame of each row is the start frame the world was reset with
    first = sheet[: 2 * h, : 2 * w][::2, ::2]
    np.testing.assert_array_equal(first, world.rollout([], prompts[0])[0])
    # the same world, keys and seed draw the same sheet; other keys draw another one
    np.testing.assert_array_equal(sheet, key_sheet(world, prompts, right, 2, 2, 1))
    if right != left:
        assert not np.array_equal(sheet, key_sheet(world, prompts, left, 2, 2, 1))

    out = tmp_path / "sheet.png"
    main([str(DEMO / "world.safetensors"), str(out), "--keys", "right:2", "--rows", "2"])
    assert Image.open(out).size[1] == 2 * 3 * h + 2  # 2 rows at scale 3, one gap
