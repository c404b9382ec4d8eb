"""Generation speed of world models side by side, in pixel frames per second of video.

    python experiments/tokenizer_temporal/gen_fps.py RUN_DIR [RUN_DIR ...] [--repeats 5]

Each RUN_DIR is a world model's run folder (its checkpoint names its frozen tokenizer). The
worlds take turns (one measurement of each per round, so a shared machine slows all of them
alike) and the median over `--repeats` rounds is printed as one JSON line per world:

- `gen_fps`: `eval.world.generation_speed`, the figure eval.json reports: latent frames
  generated one at a time with the KV cache after one real latent frame (8 MaskGIT steps,
  greedy), decoding excluded; a latent frame of a tokenizer that compresses time counts as the
  k pixel frames it decodes to.
- `fps_decoded`: the same rollout followed by decoding it to pixels (`World.decode_after`: per
  frame for per-frame tokens, the context and new latent frames as one clip otherwise), pixel
  frames generated divided by the whole time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from worldmodel.eval.world import Sampling, generation_speed
from worldmodel.world import World


def rollout_and_decode(world: World, tokens: torch.Tensor, actions: torch.Tensor, n: int) -> float:
    """Pixel frames per second of generating `n` latent frames after `tokens` (1, 1, h, w) and
    decoding them."""
    start = time.perf_counter()
    with torch.no_grad():
        new = world.dynamics.rollout(tokens, actions, n, steps=8, temperature=0.0)
        frames = world.decode_after(tokens, new)  # (1, C, n k, H, W)
    return frames.shape[2] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="world-model run folders")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    worlds = {run: World.load(run) for run in args.runs}
    contexts = {}
    for run, world in worlds.items():
        h, w = world.dynamics.grid
        tokens = torch.randint(0, world.dynamics.vocab_size, (1, 1, h, w))  # (1, 1, h, w)
        actions = torch.zeros(1, world.dynamics.max_frames, dtype=torch.long)  # (1, L)
        contexts[run] = (tokens, actions, world.dynamics.max_frames - 1)
    sampling = Sampling(steps=8, temperature=0.0, generator=torch.Generator().manual_seed(0))
    results: dict[str, dict[str, list[float]]] = {r: {"gen": [], "dec": []} for r in args.runs}
    for _ in range(args.repeats):
        for run, world in worlds.items():
            tokens, actions, n = contexts[run]
            results[run]["gen"].append(
                generation_speed(world, tokens, actions, n, sampling, bf16=False)
            )
            results[run]["dec"].append(rollout_and_decode(world, tokens, actions, n))
    for run, world in worlds.items():
        print(
            json.dumps(
                {
                    "run": run,
                    "frames_per_latent": world.frames_per_latent,
                    "latent_frames": contexts[run][2],
                    "dim": int(world.dynamics.token_emb.embedding_dim),
                    "gen_fps": statistics.median(results[run]["gen"]),
                    "gen_fps_runs": [round(v, 2) for v in results[run]["gen"]],
                    "fps_decoded": statistics.median(results[run]["dec"]),
                    "fps_decoded_runs": [round(v, 2) for v in results[run]["dec"]],
                    "threads": args.threads,
                }
            )
        )


if __name__ == "__main__":
    main()
