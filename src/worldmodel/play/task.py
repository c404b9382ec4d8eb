"""`task=play`: roll a dynamics checkpoint out from a prompt frame, scripted or from the keyboard.

    python run.py task=play checkpoint=PATH play.actions=[0,1,1,2]        # headless
    python run.py task=play checkpoint=PATH play.interactive=true         # in the terminal

The prompt is a validation frame of `data` (`play.prompt_index`) or an image file
(`play.prompt_image`, resized to the model's frame size). Actions are the model's own action ids
(latent codes for a model trained on LAM actions), or, with `play.action_space=true`, true action
ids of the game, translated to latent codes through the LAM's learned mapping: for each true
action, the latent code the LAM most often inferred for it on the validation split. Writes
`play.gif`, `play.mp4` and `play.json` (actions used, frames/s) into the run dir.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from worldmodel.build import load_model
from worldmodel.data.frames import parse_resolution, resize_frames
from worldmodel.eval.world import WorldParts, load_world, pixel_val, token_val, true_action_mapping
from worldmodel.pipeline import tokenize_frames
from worldmodel.play.session import PlaySession, save_frames
from worldmodel.play.terminal import MOVE_KEYS, KeyReader, help_line, run_interactive

log = logging.getLogger(__name__)

# Settings under `play:` and their defaults.
DEFAULTS: dict[str, Any] = {
    "actions": [],  # headless: the action ids to play, one per generated frame
    "action_space": "latent",  # latent (the model's action ids) | true (game actions, mapped)
    "prompt_index": 0,  # validation frame used as the prompt
    "prompt_image": None,  # or an image file as the prompt
    "interactive": False,  # keyboard play in the terminal
    "steps": 4,  # MaskGIT decoding steps per frame (fewer = faster)
    "temperature": 1.0,  # sampling temperature (0 = greedy)
    "seed": None,  # sampling seed; null = the run's seed
    "precision": "fp32",  # fp32 | bf16 (batch-1 play is faster in fp32: tiny matmuls)
    "fps": 8,  # playback rate of play.gif / play.mp4
    "scale": 4,  # integer upscaling of play.gif / play.mp4
    "keys": None,  # movement -> true action id; null = procgen's buttons on procgen data
    "threads": None,  # torch threads; null = trainer.threads
}
# procgen's 15 actions are button combinations; these are the plain movements (env.get_combos)
PROCGEN_MOVES = {"left": 1, "down": 3, "noop": 4, "up": 5, "right": 7}


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
    if settings["seed"] is None:
        settings["seed"] = int(cfg.get("seed", 0))
    return settings


def frame_size(parts: WorldParts) -> tuple[int, int]:
    """(H, W) of the frames the dynamics model's tokenizer was trained on."""
    return parse_resolution(parts.config.data.resolution)


def load_prompt(settings: dict[str, Any], size: tuple[int, int], pixels: Any) -> np.ndarray:
    """The prompt picture (H, W, 3) uint8 at the model's frame size."""
    if settings["prompt_image"] is not None:
        from PIL import Image

        path = Path(settings["prompt_image"])
        if not path.is_file():
            raise FileNotFoundError(f"play.prompt_image={path}: no such file")
        try:
            with Image.open(path) as image:
                frame = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"play.prompt_image={path} cannot be read as an image: {e}") from e
        where = str(path)
    else:
        frames = np.load(pixels.frames_path, mmap_mode="r")
        index = int(settings["prompt_index"])
        if not 0 <= index < len(frames):
            raise ValueError(
                f"play.prompt_index={index} is outside the {len(frames)} validation frames"
            )
        frame = np.asarray(frames[index])
        where = f"validation frame {index}"
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    if frame.shape[:2] != tuple(size):
        log.warning(
            "prompt %s is %dx%d; resizing it to the tokenizer's %dx%d",
            where,
            frame.shape[0],
            frame.shape[1],
            *size,
        )
        frame = resize_frames(frame[None], size)[0]
    return frame


def true_to_model_actions(parts: WorldParts, data_cfg: DictConfig, pixels: Any) -> dict[int, int]:
    """True action id -> model action id: the identity for a model trained on true actions, else
    the LAM's learned mapping (empty when the data has no true actions)."""
    if pixels.num_actions is None:
        return {}
    if parts.action_source == "true":
        return {a: a for a in range(int(pixels.num_actions))}
    tokens = token_val(parts, data_cfg, pixels)
    found = true_action_mapping(pixels, tokens, parts.num_actions)
    return {} if found is None else found[1]


def scripted_actions(
    settings: dict[str, Any], session: PlaySession, mapping: dict[int, int], num_true: int | None
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
            session.check_action(a)
        return requested
    if not mapping or num_true is None:
        raise ValueError("play.action_space=true needs data with true actions (none recorded)")
    for a in requested:
        if not 0 <= a < num_true:
            raise ValueError(f"true action {a} is outside [0, {num_true}) (the game's actions)")
        if a not in mapping:
            raise ValueError(
                f"true action {a} never occurs in the validation data, so it has no latent "
                f"action (true actions with one: {sorted(mapping)})"
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


def play(cfg: DictConfig) -> dict[str, Any]:
    """Run `task=play`; returns what it writes to play.json."""
    settings = play_settings(cfg)
    threads = settings["threads"] or cfg.trainer.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    model, _, state = load_model(cfg.checkpoint)
    parts = load_world(model, state)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    need_mapping = settings["interactive"] or settings["action_space"] == "true"
    pixels = pixel_val(cfg.data) if need_mapping or settings["prompt_image"] is None else None
    mapping = true_to_model_actions(parts, cfg.data, pixels) if need_mapping else {}

    prompt = load_prompt(settings, frame_size(parts), pixels)
    if hasattr(model, "decode_pixels"):  # genie2: its own codes, typed action sets per step
        from worldmodel.play.typed import play_typed

        return play_typed(cfg, parts, prompt, settings)
    grid = tokenize_frames(parts.tokenizer, prompt[None].copy())  # (1, h, w)
    tokens = torch.from_numpy(grid).long()
    session = PlaySession(
        parts,
        tokens[0],
        steps=int(settings["steps"]),
        temperature=float(settings["temperature"]),
        seed=int(settings["seed"]),
        bf16=settings["precision"] == "bf16",
    )
    if settings["interactive"]:
        keys, moves = key_actions(settings, cfg.data, mapping, session.num_actions)
        legend = help_line(session.num_actions, moves, parts.action_source)
        frames, actions = run_interactive(session, keys, legend, KeyReader())
    else:
        num_true = None if pixels is None else pixels.num_actions
        actions = scripted_actions(settings, session, mapping, num_true)
        for action in actions:
            session.step(action)
        frames = session.frames
    files = save_frames(frames, run_dir, float(settings["fps"]), int(settings["scale"]))
    result = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "prompt": settings["prompt_image"] or f"validation frame {settings['prompt_index']}",
        "action_source": parts.action_source,
        "action_space": settings["action_space"],
        "requested_actions": list(settings["actions"]) if not settings["interactive"] else None,
        "actions": actions,
        "true_to_model_actions": {str(k): v for k, v in mapping.items()},
        "num_frames": len(frames),
        "frames_per_s": session.frames_per_second(),
        "steps": session.steps,
        "temperature": session.temperature,
        "precision": settings["precision"],
        "files": {k: v.name for k, v in files.items()},
    }
    path = run_dir / "play.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    log.info("play: %d frames at %.1f frames/s -> %s", len(frames), result["frames_per_s"], path)
    return result
