"""Start frames shipped beside a world: one frame from each of a few dozen test-level episodes.

    python -m worldmodel.play.prompts experiments/demo/world.safetensors \
        experiments/demo/prompts.npz --count 32

reads the world's own data config (the one its world model was trained with), takes the `test`
split (recorded into the data cache on first use by the project's data code), and keeps frame
`offset` (or the last, in a shorter episode) of `count` episodes spread evenly over the split, so
every prompt is early in another level no recipe was tuned on (not the very first frame: CoinRun
draws it before the camera has settled on the character). The file holds `frames` (N, H, W, 3)
uint8 and `level_seeds` (N,) int64 (-1 where the source records none). The web page offers these
as start frames (`prompts.npz` next to a world file; see `prompts_beside`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from worldmodel.eval.clips import pixel_val
from worldmodel.world import World

PROMPTS_FILE = "prompts.npz"
MAX_PROMPTS = 256


def prompts_beside(world_path: str | Path) -> Path | None:
    """The prompts file next to a world file (or inside a run folder), if there is one."""
    path = Path(world_path)
    candidate = (path if path.is_dir() else path.parent) / PROMPTS_FILE
    return candidate if candidate.is_file() else None


def load_prompts(path: str | Path) -> np.ndarray:
    """Prompt frames (N, H, W, 3) uint8 from a prompts file; a clear error for anything else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            frames = np.asarray(data["frames"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a prompts file (an .npz with frames): {e}") from e
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(
            f"{path}: frames must be (N, H, W, 3) uint8 with N >= 1, got {frames.dtype} "
            f"{frames.shape}"
        )
    return frames


def make_prompts(
    world: World, count: int, split: str = "test", root: str | None = None, offset: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Frame `offset` of `count` episodes of the world's data split, spread evenly over it:
    frames (N, H, W, 3) uint8 at the world's frame size and their level seeds (N,)."""
    if not 1 <= count <= MAX_PROMPTS:
        raise ValueError(f"count={count}: expected 1..{MAX_PROMPTS}")
    if offset < 0:
        raise ValueError(f"offset={offset}: expected >= 0")
    data_cfg = world.config.get("data")
    if data_cfg is None:
        raise ValueError("the world stores no data config: prompts cannot be drawn from its data")
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    if root is not None:
        data_cfg.root = root
    clips = pixel_val(data_cfg, split)
    frames = np.load(clips.frames_path, mmap_mode="r")  # (N, H, W, C) uint8
    episodes = clips.episodes
    picked = np.unique(np.linspace(0, len(episodes) - 1, min(count, len(episodes))).astype(int))
    starts = [
        int(episodes[i]["offset"]) + min(offset, int(episodes[i]["length"]) - 1) for i in picked
    ]
    seeds = np.array([int(episodes[i].get("level_seed", -1)) for i in picked], dtype=np.int64)
    out = np.stack([world.prompt_frame(np.asarray(frames[s])) for s in starts])  # (N, H, W, 3)
    return out, seeds


def save_prompts(path: str | Path, frames: np.ndarray, level_seeds: np.ndarray) -> Path:
    """Write a prompts file atomically (compressed: a few dozen 64x64 frames are ~100 KB)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez_compressed(tmp, frames=frames, level_seeds=level_seeds)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worldmodel.play.prompts",
        description="Write start frames for the web page from a world's test levels.",
    )
    parser.add_argument("world", help="a world file or run folder")
    parser.add_argument("out", help="the prompts file to write, e.g. prompts.npz")
    parser.add_argument("--count", type=int, default=32, help="episodes to take a frame from")
    parser.add_argument("--split", default="test", help="data split (test: reporting levels)")
    parser.add_argument("--root", default=None, help="data cache folder (default: the stored)")
    parser.add_argument("--offset", type=int, default=4, help="frame of each episode to take")
    args = parser.parse_args(argv)
    world = World.load(args.world)
    frames, seeds = make_prompts(world, args.count, args.split, args.root, args.offset)
    out = save_prompts(args.out, frames, seeds)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): {len(frames)} {args.split} frames")


if __name__ == "__main__":
    main()
