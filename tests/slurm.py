"""A real one-node Slurm cluster for the tests, from Debian's slurm-wlm and munge, run as root.

It advertises two GPUs backed by placeholder character devices, so job scripts keep their GPU
directives unchanged; jobs then see CUDA_VISIBLE_DEVICES but no GPU, and classify on the CPU.
Its own ports and state folder keep it apart from any Slurm the machine already runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SLURM_CONF = """\
ClusterName=batchtest
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
KillWait=10
MinJobAge=600
MaxArraySize=4
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
NodeName={host} CPUs={cpus} RealMemory={memory} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
GRES_CONF = "NodeName={host} Name=gpu File={state}/gpu[0-1]\n"


@dataclass
class Cluster:
    state: Path
    started_munge: bool

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.state / "slurm.conf")}

    def __call__(self, *command: str, check: bool = True, timeout: float = 900, **options) -> subprocess.CompletedProcess:
        """COMMAND's output; a command that hangs (sbatch --wait on a job that never starts) fails the test."""
        result = subprocess.run(list(command), capture_output=True, text=True, env=options.pop("env", self.env),
                                timeout=timeout, **options)  # fmt: skip
        if check and result.returncode:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def job_fields(self, job: str) -> dict[str, str]:
        """What `scontrol show job` says of one job or array task, from the controller's memory."""
        shown = self("scontrol", "show", "job", "--oneliner", job, check=False).stdout
        return dict(part.split("=", 1) for part in shown.split() if "=" in part)

    def job_state(self, job: str) -> str:
        """PENDING, RUNNING, COMPLETED... of one job or array task."""
        return self.job_fields(job).get("JobState", "UNKNOWN")

    def start_when_requeued(self, job: str, limit: float = 300) -> None:
        """Start JOB as soon as it is requeued. Slurm holds a requeued job for 120 s (Reason=BeginTime),
        a pause the tests need not wait out: an administrator's `StartTime=now` lifts it, as here."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            fields = self.job_fields(job)
            if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
                self("scontrol", "update", f"JobId={job}", "StartTime=now")
                return
            time.sleep(0.5)
        raise AssertionError(f"{job} was not requeued within {limit} s: {self.job_fields(job)}\n{self.log_tail()}")

    def wait_until_done(self, jobs: list[str], limit: float = 600) -> dict[str, str]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            states = {job: self.job_state(job) for job in jobs}
            if all(state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") for state in states.values()):
                return states
            time.sleep(1)
        raise AssertionError(f"jobs still running after {limit} s: {states}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "".join((self.state / name).read_text()[-3000:] for name in ("slurmctld.log", "slurmd.log") if (self.state / name).exists())

    def stop(self) -> None:
        self("scontrol", "shutdown", check=False)
        for pidfile in ("slurmctld.pid", "slurmd.pid"):
            _wait_for_exit(self.state / pidfile)
        if self.started_munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)
        shutil.rmtree(self.state, ignore_errors=True)


def _wait_for_exit(pidfile: Path, limit: float = 30) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)


def _start_munge() -> bool:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    return True


def start() -> Cluster:
    host = socket.gethostname().split(".")[0]
    state = Path(tempfile.mkdtemp(prefix="batch-slurm-"))
    os.chmod(state, 0o755)
    for number in range(2):
        os.mknod(state / f"gpu{number}", 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
    memory = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
    (state / "slurm.conf").write_text(SLURM_CONF.format(host=host, state=state, cpus=os.cpu_count(), memory=memory))
    (state / "gres.conf").write_text(GRES_CONF.format(host=host, state=state))
    cluster = Cluster(state, _start_munge())
    cluster("slurmctld", "-c")
    cluster("slurmd")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cluster("sinfo", "--noheader", "--format=%T", check=False).stdout.strip() == "idle":
            return cluster
        time.sleep(0.5)
    log = cluster.log_tail()
    cluster.stop()
    raise AssertionError(f"the test cluster's node never became idle\n{log}")
