"""`task=play`: roll a dynamics checkpoint out from a prompt frame, scripted or from the keyboard.

    python run.py task=play checkpoint=PATH play.actions=[0,1,1,2]        # headless
    python run.py task=play checkpoint=PATH play.interactive=true         # in the terminal
    python run.py task=play checkpoint=PATH play.ui=web                   # a page in the browser

The prompt is a validation frame of `data` (`play.prompt_index`) or an image file
(`play.prompt_image`, resized to the model's frame size). Actions are the model's own action ids
(latent codes for a model trained on LAM actions), or, with `play.action_space=true`, true action
ids of the game, translated to latent codes through the LAM's learned mapping: for each true
action, the latent code most specific to it where it starts, on the validation split
(`eval.metrics.onset_mapping`). Writes
`play.gif`, `play.mp4` and `play.json` (actions used, frames/s) into the run dir.

`play.ui` picks the front-end: headless (the default; `play.interactive=true` means terminal),
terminal, or web (`worldmodel.play.web`: a local page on `play.host:play.port`, serving the world
file and the other world files of its folder; prompts and keys come from the world itself).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from worldmodel.eval.clips import pixel_val, token_val, true_action_mapping
from worldmodel.media import save_gif, save_mp4
from worldmodel.play.keys import PROCGEN_MOVES
from worldmodel.play.terminal import MOVE_KEYS, KeyReader, help_line, run_interactive
from worldmodel.play.typed import play_typed
from worldmodel.play.web import serve
from worldmodel.runtime import resolve_device, set_threads
from worldmodel.world import World

log = logging.getLogger(__name__)

# Settings under `play:` and their defaults.
DEFAULTS: dict[str, Any] = {
    "actions": [],  # headless: the action ids to play, one per generated frame
    "action_space": "latent",  # latent (the model's action ids) | true (game actions, mapped)
    "prompt_index": 0,  # validation frame used as the prompt
    "prompt_image": None,  # or an image file as the prompt
    "interactive": False,  # keyboard play in the terminal (= ui terminal)
    "ui": "headless",  # headless | terminal | web (a local page in the browser)
    "host": "127.0.0.1",  # web: the address to listen on (this machine only by default)
    "port": 8765,  # web: the port (0 = any free one; the URL is printed)
    "steps": 4,  # MaskGIT decoding steps per frame (fewer = faster)
    "temperature": 1.0,  # sampling temperature (0 = greedy)
    "seed": None,  # sampling seed; null = the run's seed
    "precision": "fp32",  # fp32 | bf16 (batch-1 play is faster in fp32: tiny matmuls)
    "fps": 8,  # playback rate of play.gif / play.mp4
    "scale": 4,  # integer upscaling of play.gif / play.mp4
    "keys": None,  # movement -> true action id; null = procgen's buttons on procgen data
    "threads": None,  # torch threads; null = trainer.threads
}


UIS = ("headless", "terminal", "web")


def play_settings(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.play` over the defaults; unknown keys are refused by name (a typo is not ignored)."""
    given = cfg.get("play") or {}
    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else given
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown play settings: {', '.join(f'play.{k}' for k in unknown)} "
            f"(valid: {', '.join(sorted(DEFAULTS))})"
        )
    settings = {**DEFAULTS, **given}
    space = settings["action_space"]
    # `play.action_space=true` arrives from the command line as a boolean
    settings["action_space"] = "true" if space is True or space == "true" else space
    if settings["action_space"] not in ("latent", "true"):
        raise ValueError(f"play.action_space={space!r}: expected latent or true")
    if settings["precision"] not in ("bf16", "fp32"):
        raise ValueError(f"play.precision={settings['precision']!r}: expected bf16 or fp32")
    if settings["ui"] == "headless" and settings["interactive"]:
        settings["ui"] = "terminal"
    if settings["ui"] not in UIS:
        raise ValueError(f"play.ui={settings['ui']!r}: expected one of {', '.join(UIS)}")
    settings["interactive"] = settings["ui"] == "terminal"
    port = settings["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"play.port={port!r}: expected a port number 0..65535 (0 = any free)")
    if settings["seed"] is None:
        settings["seed"] = int(cfg.get("seed", 0))
    return settings


def load_prompt(settings: dict[str, Any], world: World, pixels: Any) -> np.ndarray:
    """The prompt picture (H, W, 3) uint8 at the world's frame size: `play.prompt_image` or
    validation frame `play.prompt_index` of the data."""
    if settings["prompt_image"] is not None:
        return world.prompt_frame(settings["prompt_image"])
    frames = np.load(pixels.frames_path, mmap_mode="r")
    index = int(settings["prompt_index"])
    if not 0 <= index < len(frames):
        raise ValueError(
            f"play.prompt_index={index} is outside the {len(frames)} validation frames"
        )
    return world.prompt_frame(np.asarray(frames[index]))


def true_to_model_actions(world: World, pixels: Any) -> dict[int, int]:
    """True action id -> model action id: the identity for a model trained on true actions, else
    the LAM's learned mapping (the one the world carries, or learned from the validation split:
    each action to the code most specific to it where the action starts,
    `eval.metrics.onset_mapping`;
    empty when the data has no true actions)."""
    if world.action_source == "true":
        n = pixels.num_actions if pixels is not None else world.num_actions
        return {a: a for a in range(int(n))} if n is not None else {}
    if world.true_to_model_actions:
        return dict(world.true_to_model_actions)
    if pixels is None or pixels.num_actions is None:
        return {}
    found = true_action_mapping(pixels, token_val(world, pixels), world.num_actions, onsets=True)
    return {} if found is None else found[1]


def scripted_actions(
    settings: dict[str, Any], world: World, mapping: dict[int, int], num_true: int | None
) -> list[int]:
    """`play.actions` as model action ids, all checked before anything is generated.

    `mapping` translates true action ids (of `num_true` game actions) for action_space=true.
    """
    requested = list(settings["actions"])
    if not requested:
        raise ValueError(
            "play.actions is empty: give e.g. play.actions=[0,1,1,2] or set play.interactive=true"
        )
    for a in requested:
        if isinstance(a, bool) or not isinstance(a, int):
            raise ValueError(f"play.actions holds {a!r}: action ids must be integers")
    if settings["action_space"] == "latent":
        for a in requested:
            world.check_action(a)
        return requested
    if not mapping:
        raise ValueError("play.action_space=true needs data with true actions (none recorded)")
    for a in requested:
        # num_true is None when no data was read: a world file's own key mapping says it all
        if num_true is not None and not 0 <= a < num_true:
            raise ValueError(f"true action {a} is outside [0, {num_true}) (the game's actions)")
        if a not in mapping:
            raise ValueError(
                f"true action {a} has no latent action in the world's key mapping (it never "
                f"starts in the validation data; true actions with one: {sorted(mapping)})"
            )
    return [mapping[a] for a in requested]


def key_actions(
    settings: dict[str, Any], data_cfg: DictConfig, mapping: dict[int, int], num_actions: int
) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """Key name -> model action, and movement -> (true id, model id) for the on-screen legend."""
    keys = {str(d): d for d in range(min(num_actions, 10))}
    moves_cfg = settings["keys"]
    if moves_cfg is None:
        moves_cfg = PROCGEN_MOVES if data_cfg.get("name") == "procgen" else {}
    unknown = sorted(set(moves_cfg) - set(MOVE_KEYS.values()))
    if unknown:
        raise ValueError(f"play.keys: unknown movements {unknown}; valid: up down left right noop")
    moves = {}
    for move, true_id in moves_cfg.items():
        if int(true_id) in mapping:
            moves[move] = (int(true_id), mapping[int(true_id)])
            keys.update({k: mapping[int(true_id)] for k, m in MOVE_KEYS.items() if m == move})
    return keys, moves


def save_frames(frames: list[np.ndarray], run_dir: Path, fps: float, scale: int) -> dict[str, Path]:
    """play.gif and play.mp4 of uint8 frames (H, W, 3)."""
    video = np.stack(frames)  # (T, H, W, 3)
    return {
        "gif": save_gif(video, run_dir / "play.gif", fps=fps, scale=scale),
        "mp4": save_mp4(video, run_dir / "play.mp4", fps=fps, scale=scale),
    }


def play_threads(settings: dict[str, Any], cfg: DictConfig) -> int | None:
    """Torch threads for play: `play.threads`, else `trainer.threads`, else 1 for the web page
    (its steps run in worker threads, where a 2-thread OpenMP team competes with the main
    thread's idle one: on 2 cores 51 ms a step at 2 threads, 35 ms at 1), else None (chosen)."""
    requested = settings["threads"] or cfg.trainer.get("threads")
    return 1 if settings["ui"] == "web" and not requested else requested


def play(cfg: DictConfig) -> dict[str, Any]:
    """Run `task=play` on a world (a world file, a run folder or a checkpoint); returns what it
    writes to play.json."""
    settings = play_settings(cfg)
    set_threads(play_threads(settings, cfg))
    device = resolve_device(cfg.trainer.get("accelerator", "cpu"))
    if settings["ui"] == "web":  # serves until interrupted; the page picks prompts and keys
        serve(cfg.checkpoint, settings, device)
        return {"checkpoint": str(Path(cfg.checkpoint).resolve()), "ui": "web"}
    world = World.load(cfg.checkpoint, device, settings["precision"])
    world.configure(int(settings["steps"]), float(settings["temperature"]), int(settings["seed"]))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    need_mapping = settings["interactive"] or settings["action_space"] == "true"
    need_data = settings["prompt_image"] is None or (
        need_mapping and not world.true_to_model_actions
    )
    # prompts and the key mapping come from the data the world was trained on
    data_cfg = world.config.get("data") or cfg.data
    pixels = pixel_val(data_cfg) if need_data else None
    mapping = true_to_model_actions(world, pixels) if need_mapping else {}

    prompt = load_prompt(settings, world, pixels)
    if world.dynamics.inputs == "latents":  # its own codes, typed action sets per step
        return play_typed(cfg, world, prompt, settings)
    world.reset(prompt)
    if settings["interactive"]:
        keys, moves = key_actions(settings, data_cfg, mapping, world.num_actions)
        legend = help_line(world.num_actions, moves, world.action_source)
        frames, actions = run_interactive(world, keys, legend, KeyReader())
    else:
        num_true = None if pixels is None else pixels.num_actions
        actions = scripted_actions(settings, world, mapping, num_true)
        for action in actions:
            world.step(action)
        frames = world.frames
    files = save_frames(frames, run_dir, float(settings["fps"]), int(settings["scale"]))
    result = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "prompt": settings["prompt_image"] or f"validation frame {settings['prompt_index']}",
        "action_source": world.action_source,
        "action_space": settings["action_space"],
        "requested_actions": list(settings["actions"]) if not settings["interactive"] else None,
        "actions": actions,
        "true_to_model_actions": {str(k): v for k, v in mapping.items()},
        "num_frames": len(frames),
        "frames_per_s": world.frames_per_second(),
        "steps": world.steps,
        "temperature": world.temperature,
        "precision": settings["precision"],
        "device": str(world.device),
        "files": {k: v.name for k, v in files.items()},
    }
    path = run_dir / "play.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    log.info("play: %d frames at %.1f frames/s -> %s", len(frames), result["frames_per_s"], path)
    return result
