"""Process groups: one process, N spawned processes, torchrun, or SLURM tasks.

The environment decides: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) when they are set; else, in a submitit job (`cluster=slurm|submitit_local`), the
tasks of the job as `submitit.JobEnvironment` describes them (every task runs the task function;
the master is the first node of the job, the port a function of the job id); otherwise
`trainer.devices` processes are spawned here. A partial environment is an error, never a silent
fall-back to one process.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The JobEnvironment entries a submitit job needs (their variable names differ per executor).
SUBMITIT_KEYS = ("job_id", "num_tasks", "num_nodes", "global_rank", "local_rank", "nodes")
# The `<date>/<time>` part of the run folder (conf/config.yaml: hydra.run.dir), when set.
RUN_STAMP = "WORLDMODEL_RUN_STAMP"


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_world_size: int = 1  # processes of the job on this machine (they share its CPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_environment(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The torchrun or submitit environment, None when there is none; a partial one raises.

    Under submitit the values come from `submitit.JobEnvironment`, which reads `os.environ`;
    `environ` only decides which environment is present. A one-task submitit job returns None,
    so `trainer.devices` decides as on a workstation.
    """
    environ = dict(os.environ if environ is None else environ)
    present = [k for k in TORCHRUN_KEYS if k in environ]
    if not present:
        if environ.get("SUBMITIT_EXECUTOR"):
            return _submitit_env(environ)
        return None
    missing = [k for k in TORCHRUN_KEYS if k not in environ]
    if missing:
        raise RuntimeError(
            f"partial distributed environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; set all of {', '.join(TORCHRUN_KEYS)} or none"
        )
    world = int(environ["WORLD_SIZE"])
    return DistEnv(
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=world,
        master_addr=environ["MASTER_ADDR"],
        master_port=int(environ["MASTER_PORT"]),
        # torchrun sets it; a launcher that does not is taken as one machine (never more
        # threads than the CPUs allow)
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
    )


def _submitit_env(environ: dict[str, str]) -> DistEnv | None:
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError as e:
        raise RuntimeError(
            f"SUBMITIT_EXECUTOR={environ['SUBMITIT_EXECUTOR']} but no submitit job environment: {e}"
        ) from e
    names = {k: job._env[k] for k in SUBMITIT_KEYS if k in job._env}
    missing = [v for v in names.values() if v not in environ]
    if missing:
        have = [v for v in names.values() if v in environ]
        raise RuntimeError(
            f"partial {job.cluster} job environment: {', '.join(have) or 'nothing'} set but "
            f"{', '.join(missing)} missing; submitit jobs must be started by submitit"
        )
    if job.num_tasks == 1:
        return None
    # Every task derives the same port from the job id (an array task has its own id, so two
    # array tasks sharing a node do not collide); a requeued job keeps its id and its port.
    port = random.Random(job.job_id).randint(20000, 60000)
    return DistEnv(
        rank=job.global_rank,
        local_rank=job.local_rank,
        world_size=job.num_tasks,
        # One node: loopback, which needs no name resolution; several: the job's first node.
        master_addr="127.0.0.1" if job.num_nodes == 1 else job.hostnames[0],
        master_port=port,
        local_world_size=max(1, job.num_tasks // job.num_nodes),
    )


def share_run_stamp(
    environ: MutableMapping[str, str] | None = None, timeout_s: float = 300.0
) -> str | None:
    """Under torchrun, give every process one run-folder stamp (`WORLDMODEL_RUN_STAMP`, the
    `<date>/<time>` of `hydra.run.dir`) before Hydra makes the folder: the first process to ask
    puts its clock into the store torchrun's agent serves at MASTER_ADDR:MASTER_PORT, and every
    process, on every node, reads that value. A worker group that torchrun restarts finds the
    stamp there and continues in the same folder. Returns the stamp; None outside torchrun."""
    environ = os.environ if environ is None else environ
    if environ.get(RUN_STAMP) or "TORCHELASTIC_RUN_ID" not in environ:
        return environ.get(RUN_STAMP) or None
    env = env_from_environment(dict(environ))  # a partial environment raises
    if env is None:
        return None
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        raise RuntimeError(
            "torchrun's agent shares no store with its workers (TORCHELASTIC_USE_AGENT_STORE is "
            "not True), so the processes cannot agree on one run folder: pass hydra.run.dir=PATH"
        )
    store = torch_dist.TCPStore(
        env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    mine = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    stamp = store.compare_set("worldmodel/run_stamp", "", mine).decode()
    environ[RUN_STAMP] = stamp
    return stamp


def preemption_signal() -> signal.Signals | None:
    """The signal SLURM sends a submitit job before its time limit or a preemption (USR2 unless
    `SUBMITIT_PREEMPT_SIGNAL` says otherwise); None outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def stopped_by_signal(name: str, step: int, previous: dict[int, Any]) -> None:
    """After a signal stopped training early (its checkpoint written): in a submitit job, hand
    the job back to SLURM without reporting a result, so no one takes a cut run for a finished
    one. The preemption signal goes on to submitit's handler, which requeues the job from rank 0
    (the requeued job resumes from `last.pt` in the same run dir); after SIGTERM, SLURM is already
    ending or requeueing the job. Outside submitit the process ends with the shell's code for
    the signal (128 + its number), so nothing that follows in the same command (an evaluation,
    the next stage of a pipeline) runs on a cut run."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        logging.getLogger(__name__).info(
            "stopped by %s at step %d; checkpoint saved: run the same command in the same run "
            "dir to continue",
            name,
            step,
        )
        raise SystemExit(128 + int(getattr(signal, name)))
    preempt = preemption_signal()
    handler = previous.get(preempt)
    if preempt is not None and name == preempt.name and callable(handler):
        handler(preempt, None)  # rank 0: dump the resubmission, `scontrol requeue`, exit
    raise SystemExit(f"stopped by {name} at step {step}; checkpoint saved, SLURM ends this run")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable, args: tuple, world: int, port: int) -> None:
    env = DistEnv(local_rank, local_rank, world, "127.0.0.1", port, local_world_size=world)
    fn(env, *args)


def launch(fn: Callable[..., Any], devices: int, *args: Any) -> Any:
    """Call `fn(env, *args)` in every process of the job; returns rank 0's result when local."""
    env = env_from_environment()
    if env is not None:
        if devices != env.world_size:
            # The per-process batch is derived from trainer.devices: it must be the world size.
            raise RuntimeError(
                f"trainer.devices={devices} but the environment has {env.world_size} processes "
                f"(torchrun WORLD_SIZE or SLURM tasks); set trainer.devices={env.world_size}"
            )
        # Code that asks torchrun's variables (one evaluation on rank 0) sees the same ranks.
        os.environ.update(
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
            MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port),
        )
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
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise RuntimeError(
                f"trainer.accelerator=cuda: process {env.local_rank} of {env.local_world_size} "
                f"on this machine needs CUDA device {env.local_rank}, but "
                f"{'none is' if visible == 0 else f'only {visible} are'} visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "set trainer.devices (or the launcher's processes per node) to at most the GPUs, "
                "or trainer.accelerator=cpu"
            )
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


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    t /= torch_dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
