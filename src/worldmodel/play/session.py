"""Web play without the transport: the worlds a server offers, and one play session per tab.

`WorldLibrary` lists the world files a server offers (every `*.safetensors` in the folder of the
one it was started on, or a run folder / checkpoint alone) and loads each at most once; its
weights are then shared read-only by every session. `PlaySession` is one tab's game: a World of
its own over those shared weights (its own prompt, context, KV cache, random stream, settings),
behind a lock, so tabs never see each other's frames. Every method raises ValueError with a
message for the page when the input is wrong (an unknown action, an unreadable image, a file that
is not a world); the server turns it into an error message and keeps serving.

Frames travel as raw RGB bytes behind a 16-byte header (`FRAME_HEADER`): a 64x64 frame is 12 KB,
cheaper to pack and draw than a PNG.
"""

from __future__ import annotations

import copy
import io
import secrets
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.media import save_gif, save_mp4
from worldmodel.play.keys import world_moves
from worldmodel.play.prompts import load_prompts, prompts_beside
from worldmodel.world import World

# seq (the request it answers, 0 = none), frame index since reset, height, width, compute ms
FRAME_HEADER = struct.Struct("<IIHHf")
MAX_UPLOAD_BYTES = 8 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_STEPS = 64
MAX_TEMPERATURE = 10.0
VIDEO_FORMATS = ("gif", "mp4")


def pack_frame(frame: np.ndarray, seq: int, index: int, compute_ms: float) -> bytes:
    """A uint8 frame (H, W, 3) as the binary message the page draws."""
    h, w, _ = frame.shape
    return FRAME_HEADER.pack(seq, index, h, w, compute_ms) + np.ascontiguousarray(frame).tobytes()


