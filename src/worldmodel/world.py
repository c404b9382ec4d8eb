"""The World: a trained world (tokenizer + LAM + world model + configs) as one object.

    world = World.load("worlds/coinrun.safetensors")     # or a run folder, or a checkpoint
    frame = world.reset(image)                            # (H, W, 3) uint8 prompt
    frame = world.step(7)                                 # the frame action 7 leads to

`World.load` takes an exported world file (one safetensors file: the three models' weights, their
configs as metadata, no absolute paths), a pipeline run folder (its last world-model stage), a
stage folder or a world-model checkpoint (whose stored config names its frozen tokenizer and
LAM), onto a chosen device and precision. Evaluation, every play front-end, the bench and the
notebooks use it; none of them knows a model by name: they go through the interfaces of
`worldmodel.models.interfaces`.

`step(action)` keeps the temporal KV cache of the frames so far, so a step runs the transformer on
one new frame only. When the context is full the world keeps the most recent half of it and
rebuilds the cache once (play stays at one frame of compute per step and the model always sees
at least half a window of past). `reset()` goes back to the prompt and to the start of the random
stream, so a replay of the same actions gives the same frames.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from worldmodel.data.frames import parse_resolution, resize_frames
from worldmodel.export import build_allowed
from worldmodel.models.interfaces import LatentActions, Tokenizer, WorldModel
from worldmodel.pipeline import (
    action_source,
    cache_key,
    file_key,
    frames_per_latent,
    lam_runs_bf16,
    load_frozen,
)
from worldmodel.runtime import autocast, resolve_device
from worldmodel.train import checkpoint as ckpt

log = logging.getLogger(__name__)
WORLD_FORMAT = "worldmodel-world/1"
PARTS = ("tokenizer", "lam", "dynamics")


# ------------------------------------------------------------------------------------------------
# Decoding token grids into pixels
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_tokens(
    tokenizer: Tokenizer, tokens: Tensor, bf16: bool = True, previous: Tensor | None = None
) -> Tensor:
    """Token grids (B, T, h, w) -> video (B, C, T, H, W) in [-1, 1], each frame decoded alone.

    The pipeline tokenizes every frame alone, so frames are decoded alone too: a generated frame
    then never borrows detail from the real frames around it through the decoder. A tokenizer
    that `refines` then decodes each frame with the one before it, starting from `previous`
    (B, C, H, W), the frame before the clip (as a rollout runs: each from the one it decoded).
    """
    b = tokens.shape[0]
    frames = rearrange(tokens, "b t h w -> (b t) 1 h w")  # every frame its own 1-frame clip
    with autocast(tokens.device, bf16):
        video = tokenizer.detokenize(frames)  # (B T, C, 1, H, W)
    video = rearrange(video.float().clamp(-1.0, 1.0), "(b t) c 1 h w -> b c t h w", b=b)
    if previous is None or not tokenizer.refines:
        return video
    out = []
    for t in range(video.shape[2]):
        with autocast(tokens.device, bf16):
            previous = tokenizer.refine(video[:, :, t : t + 1], previous[:, :, None])[:, :, 0]
        previous = previous.float().clamp(-1.0, 1.0)
        out.append(previous)
    return torch.stack(out, dim=2)


@torch.no_grad()
def decode_teacher_forced(
    tokenizer: Tokenizer, tokens: Tensor, previous: Tensor, bf16: bool = True
) -> Tensor:
    """Token grids (B, T, h, w), each frame decoded with its own real previous frame
    `previous` (B, C, T, H, W) (next-frame prediction; the tokenizer's ceiling)."""
    video = decode_tokens(tokenizer, tokens, bf16)
    if not tokenizer.refines:
        return video
    with autocast(tokens.device, bf16):
        return tokenizer.refine(video, previous).float().clamp(-1.0, 1.0)


@torch.no_grad()
def decode_clip(tokenizer: Tokenizer, tokens: Tensor, bf16: bool = True) -> Tensor:
    """A token clip (B, T', h, w) -> video (B, C, T, H, W). Per-frame tokens are decoded each
    frame alone (`decode_tokens`); tokens of a tokenizer that compresses time are decoded as one
    clip, and a clip longer than the tokenizer's `max_latent_frames` through a sliding window that
    keeps the k pixel frames of its newest latent frame (the window's first latent frame is then
    read as a clip's first frame: an approximation for its context only)."""
    k = frames_per_latent(tokenizer)
    if k == 1:
        return decode_tokens(tokenizer, tokens, bf16)
    window = int(tokenizer.max_latent_frames or tokens.shape[1])
    with autocast(tokens.device, bf16):
        pieces = [tokenizer.detokenize(tokens[:, :window])]  # (B, C, T_w, H, W)
        for j in range(window, tokens.shape[1]):
            pieces.append(tokenizer.detokenize(tokens[:, j - window + 1 : j + 1])[:, :, -k:])
    return torch.cat(pieces, dim=2).float().clamp(-1.0, 1.0)


@dataclass(frozen=True)
class FrameLayout:
    """Which pixel frames of a clip each latent frame of its token clip decodes to.

    A per-frame tokenizer (k = 1): latent frame j is pixel frame j. A tokenizer that compresses
    time (k = temporal_downsample > 1) covers k pixel frames per latent frame, counted back from
    the clip's last frame (the pipeline's rule, see `ClipwiseTokenDataset`): for a causal one whose
    first frame is alone (C-ViViT: 9 frames -> 5 latent frames) latent frame 0 is pixel frame 0 and
    latent frame j >= 1 is frames 2j - 1 .. 2j; for one that encodes whole groups (VideoGPT's
    VQ-VAE, k = 4: 8 frames -> 2) latent frame j is frames 4j .. 4j + 3.
    """

    k: int  # pixel frames per latent frame (the tokenizer's temporal_downsample)
    pixels: int  # T: pixel frames of the clip
    latents: int  # T': latent frames of its token clip

    @classmethod
    def of(cls, tokenizer: Tokenizer, pixels: int, latents: int) -> FrameLayout:
        k = frames_per_latent(tokenizer)
        if k == 1 and pixels != latents or pixels < latents or pixels > k * latents:
            raise ValueError(
                f"{latents} latent frames cannot cover {pixels} pixel frames with a tokenizer of "
                f"temporal_downsample={k}"
            )
        return cls(k, pixels, latents)

    def last(self, j: int) -> int:
        """The last pixel frame of latent frame j."""
        return self.pixels - 1 - self.k * (self.latents - 1 - j)

    def span(self, j0: int, j1: int) -> slice:
        """The pixel frames of latent frames j0 .. j1 - 1."""
        return slice(self.last(j0 - 1) + 1 if j0 > 0 else 0, self.last(j1 - 1) + 1)


def to_uint8_frame(video: Tensor) -> np.ndarray:
    """One frame (C, H, W) in [-1, 1] -> (H, W, 3) uint8 on the CPU."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    frame = rearrange(x, "c h w -> h w c")
    if frame.shape[-1] == 1:
        frame = frame.expand(-1, -1, 3)
    return np.ascontiguousarray(frame.numpy())


# ------------------------------------------------------------------------------------------------
# The World
# ------------------------------------------------------------------------------------------------


# the world file a pipeline run writes into its folder (`World.load` of the folder reads it)
WORLD_FILE = "world.safetensors"


@dataclass
class PlayState:
    """The context of a world being played: tokens and actions so far, the KV cache, the RNG."""

    tokens: Tensor  # (1, L, h, w)
    actions: Tensor  # (1, L - 1)
    cache: Any
    generator: torch.Generator
    last: Tensor  # (1, C, H, W) in [-1, 1]: the newest frame, which a refining tokenizer reads
    frames: list[np.ndarray] = field(default_factory=list)
    actions_taken: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


class World:
    """A trained world: `tokenizer` + `lam` (or None) + world model (`dynamics`), on a device.

    `action_source` is "latent" (the model's actions are the LAM's codes) or "true" (the
    recorded actions). `config` is the world model's run config (model + data);
    `true_to_model_actions` maps the game's action ids to the model's (the LAM's learned mapping,
    or the identity) when it is known.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        dynamics: nn.Module,
        lam: nn.Module | None = None,
        action_source: str = "true",
        config: DictConfig | None = None,
        configs: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        true_to_model_actions: dict[int, int] | None = None,
    ) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} is not a Tokenizer")
        if not isinstance(dynamics, WorldModel):
            raise TypeError(f"{type(dynamics).__name__} is not a WorldModel")
        if lam is not None and not isinstance(lam, LatentActions):
            raise TypeError(f"{type(lam).__name__} is not a latent action model")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: expected fp32 or bf16")
        self.device = resolve_device(device)
        self.tokenizer = tokenizer.eval().requires_grad_(False).to(self.device)
        self.dynamics = dynamics.eval().requires_grad_(False).to(self.device)
        self.lam = lam.eval().requires_grad_(False).to(self.device) if lam is not None else None
        self.action_source = action_source
        self.config = config if config is not None else OmegaConf.create({})
        self.configs = configs or {}
        self.precision = precision
        self.true_to_model_actions = dict(true_to_model_actions or {})
        self.steps, self.temperature, self.seed = 4, 1.0, 0
        self.state: PlayState | None = None
        self.prompt_tokens: Tensor | None = None
        self.prompt_pixels: Tensor | None = None  # (1, C, H, W) in [-1, 1]
        self.step_count = 0  # training steps of the world model
        self.cache_key = ""  # names this world's frozen parts in token caches (set by loaders)

    @property
    def lam_window(self) -> int:
        """Frames the LAM sees at once when labelling a split (its training clip length)."""
        cfg = self.configs.get("lam")
        if self.lam is None or cfg is None:
            return 2
        return min(int(cfg.data.clip_length), int(cfg.model.max_frames))

    @property
    def lam_bf16(self) -> bool:
        """Whether the LAM labels frames under bf16 autocast (it was trained in bf16)."""
        return self.lam is not None and lam_runs_bf16(self.configs.get("lam"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, precision: str = "fp32"
    ) -> World:
        """A world from an exported file, a run folder, a stage folder or a checkpoint."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such world file, run folder or checkpoint")
        if path.is_dir():
            exported = path / WORLD_FILE  # a pipeline's world, with its learned key mapping
            if exported.is_file():
                return cls.from_export(exported, device, precision)
            return cls.from_checkpoint(world_checkpoint(path), device, precision)
        if path.suffix == ".safetensors":
            return cls.from_export(path, device, precision)
        return cls.from_checkpoint(path, device, precision)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None, precision: str = "fp32"
    ) -> World:
        """A world model's checkpoint with the frozen parts its stored config names."""
        state = ckpt.load(path)
        config = OmegaConf.create(state.get("config") or {})
        p = config.get("model", {}).get("pipeline")
        if p is None:
            raise ValueError(
                f"{path} is not a world model's checkpoint (its config has no model.pipeline): "
                "a world needs a world model with its tokenizer"
            )
        dynamics = build_allowed(config.model)
        ckpt.check_compatible(state, dynamics, str(path))
        dynamics.load_state_dict(state["model"])
        if state.get("ema"):
            dynamics.load_state_dict(state["ema"], strict=False)
        source = action_source(p)
        tokenizer, tok_cfg = load_frozen(
            p.tokenizer_checkpoint, "tokenizer", "model.pipeline.tokenizer_checkpoint"
        )
        lam = lam_cfg = None
        if source == "latent":
            lam, lam_cfg = load_frozen(
                p.lam_checkpoint, "latent action model", "model.pipeline.lam_checkpoint"
            )
        configs = {"tokenizer": tok_cfg, "lam": lam_cfg, "dynamics": config}
        world = cls(tokenizer, dynamics, lam, source, config, configs, device, precision)
        world.step_count = int(state.get("step", 0))
        world.cache_key = cache_key(p, lam is not None, world.lam_bf16)
        return world

    @classmethod
    def from_export(
        cls, path: str | Path, device: str | torch.device | None = None, precision: str = "fp32"
    ) -> World:
        """A world from one exported file (`World.export`)."""
        meta = read_world_metadata(path)
        models: dict[str, nn.Module | None] = {}
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for part in PARTS:
                cfg = meta["configs"].get(part)
                if cfg is None:
                    models[part] = None
                    continue
                model = build_allowed(OmegaConf.create(cfg).model)
                prefix = f"{part}."
                tensors = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                own = model.state_dict()
                missing = sorted(set(own) - set(tensors))
                unexpected = sorted(set(tensors) - set(own))
                if missing or unexpected:
                    raise ValueError(
                        f"{path}: the {part} weights do not fit its config (missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]})"
                    )
                # stored in fp16 where that holds quality: back to each tensor's own dtype
                model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
                models[part] = model
        configs = {
            k: OmegaConf.create(v) if v is not None else None for k, v in meta["configs"].items()
        }
        world = cls(
            models["tokenizer"],
            models["dynamics"],
            models["lam"],
            meta["action_source"],
            configs["dynamics"],
            configs,
            device,
            precision,
            {int(k): int(v) for k, v in meta.get("true_to_model_actions", {}).items()},
        )
        world.step_count = int(meta.get("step", 0))
        world.cache_key = hashlib.sha256(file_key(path).encode()).hexdigest()[:12]
        return world

    def export(self, path: str | Path, half: bool = False, **extra: Any) -> Path:
        """Write the world to one safetensors file (fp16 floating-point weights with `half`);
        the configs go into its metadata with the frozen parts' checkpoint paths removed."""
        tensors: dict[str, Tensor] = {}
        for part, model in (
            ("tokenizer", self.tokenizer),
            ("lam", self.lam),
            ("dynamics", self.dynamics),
        ):
            if model is None:
                continue
            for k, v in model.state_dict().items():
                v = v.detach().cpu()
                if half and v.is_floating_point():
                    v = v.half()
                tensors[f"{part}.{k}"] = v.contiguous().clone()
        configs = {}
        for part in PARTS:
            cfg = self.configs.get(part)
            if cfg is None:
                configs[part] = None
                continue
            plain = OmegaConf.to_container(cfg, resolve=True)
            pipe = plain.get("model", {}).get("pipeline")
            if pipe:  # the frozen parts travel inside this file: no paths to other files
                for key in list(pipe):
                    if key.endswith("_checkpoint"):
                        pipe[key] = None
            plain.pop("run_dir", None)
            plain.pop("checkpoint", None)
            configs[part] = plain
        metadata = {
            "format": WORLD_FORMAT,
            "configs": json.dumps(configs, sort_keys=True),
            "action_source": self.action_source,
            "true_to_model_actions": json.dumps(
                {str(k): v for k, v in self.true_to_model_actions.items()}
            ),
            "step": str(getattr(self, "step_count", 0)),
            "dtype": "float16" if half else "float32",
            **{k: str(v) for k, v in extra.items()},
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(out)
        return out

    # ------------------------------------------------------------------ what it is
    @property
    def num_actions(self) -> int:
        return int(self.dynamics.num_actions)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the frames the tokenizer was trained on."""
        cfg = self.configs.get("tokenizer") or self.config
        return parse_resolution(cfg.data.resolution)

    @property
    def frames_per_latent(self) -> int:
        return frames_per_latent(self.tokenizer)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def generator(self, seed: int) -> torch.Generator:
        """A random generator on the world's device (sampling draws on the tensors' device)."""
        return torch.Generator(device=self.device).manual_seed(int(seed))

    # ------------------------------------------------------------------ pixels <-> tokens
    @torch.no_grad()
    def encode(self, frames: np.ndarray | Tensor) -> Tensor:
        """Token grids of frames: uint8 (N, H, W, C) -> (N, h, w), each frame alone; or a video
        (B, C, T, H, W) in [-1, 1] -> (B, T', h, w)."""
        if isinstance(frames, np.ndarray):
            x = torch.from_numpy(np.array(frames)).to(self.device)  # a writable copy
            video = rearrange(x, "n h w c -> n c 1 h w").float().div(127.5).sub(1)
            with autocast(self.device, self.bf16):
                return self.tokenizer.tokenize(video)[:, 0]  # (N, h, w)
        with autocast(self.device, self.bf16):
            return self.tokenizer.tokenize(frames.to(self.device))

    @torch.no_grad()
    def latent_codes(self, video: Tensor) -> Tensor:
        """The codes of a model with its own quantizer (`inputs == "latents"`) of a video (B, C,
        T, H, W) in [-1, 1] -> (B, T, h, w): the tokenizer's latents of each frame alone (as the
        pipeline caches them), then the model's encoder over the clip."""
        b = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c 1 h w")  # every frame its own clip
        with autocast(self.device, self.bf16):
            z = self.tokenizer.encode(frames)  # (B T, D, 1, h, w)
        latents = rearrange(z.float(), "(b t) d 1 h w -> b t h w d", b=b)
        return self.dynamics.encode(latents)

    @torch.no_grad()
    def decode(
        self, tokens: Tensor, previous: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        """The world model's token grids (B, T, h, w) -> video (B, C, T, H, W) in [-1, 1]:
        through the model's own codes when it has them, else the tokenizer's; a tokenizer that
        refines decodes each frame with the one before it, from `previous` (B, C, H, W); a model
        that `decodes_in_context` reads the codes before `tokens`, `context` (B, c, h, w)."""
        tokens = tokens.to(self.device)
        if not self.dynamics.own_codes:
            if self.frames_per_latent == 1:
                return decode_tokens(self.tokenizer, tokens, self.bf16, previous)
            return decode_clip(self.tokenizer, tokens, self.bf16)
        with autocast(self.device, self.bf16):
            if self.dynamics.decodes_in_context:
                context = None if context is None else context.to(self.device)
                video = self.dynamics.decode_pixels(self.tokenizer, tokens, context)
            else:
                video = self.dynamics.decode_pixels(self.tokenizer, tokens)
        return video.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_teacher_forced(self, tokens: Tensor, previous: Tensor) -> Tensor:
        """Token grids (B, T, h, w) of per-frame tokens, each frame decoded with its own real
        previous frame `previous` (B, C, T, H, W) (next-frame prediction). A model that
        `decodes_in_context` decodes frame i after the model's codes of the real frames
        previous[:, :, :i + 1] (consecutive frames, each before the next token frame)."""
        tokens = tokens.to(self.device)
        if self.dynamics.own_codes and self.dynamics.decodes_in_context:
            real = self.latent_codes(previous.to(self.device))  # (B, T, h, w)
            frames = [
                self.decode(tokens[:, i : i + 1], context=real[:, : i + 1])
                for i in range(real.shape[1])
            ]
            return torch.cat(frames, dim=2)  # (B, C, T, H, W)
        if self.dynamics.own_codes or not self.tokenizer.refines:
            return self.decode(tokens)
        return decode_teacher_forced(self.tokenizer, tokens, previous.to(self.device), self.bf16)

    @torch.no_grad()
    def decode_after(
        self, context: Tensor, new: Tensor, context_frame: Tensor | None = None
    ) -> Tensor:
        """The pixel frames (B, C, n, H, W) of the latent frames `new` (B, t, h, w) that follow
        `context` (B, c >= 1, h, w). Per-frame tokens are decoded alone (a refining tokenizer
        starts from `context_frame` (B, C, H, W), the last context frame's pixels when known,
        else its decoding); tokens of a tokenizer that compresses time are decoded with their
        context as one clip, keeping the new k * t frames; the codes of a model that
        `decodes_in_context` are decoded after their context codes."""
        if self.dynamics.own_codes and self.dynamics.decodes_in_context:
            return self.decode(new, context=context)
        k = self.frames_per_latent
        if k == 1:
            if self.tokenizer.refines and context_frame is None:
                context_frame = self.decode(context[:, -1:])[:, :, 0]
            return self.decode(new, context_frame)
        video = decode_clip(
            self.tokenizer, torch.cat([context, new], dim=1).to(self.device), self.bf16
        )
        return video[:, :, -k * new.shape[1] :]

    # ------------------------------------------------------------------ play
    def configure(
        self, steps: int | None = None, temperature: float | None = None, seed: int | None = None
    ) -> None:
        """MaskGIT steps, temperature (0 = greedy) and seed of `step` (from the next reset)."""
        if steps is not None:
            if int(steps) < 1:
                raise ValueError(f"steps={steps} must be >= 1")
            self.steps = int(steps)
        if temperature is not None:
            if float(temperature) < 0:
                raise ValueError(f"temperature={temperature} must be >= 0")
            self.temperature = float(temperature)
        if seed is not None:
            self.seed = int(seed)

    def prompt_frame(self, prompt: np.ndarray | str | Path) -> np.ndarray:
        """A prompt picture (H, W, 3) uint8 at the world's frame size, from an image file or an
        array (H, W, 3|1) uint8 of any size (resized)."""
        if isinstance(prompt, str | Path):
            from PIL import Image

            path = Path(prompt)
            if not path.is_file():
                raise FileNotFoundError(f"prompt image {path}: no such file")
            try:
                with Image.open(path) as image:
                    prompt = np.asarray(image.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise ValueError(f"prompt image {path} cannot be read as an image: {e}") from e
        frame = np.asarray(prompt)
        if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a prompt is one picture (H, W, 3); got an array of {frame.shape}")
        if frame.dtype != np.uint8:
            raise ValueError(f"a prompt picture is uint8; got {frame.dtype}")
        frame = frame[..., :3] if frame.shape[-1] == 4 else frame
        if frame.shape[-1] == 1:
            frame = np.repeat(frame, 3, axis=-1)
        if frame.shape[:2] != tuple(self.frame_size):
            log.warning(
                "prompt is %dx%d; resizing it to the tokenizer's %dx%d",
                frame.shape[0],
                frame.shape[1],
                *self.frame_size,
            )
            frame = resize_frames(frame[None], self.frame_size)[0]
        return np.ascontiguousarray(frame)

    @torch.no_grad()
    def reset(self, prompt: np.ndarray | str | Path | None = None) -> np.ndarray:
        """Start from a prompt picture (or, without one, from the last prompt, with the random
        stream from its start); returns the prompt frame as the world decodes it."""
        if self.dynamics.conditioning != "actions":
            raise ValueError(
                f"{type(self.dynamics).__name__} is conditioned on text, not on one action per "
                "frame: it cannot be played step by step"
            )
        if self.frames_per_latent != 1:
            raise ValueError(
                "this world's tokenizer compresses time (a latent frame covers "
                f"{self.frames_per_latent} pixel frames): it cannot be played frame by frame"
            )
        if prompt is not None:
            frame = self.prompt_frame(prompt)
            tokens = self.encode(frame[None])  # (1, h, w)
            if self.dynamics.inputs == "latents":
                x = torch.from_numpy(frame).to(self.device)
                video = rearrange(x, "h w c -> 1 c 1 h w").float().div(127.5).sub(1)
                latents = rearrange(self.tokenizer.encode(video), "b d t h w -> b t h w d")
                tokens = self.dynamics.encode(latents.float())[:, 0]  # its own codes (1, h, w)
            self.prompt_tokens = tokens[:, None].long()  # (1, 1, h, w)
            x = torch.from_numpy(frame).to(self.device)
            self.prompt_pixels = rearrange(x, "h w c -> 1 c h w").float().div(127.5).sub(1)
        if self.prompt_tokens is None:
            raise ValueError("reset() needs a prompt picture the first time")
        if self.tokenizer.refines:  # decoding starts from the prompt itself
            last = self.prompt_pixels
        else:
            last = self.decode(self.prompt_tokens)[:, :, 0]
        self.state = PlayState(
            tokens=self.prompt_tokens,
            actions=torch.zeros(1, 0, dtype=torch.long, device=self.device),
            cache=None,
            generator=self.generator(self.seed),
            last=last,
            frames=[to_uint8_frame(last[0])],
        )
        return self.state.frames[0]

    def check_action(self, action: Any) -> int:
        if isinstance(action, bool) or not isinstance(action, int | np.integer):
            raise ValueError(f"action {action!r} is not an integer")
        if not 0 <= int(action) < self.num_actions:
            raise ValueError(
                f"action {action} is outside [0, {self.num_actions}) (the model's num_actions)"
            )
        return int(action)

    @torch.no_grad()
    def step(self, action: int) -> np.ndarray:
        """Generate and decode the frame `action` leads to; returns it (H, W, 3) uint8."""
        action = self.check_action(action)
        s = self.state
        if s is None:
            raise ValueError("step() before reset(): give the world a prompt first")
        start = time.perf_counter()
        model = self.dynamics
        if s.tokens.shape[1] >= model.max_frames:
            # window full: keep the recent frames and the actions between them, re-encode once
            keep = max(1, (model.max_frames - 1) // 2)
            s.tokens = s.tokens[:, -keep:]
            s.actions = s.actions[:, s.actions.shape[1] - (keep - 1) :]
            s.cache = None
        action_t = torch.tensor([[action]], device=self.device)
        actions = torch.cat([s.actions, action_t], dim=1)  # (1, L)
        with autocast(self.device, self.bf16):
            if s.cache is None:
                s.cache = model.new_cache(s.tokens, s.actions)
            new = model.generate_next(
                s.tokens,
                actions,
                steps=self.steps,
                temperature=self.temperature,
                generator=s.generator,
                cache=s.cache,
            )  # (1, h, w)
        s.last = self.decode_after(s.tokens, new[:, None], s.last)[:, :, 0]  # (1, C, H, W)
        frame = to_uint8_frame(s.last[0])
        s.tokens = torch.cat([s.tokens, new[:, None]], dim=1)
        s.actions = actions
        s.step_seconds.append(time.perf_counter() - start)
        s.frames.append(frame)
        s.actions_taken.append(action)
        return frame

    def rollout(
        self, actions: list[int], prompt: np.ndarray | str | Path | None = None
    ) -> np.ndarray:
        """Frames (1 + len(actions), H, W, 3) uint8: the prompt, then one per action."""
        self.reset(prompt)
        for a in actions:
            self.step(a)
        return self.video()

    @property
    def frames(self) -> list[np.ndarray]:
        """The frames since the last reset, (H, W, 3) uint8 each."""
        return self.state.frames if self.state is not None else []

    @property
    def actions_taken(self) -> list[int]:
        return self.state.actions_taken if self.state is not None else []

    def video(self) -> np.ndarray:
        """The frames since the last reset, (T, H, W, 3) uint8."""
        if self.state is None:
            raise ValueError("no frames before reset()")
        return np.stack(self.state.frames)

    def frames_per_second(self, last: int | None = None) -> float:
        """Steps per second of compute (sampling + decoding) over the last `last` steps (all if
        None); the first step after a reset is left out when there are others (warm-up)."""
        times = self.state.step_seconds if self.state is not None else []
        times = times[1:] if len(times) > 1 else times
        if last is not None:
            times = times[-last:]
        return len(times) / sum(times) if times else 0.0


def world_checkpoint(folder: Path) -> Path:
    """The world model's checkpoint in a run folder: the last stage of a pipeline run
    (`stages.json`) or `checkpoints/last.pt` of a stage folder."""
    stages = folder / "stages.json"
    if stages.exists():
        names = list(json.loads(stages.read_text()))
        for name in reversed(names):
            path = folder / name / "checkpoints" / ckpt.LAST
            if path.exists():
                state = ckpt.load(path)
                if (state.get("config") or {}).get("model", {}).get("pipeline") is not None:
                    return path
        raise ValueError(f"{folder}: no stage of {stages} holds a world model's checkpoint")
    path = folder / "checkpoints" / ckpt.LAST
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} is neither a pipeline run folder (stages.json) nor a run folder with "
            f"checkpoints/{ckpt.LAST}"
        )
    return path


def read_world_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a world file, with the configs parsed; a clear error for other files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a non-safetensors file
        raise ValueError(f"{path} is not a safetensors world file: {e}") from e
    if meta.get("format") != WORLD_FORMAT:
        raise ValueError(
            f"{path} is not a world file (format {meta.get('format')!r}, expected "
            f"{WORLD_FORMAT!r}); a single model's export is not a world"
        )
    meta["configs"] = json.loads(meta["configs"])
    meta["true_to_model_actions"] = json.loads(meta.get("true_to_model_actions", "{}"))
    return meta


def main(argv: list[str] | None = None) -> None:
    """`python -m worldmodel.world SOURCE OUT.safetensors [--half]`: export a world."""
    parser = argparse.ArgumentParser(
        prog="python -m worldmodel.world",
        description="Export a trained world (tokenizer + LAM + world model) to one file.",
    )
    parser.add_argument("source", help="a pipeline run folder, a stage folder or a checkpoint")
    parser.add_argument("out", help="the world file to write, e.g. coinrun.safetensors")
    parser.add_argument("--half", action="store_true", help="store weights as float16")
    args = parser.parse_args(argv)
    world = World.load(args.source)
    out = world.export(args.out, half=args.half)
    size_mb = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({size_mb:.2f} MB): {type(world.dynamics).__name__} on "
        f"{world.action_source} actions"
    )


if __name__ == "__main__":
    main()
