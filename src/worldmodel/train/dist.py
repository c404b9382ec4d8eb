"""Process groups: one process, N spawned processes, torchrun, or SLURM tasks.

The environment decides: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) when they are set; otherwise `trainer.devices` processes are spawned here. A partial
environment is an error, never a silent fall-back to one process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_environment(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The torchrun environment, None when there is none; a partial one raises."""
    environ = dict(os.environ if environ is None else environ)
    present = [k for k in TORCHRUN_KEYS if k in environ]
    if not present:
        return None
    missing = [k for k in TORCHRUN_KEYS if k not in environ]
    if missing:
        raise RuntimeError(
            f"partial distributed environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; set all of {', '.join(TORCHRUN_KEYS)} or none"
        )
    return DistEnv(
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=int(environ["WORLD_SIZE"]),
        master_addr=environ["MASTER_ADDR"],
        master_port=int(environ["MASTER_PORT"]),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable, args: tuple, world: int, port: int) -> None:
    env = DistEnv(local_rank, local_rank, world, "127.0.0.1", port)
    fn(env, *args)


def launch(fn: Callable[..., Any], devices: int, *args: Any) -> Any:
    """Call `fn(env, *args)` in every process of the job; returns rank 0's result when local."""
    env = env_from_environment()
    if env is not None:
        if devices > 1 and env.world_size == 1:
            raise RuntimeError(f"trainer.devices={devices} but the environment says WORLD_SIZE=1")
        return fn(env, *args)
    if devices == 1:
        return fn(DistEnv(), *args)
    torch.multiprocessing.spawn(
        _spawned, args=(fn, args, devices, free_port()), nprocs=devices, join=True
    )
    return None


def init_process_group(env: DistEnv, backend: str, accelerator: str) -> torch.device:
    """Join the process group (when there is more than one process) and pick the device."""
    if accelerator == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.distributed:
        if backend == "auto":
            backend = "nccl" if accelerator == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
        )
    return device


def destroy_process_group() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is true on at least one (stop requests, bad losses)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
