"""A small policy network (a CNN over one frame -> action logits) and the recording policy that
plays with one read from a file.

Record procgen or ALE with a trained network:
`data.policy={_target_: worldmodel.models.policy.CheckpointPolicy, path: FILE, temperature: 0}`.

The file is either safetensors (the state dict, with the network's sizes as JSON under the
metadata key "config") or a `torch.save`d `{"config": {...}, "state_dict": {...}}`, read with
`weights_only=True`. `save_policy_net` writes both (by the file's suffix); a network trained
elsewhere is saved the same way once its layers are named as `PolicyNet`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from worldmodel.data.frames import parse_resolution, resize_frames
from worldmodel.data.policies import Policy
from worldmodel.data.shards import file_sha256

SAFETENSORS_SUFFIXES = (".safetensors", ".st")


class PolicyNet(nn.Module):
    """Frame -> action logits: `depth` stride-2 3x3 convolutions (channels `width`, doubling
    each layer up to 8 x width), a global average pool and a linear head.

    The pool makes the layers independent of the frame size; `resolution` says the size the
    frames are resized to before the network sees them (the size it was trained at).
    """

    def __init__(
        self,
        num_actions: int,
        resolution: int | list[int] | tuple[int, int] = 64,
        width: int = 32,
        depth: int = 3,
        in_channels: int = 3,
    ):
        super().__init__()
        if min(num_actions, width, depth, in_channels) < 1:
            raise ValueError(
                "PolicyNet: num_actions, width, depth and in_channels must be >= 1, got "
                f"{num_actions}, {width}, {depth}, {in_channels}"
            )
        self.num_actions = int(num_actions)
        self.resolution = parse_resolution(resolution)
        self.config = {
            "num_actions": self.num_actions,
            "resolution": list(self.resolution),
            "width": int(width),
            "depth": int(depth),
            "in_channels": int(in_channels),
        }
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * min(2**i, 8)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.SiLU()]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_actions)

    def forward(self, frames: Tensor) -> Tensor:
        """Logits (B, num_actions) of frames (B, C, H, W) in [-1, 1]."""
        x = self.convs(frames)  # (B, D, H / 2^depth, W / 2^depth)
        return self.head(x.mean(dim=(2, 3)))  # (B, D) -> (B, num_actions)

    def frames_in(self, obs: np.ndarray) -> Tensor:
        """uint8 observations (N, H, W, C) -> the network's input (N, C, *resolution) in [-1, 1]."""
        obs = resize_frames(np.asarray(obs), self.resolution)  # (N, h, w, C) uint8
        x = rearrange(torch.from_numpy(obs), "n h w c -> n c h w")
        return x.float() / 127.5 - 1.0


def save_policy_net(net: PolicyNet, path: str | Path) -> Path:
    """Writes `net` with its config: safetensors for a .safetensors / .st path, else torch."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file  # only for this format

        save_file(state, str(path), metadata={"config": json.dumps(net.config)})
    else:
        torch.save({"config": net.config, "state_dict": state}, path)
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state dict) of a policy file, or a ValueError naming the file and the problem."""
    if not path.is_file():
        raise FileNotFoundError(f"policy checkpoint {path}: no such file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open  # only for this format

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = f.keys()  # the handle is not iterable itself
                state = {k: f.get_tensor(k) for k in names}
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(
                f"policy checkpoint {path}: not a readable safetensors file: {e}"
            ) from e
        if "config" not in meta:
            raise ValueError(
                f"policy checkpoint {path}: no 'config' in the safetensors metadata (the "
                "network's sizes); write the file with save_policy_net"
            )
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError as e:
            raise ValueError(
                f"policy checkpoint {path}: its 'config' metadata is not JSON: {e}"
            ) from e
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, refused globals, truncated files
            raise ValueError(
                f"policy checkpoint {path}: cannot be read with torch.load(weights_only=True): {e}"
            ) from e
        if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
            keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(
                f"policy checkpoint {path}: expected a dict with 'config' (the network's sizes) "
                f"and 'state_dict', found {keys}; write the file with save_policy_net"
            )
        config, state = blob["config"], blob["state_dict"]
    if not isinstance(config, dict):
        raise ValueError(f"policy checkpoint {path}: 'config' must be a mapping, got {config!r}")
    return config, state


def load_policy_net(path: str | Path) -> PolicyNet:
    """The `PolicyNet` saved in `path`, checked against its stored config."""
    path = Path(path).expanduser()
    config, state = _read(path)
    try:
        net = PolicyNet(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"policy checkpoint {path}: its config {config} is not valid: {e}") from e
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if missing := sorted(set(want) - set(have)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(have) - set(want)):
        problems.append(f"unexpected {unexpected}")
    problems += [
        f"{k} is {have[k]} in the file, {want[k]} in the network"
        for k in sorted(set(want) & set(have))
        if want[k] != have[k]
    ]
    if problems:
        raise ValueError(
            f"policy checkpoint {path} does not match PolicyNet({config}): " + "; ".join(problems)
        )
    net.load_state_dict(state)
    return net.eval()


class CheckpointPolicy(Policy):
    """Plays a `PolicyNet` read from `path`: greedy (argmax) at `temperature` 0, else sampled
    from softmax(logits / temperature) with a generator seeded by `seed`.

    Observations are resized to the network's resolution; the network runs on the CPU.
    """

    def __init__(
        self,
        num_actions: int,
        num_envs: int,
        seed: int,
        path: str,
        temperature: float = 0.0,
    ):
        if temperature < 0:
            raise ValueError(f"CheckpointPolicy: temperature must be >= 0, got {temperature}")
        self.path = Path(path).expanduser()
        self.net = load_policy_net(self.path)
        if self.net.num_actions != num_actions:
            raise ValueError(
                f"policy checkpoint {self.path}: the network chooses among "
                f"{self.net.num_actions} actions, the environment has {num_actions}"
            )
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))

    @staticmethod
    def cache_identity(path: str, temperature: float = 0.0) -> dict[str, Any]:
        """What identifies the recordings this policy makes: the file's content, not its path
        (the file is read and checked here, so a bad one fails before any recording)."""
        net = load_policy_net(path)
        sha = file_sha256(Path(path).expanduser())
        return {"sha256": sha, "config": net.config, "temperature": float(temperature)}

    @torch.inference_mode()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        # a few small frames a step: waking more threads costs more than they save (on 2 busy
        # cores a step took 10-66 ms on 2 threads, 1.2 ms on one)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            logits = self.net(self.net.frames_in(obs))  # (N, num_actions)
        finally:
            torch.set_num_threads(threads)
        if self.temperature == 0:
            return logits.argmax(dim=-1).numpy()
        probs = F.softmax(logits / self.temperature, dim=-1)  # (N, num_actions)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].numpy()
