"""A real single-node SLURM on localhost, in a temporary folder, for the tests.

Debian's `slurm-wlm` (slurmctld, slurmd) and `munge` are installed with apt when missing; the
daemons get their own `slurm.conf`, ports, state, spool, logs and munge socket inside the folder,
so nothing of a system installation is touched. Only the daemons started here are stopped, by the
process ids in their pid files.

    cluster = LocalSlurm(tmp_folder)
    reason = cluster.start()          # None when running, else why it cannot run here
    subprocess.run(["sbatch", ...], env=cluster.env())
    cluster.stop()

Also usable by hand: `python tests/slurm_cluster.py FOLDER` starts a cluster and prints the
`SLURM_CONF` to export; `python tests/slurm_cluster.py FOLDER --stop` stops it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def install() -> str | None:
    """apt-get install the daemons when they are missing; the reason when that is impossible."""
    if all(_binary(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            return f"{' '.join(cmd)} failed: {out.stderr[-500:]}"
    missing = [b for b in BINARIES if not _binary(b)]
    return f"installed {' '.join(PACKAGES)} but {missing} still missing" if missing else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _end(pids: list[int], timeout: float) -> None:
    """SIGTERM, then SIGKILL for those still alive after `timeout` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class LocalSlurm:
    """slurmctld + slurmd (+ munged) for one node with `cpus` CPUs and no GPUs."""

    def __init__(self, folder: str | Path, cpus: int = 2, memory_mb: int = 4000) -> None:
        self.folder = Path(folder).resolve()
        self.cpus = cpus
        self.memory_mb = memory_mb
        # slurmd registers under the name of its host; jobs see it in SLURM_JOB_NODELIST and
        # use it as the DDP master address, so it must resolve (it does through /etc/hosts).
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.pid_files = {
            "slurmd": self.folder / "slurmd.pid",
            "slurmctld": self.folder / "slurmctld.pid",
            "munged": self.folder / "munged.pid",
        }

    @property
    def munge_dir(self) -> Path:
        """munged runs as the munge user, which may not reach into `folder` (pytest's temporary
        folders are private to their owner): its socket lives in a folder of its own, recorded
        in `folder/munge.path` so that another process can stop the cluster."""
        record = self.folder / "munge.path"
        if not record.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            record.write_text(tempfile.mkdtemp(prefix="worldmodel-munge-"))
        return Path(record.read_text())

    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, submitit) to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        out = subprocess.run(
            list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        f = self.folder
        lines = [
            "ClusterName=worldmodeltest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'munge.socket'}",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            # Seconds between SIGTERM and SIGKILL when a job ends early (cancel, requeue).
            "KillWait=10",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        user = pwd.getpwnam("munge")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.munge_dir, user.pw_uid, user.pw_gid)
        self.munge_dir.chmod(0o755)
        cmd = [
            _binary("munged"),
            f"--socket={self.munge_dir / 'munge.socket'}",
            f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "munge", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        # root keeps a copy of the pid next to the others (the munge folder is removed on stop)
        self.pid_files["munged"].write_text((self.munge_dir / "munged.pid").read_text())

    def start(self, timeout: float = 60) -> str | None:
        """Start the cluster: None when the node is idle, the reason when this machine cannot
        run it (no root, nothing to install with); a daemon that fails to start raises."""
        reason = install()
        if reason:
            return reason
        if os.geteuid() != 0:
            return "a SLURM controller with SlurmUser=root needs root to start"
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return "the munge user does not exist"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        try:
            self._start_munge()
            env = self.env()
            subprocess.run([_binary("slurmctld"), "-c"], env=env, check=True, timeout=30)
            subprocess.run([_binary("slurmd")], env=env, check=True, timeout=30)
        except (subprocess.SubprocessError, OSError) as e:
            self.stop()
            raise RuntimeError(f"the SLURM daemons did not start: {e}; {self._logs()}") from e
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
            if state in ("idle", "mixed", "allocated"):
                return None
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node did not become idle (state {state!r}); {self._logs()}")

    def _logs(self) -> str:
        parts = []
        for path in (self.munge_dir / "munged.log", *sorted(self.folder.glob("*.log"))):
            if path.exists():
                parts.append(f"--- {path}\n{path.read_text()[-1500:]}")
        return "\n".join(parts) or f"no logs in {self.folder}"

    def stop(self, timeout: float = 30) -> None:
        """Cancel the jobs, end the daemons started here (slurmd, slurmctld, munged) by the ids
        in their pid files, then any process of this cluster left behind (job steps whose daemon
        is gone), found by the `SLURM_CONF` of this cluster in its environment."""
        if self._pid("slurmctld"):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + timeout
                while self.run("squeue", "-h", check=False).strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid:
                _end([pid], timeout)
        _end(self._leftovers(), timeout)
        if (self.folder / "munge.path").exists():
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_files[name].read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _leftovers(self) -> list[int]:
        mine = f"SLURM_CONF={self.conf}".encode()
        keep = {os.getpid(), os.getppid()}
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in keep:
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mine in environ and _alive(int(proc.name)):
                found.append(int(proc.name))
        return found

    def squeue(self, job_id: str) -> list[str]:
        """States of a job (one per array task) still in the queue; empty when it has left."""
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        return out.split()

    def wait_gone(self, job_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.squeue(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still queued after {timeout} s")
            time.sleep(0.5)


if __name__ == "__main__":
    cluster = LocalSlurm(sys.argv[1])
    if "--stop" in sys.argv:
        cluster.stop()
    else:
        why = cluster.start()
        print(why or f"export SLURM_CONF={cluster.conf}")