def decode_image(data: bytes, limit: int = MAX_UPLOAD_BYTES) -> np.ndarray:
    """An uploaded image file's bytes -> (H, W, 3) uint8; ValueError naming what is wrong."""
    from PIL import Image

    if not data:
        raise ValueError("the upload is empty: drop an image file (PNG, JPEG, GIF, ...)")
    if len(data) > limit:
        raise ValueError(
            f"the upload is {len(data) / 2**20:.1f} MB; images up to {limit / 2**20:.0f} MB "
            "are accepted"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise ValueError(
                    f"the image is {image.width}x{image.height}; at most "
                    f"{MAX_UPLOAD_PIXELS} pixels are accepted"
                )
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the upload is not an image that can be read ({e})") from e


class WorldLibrary:
    """The worlds a server offers by name, each loaded once onto `device` at `precision`.

    `source` is a world file (every `*.safetensors` beside it is offered too, it first), a folder
    of world files, or a run folder / checkpoint (offered alone).
    """

    def __init__(
        self, source: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> None:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such world file, folder or checkpoint")
        self.device, self.precision = device, precision
        is_run = source.is_dir() and (
            (source / "stages.json").exists() or (source / "checkpoints").is_dir()
        )
        if source.is_dir() and not is_run:
            files = sorted(source.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{source}: no world files (*.safetensors) in this folder")
            self.paths = {p.name: p for p in files}
            self.default = files[0].name
        elif source.suffix == ".safetensors":
            self.paths = {p.name: p for p in sorted(source.parent.glob("*.safetensors"))}
            self.default = source.name
        else:
            self.paths = {source.name: source}
            self.default = source.name
        self._worlds: dict[str, World] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def path(self, name: str) -> Path:
        if name not in self.paths:
            raise ValueError(f"no world named {name!r} here (offered: {', '.join(self.paths)})")
        return self.paths[name]

    def get(self, name: str) -> World:
        """The shared, loaded world `name` (read-only: play through `PlaySession`)."""
        path = self.path(name)
        with self._lock:
            if name not in self._worlds:
                try:
                    self._worlds[name] = World.load(path, self.device, self.precision)
                except (ValueError, FileNotFoundError) as e:
                    raise ValueError(f"{name} cannot be played: {e}") from e
                except Exception as e:  # a corrupt file fails inside safetensors or torch
                    raise ValueError(
                        f"{name} cannot be played: it is not a readable world file "
                        f"({type(e).__name__}: {e})"
                    ) from e
            return self._worlds[name]

    def prompts(self, name: str) -> np.ndarray | None:
        """The start frames (N, H, W, 3) uint8 shipped beside world `name`, if any."""
        found = prompts_beside(self.path(name))
        return load_prompts(found) if found is not None else None


class PlaySession:
    """One tab's game on a world of the library; every call holds the session's lock."""

    def __init__(self, library: WorldLibrary, settings: dict[str, Any]) -> None:
        self.id = secrets.token_urlsafe(12)
        self.library = library
        self.settings = settings
        self.lock = threading.Lock()
        self.world: World | None = None
        self.name = ""
        self.prompts: np.ndarray | None = None
        self.prompt = 0  # index into prompts; -1 = an uploaded image

    # ------------------------------------------------------------------ world and settings
    def open(self, name: str) -> np.ndarray:
        """Play world `name` (loaded on first use) from its first start frame."""
        shared = self.library.get(name)
        prompts = self.library.prompts(name)
        with self.lock:
            # a World of its own over the shared modules: state, prompt and settings are per tab
            world = copy.copy(shared)
            world.state, world.prompt_tokens, world.prompt_pixels = None, None, None
            world.configure(
                int(self.settings["steps"]),
                float(self.settings["temperature"]),
                int(self.settings["seed"]),
            )
            before = self.world, self.name, self.prompts, self.prompt
            self.world, self.name, self.prompts, self.prompt = world, name, prompts, 0
            try:
                return world.reset(self._prompt_frame(0))
            except Exception:  # e.g. a world that cannot be played frame by frame: keep the last
                self.world, self.name, self.prompts, self.prompt = before
                raise

    def _prompt_frame(self, index: int) -> np.ndarray:
        if self.prompts is None:
            image = self.settings.get("prompt_image")
            if image is not None:
                return self._world.prompt_frame(image)
            return np.full((*self._world.frame_size, 3), 128, dtype=np.uint8)  # drop an image
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"prompt {index!r} is not an integer")
        if not 0 <= index < len(self.prompts):
            raise ValueError(f"prompt {index} is outside the {len(self.prompts)} start frames")
        return self.prompts[index]

    @property
    def _world(self) -> World:
        if self.world is None:
            raise ValueError("no world is open in this session")
        return self.world

    def configure(self, steps: Any = None, temperature: Any = None) -> None:
        """MaskGIT steps per frame and sampling temperature (from the next frame on)."""
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS
        ):
            raise ValueError(f"steps={steps!r}: expected an integer in 1..{MAX_STEPS}")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= MAX_TEMPERATURE
        ):
            raise ValueError(f"temperature={temperature!r}: expected a number in 0..10")
        with self.lock:
            self._world.configure(steps=steps, temperature=temperature)

    def info(self) -> dict[str, Any]:
        """What the page shows: the worlds, this one's actions and keys, its settings."""
        world = self._world
        return {
            "type": "info",
            "session": self.id,
            "worlds": self.library.names,
            "world": self.name,
            "num_actions": world.num_actions,
            "action_source": world.action_source,
            "moves": world_moves(world, self.settings.get("keys")),
            "prompts": 0 if self.prompts is None else len(self.prompts),
            "prompt": self.prompt,
            "steps": world.steps,
            "temperature": world.temperature,
            "frame_size": list(world.frame_size),
            "max_upload_bytes": MAX_UPLOAD_BYTES,
        }

    # ------------------------------------------------------------------ play
    def reset(self, prompt: Any = None) -> np.ndarray:
        """Back to a start frame (`prompt` index), or to the current one with its random stream
        from the start (the same keys then give the same frames)."""
        with self.lock:
            if prompt is None:
                return self._world.reset()
            frame = self._world.reset(self._prompt_frame(prompt))
            self.prompt = prompt
            return frame

    def reset_image(self, data: bytes) -> np.ndarray:
        """Start from an uploaded image file (resized to the world's frame size)."""
        image = decode_image(data)
        with self.lock:
            frame = self._world.reset(image)
            self.prompt = -1
            return frame

    def step(self, action: Any) -> tuple[np.ndarray, float]:
        """The frame model action `action` leads to, and the milliseconds it took."""
        with self.lock:
            world = self._world
            frame = world.step(world.check_action(action))
            return frame, world.state.step_seconds[-1] * 1e3

    @property
    def frame_index(self) -> int:
        return len(self._world.frames) - 1

    def video(self, fmt: str) -> bytes:
        """The frames since the last reset as a GIF or MP4 file's bytes."""
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"video format {fmt!r}: expected gif or mp4")
        with self.lock:
            video = self._world.video()  # (T, H, W, 3)
        fps, scale = float(self.settings["fps"]), int(self.settings["scale"])
        save = save_gif if fmt == "gif" else save_mp4
        with tempfile.TemporaryDirectory() as tmp:
            path = save(video, Path(tmp) / f"play.{fmt}", fps=fps, scale=scale)
            return path.read_bytes()
