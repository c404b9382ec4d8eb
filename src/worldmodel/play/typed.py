"""Play by typing actions: one line of input -> one generated frame.

Each line names the actions held during the next step, as action ids or names, separated by `+`,
commas or spaces: `right`, `right+jump`, `3 5` (several simultaneous actions, for a model that
takes action sets such as genie2; a model of single actions takes exactly one per line). An
empty line presses nothing (action-set models only); `q` (or the end of the stream) quits. A line
that cannot be read is reported and skipped, the session goes on.

The stream is stdin by default and any text stream otherwise (a `StringIO` script in tests, a
file of lines). Every frame is written as a PNG as soon as it exists (`frame_0000.png` is the
prompt) and the whole session as a GIF at the end; each step prints the frames per second of
generation plus decoding. Like `PlaySession`, the context keeps the temporal KV cache of the
frames so far (one frame of compute per step) and, when the model's window is full, keeps the
most recent half of it and rebuilds the cache once.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.media import save_gif, to_uint8

QUIT = frozenset({"q", "quit", "exit"})
# movements of procgen's 15 buttons (env.get_combos); `jump` is `up` in the platform games
PROCGEN_NAMES = {"left": 1, "down": 3, "noop": 4, "up": 5, "jump": 5, "right": 7}


def parse_actions(line: str, names: Mapping[str, int], num_actions: int) -> list[int] | None:
    """The sorted action ids a typed line holds; None for a quit command.

    Raises ValueError naming the word for an unknown name or an id outside [0, num_actions).
    """
    text = line.strip().lower()
    if text in QUIT:
        return None
    ids = set()
    for word in (w for w in re.split(r"[+,\s]+", text) if w):
        if word.lstrip("-").isdigit():
            action = int(word)
        elif word in names:
            action = int(names[word])
        else:
            known = ", ".join(sorted(names)) or "none"
            raise ValueError(
                f"unknown action {word!r} (names: {known}; or ids 0..{num_actions - 1})"
            )
        if not 0 <= action < num_actions:
            raise ValueError(f"action {word!r} = {action} is outside [0, {num_actions})")
        ids.add(action)
    return sorted(ids)


@dataclass
class TypedWorld:
    """What the typed loop drives: a world model over codes, its prompt and its decoder.

    `model` has `max_frames`, `num_actions`, `new_cache` and `generate_next`; `prompt` is the
    prompt frame's codes (h, w); `decode` maps codes (1, 1, h, w) and the codes of the frames
    before them (1, c, h, w) (or None) to a picture (H, W, 3) uint8;
    `multi_action`: the model takes action sets (B, T, num_actions) (else one id per step);
    `sampling`: keyword arguments of every `generate_next` call (temperature, cond_scale, ...).
    """

    model: nn.Module
    prompt: Tensor
    decode: Callable[[Tensor, Tensor | None], np.ndarray]
    multi_action: bool
    sampling: dict[str, Any]


def run_typed(
    world: TypedWorld,
    out_dir: str | Path,
    stream: IO[str] | None = None,
    names: Mapping[str, int] | None = None,
    seed: int = 0,
    fps: float = 8.0,
    scale: int = 1,
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Generate a frame per typed line of `stream` (stdin if None) until `q` or its end.

    Writes `frame_NNNN.png` per frame and `typed.gif` into `out_dir`; prints per step to `out`
    (stdout if None). Returns {actions (per step, the ids pressed), num_frames,
    frames_per_s, files}.
    """
    from PIL import Image

    stream = sys.stdin if stream is None else stream
    out = sys.stdout if out is None else out
    names = dict(PROCGEN_NAMES if names is None else names)
    model = world.model
    num_actions, max_frames = int(model.num_actions), int(model.max_frames)
    keep = max(1, max_frames // 2)  # frames kept when the window is full
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    tokens = world.prompt.long()[None, None]  # (1, L, h, w): the context window
    if world.multi_action:
        history = torch.zeros(1, 0, num_actions)  # (1, L-1, A): action sets between frames
    else:
        history = torch.zeros(1, 0, dtype=torch.long)  # (1, L-1): action ids
    cache = None
    frames = [world.decode(tokens, None)]
    files = [out_dir / "frame_0000.png"]
    Image.fromarray(frames[0]).save(files[0])
    taken: list[list[int]] = []
    seconds: list[float] = []
    for line in stream:
        try:
            pressed = parse_actions(line, names, num_actions)
            if pressed is not None and not world.multi_action and len(pressed) != 1:
                raise ValueError(f"this model takes exactly one action per step, got {pressed}")
        except ValueError as e:
            print(f"skipped {line.strip()!r}: {e}", file=out, flush=True)
            continue
        if pressed is None:
            break
        start = time.perf_counter()
        if world.multi_action:
            step = torch.zeros(1, 1, num_actions)
            step[0, 0, pressed] = 1.0
        else:
            step = torch.tensor([[pressed[0]]])
        if tokens.shape[1] >= max_frames:
            # window full: keep the recent frames and the actions between them, re-encode once
            tokens = tokens[:, -keep:]
            history = history[:, history.shape[1] - (keep - 1) :]
            cache = None
        actions = torch.cat([history, step], dim=1)  # (1, L[, A]): the last drives the new frame
        with torch.no_grad():
            if cache is None:
                cache = model.new_cache(tokens, history)
            new = model.generate_next(
                tokens, actions, cache=cache, generator=generator, **world.sampling
            )  # (1, h, w)
            frame = world.decode(new[:, None], tokens)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        history = actions
        seconds.append(time.perf_counter() - start)
        frames.append(frame)
        taken.append(pressed)
        files.append(out_dir / f"frame_{len(frames) - 1:04d}.png")
        Image.fromarray(frame).save(files[-1])
        rate = 1.0 / seconds[-1] if seconds[-1] > 0 else float("inf")
        label = "+".join(str(a) for a in pressed) or "none"
        print(
            f"step {len(taken)}: {label} -> {files[-1].name} ({rate:.1f} fps)", file=out, flush=True
        )
    gif = save_gif(np.stack(frames), out_dir / "typed.gif", fps=fps, scale=scale)
    # the first step includes warm-up (allocations, first kernels); leave it out when possible
    timed = seconds[1:] if len(seconds) > 1 else seconds
    result = {
        "actions": taken,
        "num_frames": len(frames),
        "frames_per_s": len(timed) / sum(timed) if timed and sum(timed) > 0 else 0.0,
        "files": {"pngs": [p.name for p in files], "gif": gif.name},
    }
    print(f"{len(taken)} steps at {result['frames_per_s']:.1f} frames/s -> {gif}", file=out)
    return result


def genie2_world(model: nn.Module, tokenizer: nn.Module, prompt: np.ndarray, **sampling: Any):
    """A `TypedWorld` for a model over the tokenizer's latents (genie2, teco): the prompt picture
    (H, W, 3) uint8 goes through the frozen tokenizer's encoder and the model's own quantizer;
    codes decode through both back."""
    video = torch.from_numpy(prompt.copy()).permute(2, 0, 1).float().div(127.5).sub(1)
    with torch.no_grad():
        z = tokenizer.encode(video[None, :, None])  # (1, D, 1, h, w)
        codes = model.encode(rearrange(z.float(), "b d t h w -> b t h w d"))  # (1, 1, h, w)

    def decode(tokens: Tensor, context: Tensor | None) -> np.ndarray:
        if model.decodes_in_context:  # its codes are decoded after the codes before them
            video = model.decode_pixels(tokenizer, tokens, context)  # (1, C, 1, H, W)
        else:
            video = model.decode_pixels(tokenizer, tokens)  # (1, C, 1, H, W)
        frame = rearrange(to_uint8(video[0, :, 0]), "c h w -> h w c")
        return np.ascontiguousarray(frame.expand(-1, -1, 3).numpy())

    return TypedWorld(model, codes[0, 0], decode, multi_action=True, sampling=sampling)


def play_typed(cfg: Any, parts: Any, prompt: np.ndarray, settings: dict[str, Any]) -> dict:
    """`task=play` for a genie2 checkpoint: typed lines from stdin (`play.interactive=true`) or
    the scripted `play.actions` (ids, or strings such as "right+jump"), one line per step.
    Writes the frames, `typed.gif` and `play.json` into the run dir."""
    import io

    world = genie2_world(
        parts.dynamics,
        parts.tokenizer,
        prompt,
        temperature=float(settings["temperature"]),
    )
    run_dir = Path(cfg.run_dir)
    stream = None
    if not settings["interactive"]:
        if not settings["actions"]:
            raise ValueError(
                "play.actions is empty: give e.g. play.actions=[7,'7+5'] or set "
                "play.interactive=true"
            )
        stream = io.StringIO("\n".join(str(a) for a in settings["actions"]) + "\n")
    names = PROCGEN_NAMES if cfg.data.get("name") == "procgen" else {}
    result = run_typed(
        world,
        run_dir,
        stream,
        names,
        seed=int(settings["seed"]),
        fps=float(settings["fps"]),
        scale=int(settings["scale"]),
    )
    result["checkpoint"] = str(Path(cfg.checkpoint).resolve())
    path = run_dir / "play.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result
