"""A play session: a dynamics model turning one action at a time into the next frame.

`PlaySession.step(action)` samples the next token grid with `DynamicsModel.generate_next`
(keeping the temporal KV cache of the frames so far, so a step runs the transformer on one new
frame only: `steps` MaskGIT iterations plus one pass that commits the frame to the cache),
decodes it with the frozen tokenizer and returns it as a uint8 picture. `reset()` goes back to
the prompt with the same random stream, so a replay of the same actions gives the same frames.

The model sees at most `max_frames` frames. When the context is full, the session keeps the most
recent half of it and rebuilds the cache once, instead of sliding one frame at a time (which
would re-encode the whole window at every step, as `DynamicsModel.rollout` does): play stays at
one frame of compute per step and the model always has at least half a window of past.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from worldmodel.eval.world import WorldParts, autocast, decode_frames
from worldmodel.media import to_uint8


class PlaySession:
    """Frames from actions, one step at a time, starting from a prompt token grid (h, w)."""

    def __init__(
        self,
        parts: WorldParts,
        prompt_tokens: Tensor,
        steps: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        bf16: bool = True,
    ) -> None:
        model = parts.dynamics
        if tuple(prompt_tokens.shape) != model.grid:
            raise ValueError(
                f"prompt tokens {tuple(prompt_tokens.shape)} do not match the model's token grid "
                f"{model.grid}"
            )
        if steps < 1:
            raise ValueError(f"play.steps={steps} must be >= 1")
        self.parts = parts
        self.model = model
        self.prompt = prompt_tokens.long()[None, None]  # (1, 1, h, w)
        self.steps, self.temperature, self.seed, self.bf16 = steps, temperature, seed, bf16
        self.keep = max(1, (model.max_frames - 1) // 2)  # frames kept when the window is full
        self.prompt_frame = self._decode(self.prompt)
        self.step_seconds: list[float] = []
        self.reset()

    @property
    def num_actions(self) -> int:
        return int(self.model.num_actions)

    def reset(self) -> np.ndarray:
        """Back to the prompt (and to the start of the random stream); returns the prompt frame."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self.tokens = self.prompt  # (1, L, h, w): the context window
        self.actions = torch.zeros(1, 0, dtype=torch.long)  # (1, L-1): actions between them
        self.cache = None
        self.frames = [self.prompt_frame]
        self.actions_taken: list[int] = []
        return self.prompt_frame

    def check_action(self, action: int) -> int:
        if isinstance(action, bool) or int(action) != action:
            raise ValueError(f"action {action!r} is not an integer")
        if not 0 <= int(action) < self.num_actions:
            raise ValueError(
                f"action {action} is outside [0, {self.num_actions}) (the model's num_actions)"
            )
        return int(action)

    @torch.no_grad()
    def step(self, action: int) -> np.ndarray:
        """Generate and decode the frame that `action` leads to; returns it (H, W, 3) uint8."""
        action = self.check_action(action)
        start = time.perf_counter()
        if self.tokens.shape[1] >= self.model.max_frames:
            # window full: keep the recent frames and the actions between them, re-encode once
            self.tokens = self.tokens[:, -self.keep :]
            self.actions = self.actions[:, self.actions.shape[1] - (self.keep - 1) :]
            self.cache = None
        actions = torch.cat([self.actions, torch.tensor([[action]])], dim=1)  # (1, L)
        with autocast(self.bf16):
            if self.cache is None:
                self.cache = self.model.new_cache(self.tokens, self.actions)
            new = self.model.generate_next(
                self.tokens,
                actions,
                steps=self.steps,
                temperature=self.temperature,
                generator=self.generator,
                cache=self.cache,
            )  # (1, h, w)
        frame = self._decode(new[:, None])
        self.tokens = torch.cat([self.tokens, new[:, None]], dim=1)
        self.actions = actions
        self.step_seconds.append(time.perf_counter() - start)
        self.frames.append(frame)
        self.actions_taken.append(action)
        return frame

    def _decode(self, tokens: Tensor) -> np.ndarray:
        """One token grid (1, 1, h, w) -> its picture (H, W, 3) uint8."""
        video = decode_frames(self.parts, tokens, self.bf16)  # (1, C, 1, H, W)
        frame = rearrange(to_uint8(video[0, :, 0]), "c h w -> h w c")
        if frame.shape[-1] == 1:
            frame = frame.expand(-1, -1, 3)
        return np.ascontiguousarray(frame.numpy())

    def frames_per_second(self, last: int | None = None) -> float:
        """Steps per second of compute (sampling + decoding) over the last `last` steps (all if
        None); the first step of a session is left out when there are others (warm-up)."""
        times = self.step_seconds[1:] if len(self.step_seconds) > 1 else self.step_seconds
        if last is not None:
            times = times[-last:]
        return len(times) / sum(times) if times else 0.0

    def video(self) -> np.ndarray:
        """The frames since the last reset, (T, H, W, 3) uint8."""
        return np.stack(self.frames)


def save_frames(frames: list[np.ndarray], run_dir: Path, fps: float, scale: int) -> dict[str, Path]:
    """play.gif and play.mp4 of uint8 frames (H, W, 3)."""
    from worldmodel.media import save_gif, save_mp4

    video = np.stack(frames)  # (T, H, W, 3)
    return {
        "gif": save_gif(video, run_dir / "play.gif", fps=fps, scale=scale),
        "mp4": save_mp4(video, run_dir / "play.mp4", fps=fps, scale=scale),
    }
