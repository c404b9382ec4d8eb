"""A picture of a world under key sequences: rows of start frames, each played with the same keys.

    python -m worldmodel.play.sheet experiments/demo/world.safetensors sheet.png \
        --keys right:8,left:8 --rows 6 --every 2

Each row starts from another start frame (the `prompts.npz` beside the world, or `--prompts`) and
plays the key sequence (`move:count` pairs; moves are those of `play.keys`: left, right, up,
down, noop and the two-key combos such as right+up); the sheet shows the start frame and every
`every`-th generated frame, upscaled, with a gap between frames and rows. The same world, keys
and seed give the same sheet. Keys become model actions the way the play front-ends send them
(`keys.world_moves`: the identity for a world on recorded actions, the LAM's learned mapping for
a world on latent actions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from worldmodel.media import tile_frames
from worldmodel.play.keys import world_moves
from worldmodel.play.prompts import load_prompts, prompts_beside
from worldmodel.world import World


def parse_keys(text: str) -> list[tuple[str, int]]:
    """`"right:8,left:8"` -> [("right", 8), ("left", 8)]; a clear error for anything else."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        move, _, count = part.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"--keys {part!r}: expected move:count, e.g. right:8") from None
        if n < 1:
            raise ValueError(f"--keys {part!r}: the count must be >= 1")
        out.append((move.strip(), n))
    if not out:
        raise ValueError("--keys is empty: give e.g. right:8,left:8")
    return out


def key_actions(world: World, keys: list[tuple[str, int]]) -> list[int]:
    """The model actions a key sequence sends to `world`, one per generated frame."""
    moves = world_moves(world)
    unknown = sorted({m for m, _ in keys} - set(moves))
    if unknown:
        raise ValueError(f"moves {unknown} are not playable in this world (it has {sorted(moves)})")
    return [moves[m]["model"] for m, n in keys for _ in range(n)]


def key_sheet(
    world: World,
    prompts: np.ndarray,
    actions: list[int],
    every: int = 2,
    scale: int = 3,
    gap: int = 2,
) -> np.ndarray:
    """Rows of frames (R*(H*scale) + gaps, C*(W*scale) + gaps, 3) uint8: for each prompt
    (N, H, W, 3), the prompt and every `every`-th frame of its rollout under `actions`."""
    if every < 1 or scale < 1 or gap < 0:
        raise ValueError(f"every={every}, scale={scale} must be >= 1 and gap={gap} >= 0")
    # per prompt: the prompt, then every `every`-th generated frame
    rows = [world.rollout(actions, prompt)[::every] for prompt in prompts]
    return tile_frames(rows, padding=gap, scale=scale, border=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worldmodel.play.sheet",
        description="Draw a world's rollouts under a key sequence from several start frames.",
    )
    parser.add_argument("world", help="a world file or run folder")
    parser.add_argument("out", help="the picture to write (.png)")
    parser.add_argument("--keys", default="right:8,left:8", help="move:count pairs")
    parser.add_argument("--prompts", default=None, help="prompts file (default: beside world)")
    parser.add_argument("--rows", type=int, default=6, help="start frames (spread over the file)")
    parser.add_argument("--every", type=int, default=2, help="show every n-th generated frame")
    parser.add_argument("--steps", type=int, default=4, help="MaskGIT steps per frame")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3)
    args = parser.parse_args(argv)
    prompts_file = args.prompts or prompts_beside(args.world)
    if prompts_file is None:
        raise SystemExit(f"no prompts.npz beside {args.world}: give --prompts")
    prompts = load_prompts(prompts_file)
    picked = np.unique(np.linspace(0, len(prompts) - 1, min(args.rows, len(prompts))).astype(int))
    world = World.load(args.world)
    world.configure(args.steps, args.temperature, args.seed)
    actions = key_actions(world, parse_keys(args.keys))
    sheet = key_sheet(world, prompts[picked], actions, args.every, args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    print(f"wrote {out}: {len(picked)} start frames x {len(actions)} steps ({args.keys})")


if __name__ == "__main__":
    main()
