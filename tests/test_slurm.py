"""`cluster=slurm` on a real SLURM: a single-node cluster on localhost (2 CPUs, no GPUs).

The cluster (tests/slurm_cluster.py) is installed with apt when missing, started in a temporary
folder and stopped at the end; without root it cannot run and these tests skip, saying why.
Through `python run.py -m cluster=slurm ...` it runs (a) a sweep, one job per value, (b) one job
whose two SLURM tasks train with DDP (gloo), and (c) a job that is signalled as SLURM does before
a time limit (USR2), requeues itself, is requeued again from outside (`scontrol requeue`), and
still ends with the losses of an uninterrupted run. The cluster keeps no accounting (sacct), so
submitit's client learns that a job ended from its result file only.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import logged_losses as _losses
from slurm_cluster import LocalSlurm

from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist
from worldmodel.train.logging import read_metrics

# Deterministic, tiny, one thread per task: every job of a module shares these settings, so the
# sweep's runs are the references for the DDP job and for the requeued job.
COMMON = [
    "cluster=slurm",
    "experiment=smoke_tokenizer",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.max_steps=20",
    "trainer.batch_size=4",
    "trainer.precision=fp32",
    "trainer.ema_decay=null",
    "trainer.log_every=1",
    "trainer.val_every=1000",
    "trainer.ckpt_every=5",
    "trainer.media_every=1000",
    "cluster.cpus_per_task=1",
    "cluster.time_min=15",
    # Run dirs named by job number: the default (all overrides) would pass 255 characters here.
    "hydra.sweep.subdir=${hydra.job.num}",
]
LRS = ("1e-3", "3e-3")
JOB_TIMEOUT = 300


# ---------------------------------------------------------------- the job environment (fast)


SLURM_JOB = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def _set_env(monkeypatch, env: dict[str, str]) -> None:
    for key in (*dist.TORCHRUN_KEYS, *SLURM_JOB):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_submitit_slurm_environment_gives_ranks_master_and_port(monkeypatch):
    _set_env(monkeypatch, SLURM_JOB)
    env = dist.env_from_environment()
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert env.master_addr == "gpu07"  # the first node of the job, from SLURM_JOB_NODELIST
    assert 20000 <= env.master_port <= 60000
    # Every task of the job (and the job when requeued) derives the same port; another job not.
    _set_env(monkeypatch, {**SLURM_JOB, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert dist.env_from_environment().master_port == env.master_port
    _set_env(monkeypatch, {**SLURM_JOB, "SLURM_JOB_ID": "4243"})
    assert dist.env_from_environment().master_port != env.master_port
    # One node: loopback, no name to resolve.
    _set_env(monkeypatch, {**SLURM_JOB, "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2"})
    assert dist.env_from_environment().master_addr == "127.0.0.1"
    # A one-task job leaves the choice to trainer.devices (spawned processes or one).
    _set_env(monkeypatch, {**SLURM_JOB, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert dist.env_from_environment() is None


def test_partial_slurm_environment_is_an_error(monkeypatch):
    partial = {k: v for k, v in SLURM_JOB.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    _set_env(monkeypatch, partial)
    with pytest.raises(RuntimeError, match="SLURM_PROCID, SLURM_LOCALID missing"):
        dist.env_from_environment()


def test_devices_must_match_the_number_of_tasks(monkeypatch):
    _set_env(monkeypatch, {**SLURM_JOB, "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="trainer.devices=1 but the environment has 2"):
        dist.launch(lambda env: env, 1)


# ---------------------------------------------------------------- the cluster (slow)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    reason = cluster.start()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _job_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids of a sweep's jobs (`<job>_<index>` in an array), from submitit's folders."""
    return sorted(p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"))


def _logs(sweep_dir: Path) -> str:
    parts = []
    for path in sorted((sweep_dir / ".submitit").glob("*/*_log.*")):
        parts.append(f"--- {path.name}\n{path.read_text()[-2000:]}")
    return "\n".join(parts)


class Sweep:
    """`python run.py -m ...` with a SLURM launcher, run in the background."""

    def __init__(self, cluster: LocalSlurm, sweep_dir: Path, overrides: list[str]) -> None:
        self.cluster, self.dir = cluster, sweep_dir
        cmd = [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            *overrides,
            f"hydra.sweep.dir={sweep_dir}",
        ]
        self.log = open(sweep_dir.parent / f"{sweep_dir.name}.client.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=cluster.env(), stdout=self.log, stderr=subprocess.STDOUT
        )

    def job_ids(self, n: int, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(ids := _job_ids(self.dir)) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.fail(f"{n} jobs never appeared")
            time.sleep(0.2)
        return ids

    def wait(self, timeout: float = JOB_TIMEOUT) -> None:
        """Wait for the client; it fails fast when its jobs left the queue without a result."""
        deadline = time.monotonic() + timeout
        gone_since = None
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.fail(f"not done after {timeout} s")
            queued = any(self.cluster.squeue(j) for j in _job_ids(self.dir))
            # Without accounting (sacct) submitit cannot see a job that died: it waits for a
            # result file forever. A job gone from the queue for 30 s is not coming back.
            gone_since = None if queued else (gone_since or time.monotonic())
            if gone_since and time.monotonic() - gone_since > 30:
                self.fail("its jobs left the queue without a result")
            time.sleep(1)
        self.log.close()
        if self.proc.returncode != 0:
            self.fail(f"exit code {self.proc.returncode}")

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the client started here, by its own handle
            self.proc.wait()
        self.log.close()
        for job in _job_ids(self.dir):
            self.cluster.run("scancel", job, check=False)
        client = Path(self.log.name).read_text()[-3000:]
        pytest.fail(f"sweep {self.dir.name}: {why}\n{client}\n{_logs(self.dir)}")

    def run_dirs(self) -> list[Path]:
        return sorted(p.parent for p in self.dir.glob("*/.hydra"))


def _result(sweep_dir: Path, job: str, task: int):
    from submitit.core.utils import pickle_load

    outcome, value = pickle_load(sweep_dir / ".submitit" / job / f"{job}_{task}_result.pkl")
    assert outcome == "success", value
    return value.return_value


@pytest.fixture(scope="module")
def sweep(slurm, tmp_path_factory):
    """(a) One job per learning rate; each finishes and writes its metrics."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "lr"
    run = Sweep(slurm, sweep_dir, [*COMMON, f"optim.lr={','.join(LRS)}"])
    ids = run.job_ids(2)
    run.wait()
    return sweep_dir, ids, {float(lr): d for lr, d in zip(LRS, run.run_dirs())}


@pytest.mark.slow
def test_sweep_submits_one_job_per_value(slurm, sweep):
    sweep_dir, ids, runs = sweep
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array, two tasks
    for lr, run_dir in runs.items():
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        assert f"lr: {lr}" in config
        assert sorted(_losses(run_dir)) == list(range(1, 21))
        state = ckpt.load(run_dir / "checkpoints" / "last.pt")
        assert state["step"] == 20 and state["config"]["optim"]["lr"] == lr
    for job in ids:
        assert isinstance(_result(sweep_dir, job, 0), float)  # the last validation loss
    # The runs differ by their learning rate only, and it shows.
    a, b = (_losses(d)[20] for d in runs.values())
    assert abs(a - b) > 1e-3


@pytest.mark.slow
def test_two_slurm_tasks_train_with_ddp(slurm, sweep, tmp_path):
    sweep_dir, _, runs = sweep
    run = Sweep(
        slurm, tmp_path / "ddp", [*COMMON, f"optim.lr={LRS[0]}", "cluster.tasks_per_node=2"]
    )
    (job,) = run.job_ids(1)
    run.wait()
    (run_dir,) = run.run_dirs()
    # Both tasks ran the task function; every rank validates the same batches with the same
    # weights (a codebook's k-means init is a collective), so both return the same loss.
    first = _result(tmp_path / "ddp", job, 0)
    assert isinstance(first, float)
    assert _result(tmp_path / "ddp", job, 1) == pytest.approx(first, rel=1e-4)
    # Each task saw half of every batch of 4; with gradients averaged across the two tasks the
    # weights follow the one-process run of the sweep (without the all-reduce, rank 0 would
    # have trained on its halves alone).
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["config"]["trainer"]["devices"] == 2  # from cluster.tasks_per_node
    assert state["config"]["trainer"]["micro_batch"] == 2
    two = state["model"]
    one = ckpt.load(runs[float(LRS[0])] / "checkpoints" / "last.pt")["model"]
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 1e-4, worst


def _wait_for(predicate, what: str, timeout: float = 120, run: Sweep | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if run is not None:
                run.fail(f"timed out waiting for {what}")
            raise TimeoutError(what)
        time.sleep(0.1)


def _requeued_and_released(slurm: LocalSlurm, job: str, run: Sweep) -> None:
    """Wait for the requeued job to be pending again, then let it start at once: SLURM holds a
    requeued job for two minutes (BeginTime); an administrator's `StartTime=now` skips that."""
    _wait_for(lambda: slurm.squeue(job) == ["PENDING"], "the job to be pending again", run=run)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(slurm, sweep, tmp_path):
    _, _, runs = sweep
    reference = _losses(runs[float(LRS[1])])
    sweep_dir = tmp_path / "preempt"
    # No periodic checkpoints: the only ones before the end are those the signals caused.
    run = Sweep(slurm, sweep_dir, [*COMMON, f"optim.lr={LRS[1]}", "trainer.ckpt_every=1000"])
    (job,) = run.job_ids(1)
    rng = random.Random(0)

    def at_step(k: int):
        return lambda: max(_losses_in(sweep_dir) or [0]) >= k

    # 1. The way SLURM warns of a time limit or preemption: USR2 to every task of the job.
    #    The loop stops after its current step, checkpoints, and submitit requeues the job.
    _wait_for(at_step(rng.randint(3, 6)), "training to start", run=run)
    seen = max(_losses_in(sweep_dir))
    slurm.run("scancel", "--signal=USR2", job)
    _requeued_and_released(slurm, job, run)
    first_stop = ckpt.load(_run_dir(sweep_dir) / "checkpoints" / "last.pt")["step"]
    assert seen <= first_stop < 20, (seen, first_stop)
    # 2. Requeued from outside (an administrator, a preemption): SIGTERM, then the kill.
    _wait_for(at_step(first_stop + rng.randint(3, 5)), "the requeued job to train", run=run)
    seen = max(_losses_in(sweep_dir))
    slurm.run("scontrol", "requeue", job)
    _requeued_and_released(slurm, job, run)
    second_stop = ckpt.load(_run_dir(sweep_dir) / "checkpoints" / "last.pt")["step"]
    assert seen <= second_stop < 20, (seen, second_stop)
    run.wait()

    # The client returns on the result file; SLURM marks the job done a moment later.
    _wait_for(lambda: not slurm.squeue(job), "the job to leave the queue")
    info = slurm.run("scontrol", "show", "job", job)
    assert "JobState=COMPLETED" in info and "Restarts=2" in info, info
    # Same run dir after each requeue; each run resumed where the previous one stopped.
    (run_dir,) = run.run_dirs()
    log = (run_dir / "run.log").read_text()
    assert f"at step {first_stop}" in log and f"at step {second_stop}" in log, log
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == reference  # every step's loss, the final one included, bit for bit
    # The client got the final validation loss of the finished run, not of a cut one.
    val = [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert _result(sweep_dir, job, 0) == pytest.approx(val[-1])
    print(
        f"\nRELIABILITY slurm: job {job} stopped by USR2 at step {first_stop} (requeued by "
        f"submitit), by scontrol requeue at step {second_stop}; completed, losses identical"
    )


def _run_dir(sweep_dir: Path) -> Path:
    dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.jsonl"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _losses_in(sweep_dir: Path) -> dict[int, float]:
    dirs = list(sweep_dir.glob("*/metrics.jsonl"))
    return _losses(dirs[0].parent) if dirs else {}
