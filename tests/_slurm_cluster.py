"""A single-node SLURM cluster on this machine, for the tests (Debian's ``slurm-wlm`` and
``munge``; root, as CI runs). Two partitions, as a cloud cluster has them: ``spot``
(preemptable, requeued) and ``ondemand`` (a higher priority tier that preempts it).

Its configuration lives in a folder of its own, named to every SLURM command by
``SLURM_CONF`` (sbatch passes it on to the jobs), so nothing in /etc/slurm is touched; the
munge key is the machine's (``mungekey -c`` once). Started once per machine and reused by
the next test session while it answers; see ../shared/notes/slurm.md for what was measured.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

HOME = Path("/tmp/sweeprun-slurm")
CONF = HOME / "slurm.conf"
#: KillWait=60: what a job's processes get between SLURM's SIGTERM and its SIGKILL (a requeue,
#: a preemption). Real clusters give 30 s; the tests' machine is loaded by the suite itself,
#: where a run's first save (importing torch) can take seconds.
#: Seconds a requeued job waits before it may start again. SLURM's default (120 s, the
#: credential lifetime) is for a real cluster; the tests' cluster starts requeued jobs soon.
CRED_EXPIRE_S = 5


def env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(CONF)}


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), env=env(), capture_output=True, text=True, check=check, timeout=timeout)


def _answers() -> bool:
    if not CONF.exists() or CONF.read_text() != _config():
        return False  # none, or started with another configuration: start it afresh
    try:
        found = run("sinfo", "-h", "-o", "%P %t", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = found.stdout.split()
    up = ("idle", "mix", "alloc")
    return found.returncode == 0 and "spot*" in states and any(state in states for state in up)


def _config() -> str:
    # the machine's short name, reached on loopback: a container's hostname need not resolve
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    memory_mb = total_kb // 1024 * 3 // 4
    return f"""\
ClusterName=sweeprun-tests
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
StateSaveLocation={HOME}/state
SlurmdSpoolDir={HOME}/spool
SlurmctldPidFile={HOME}/slurmctld.pid
SlurmdPidFile={HOME}/slurmd.pid
SlurmctldLogFile={HOME}/slurmctld.log
SlurmdLogFile={HOME}/slurmd.log
ReturnToService=2
MinJobAge=5
KillWait=60
SchedulerParameters=sched_interval=2
MaxArraySize=10000
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=spot Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=ondemand Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def start() -> dict[str, str]:
    """The cluster, started if it does not answer; the environment that reaches it."""
    if _answers():
        return env()
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c) is None
               and not Path(f"/usr/sbin/{c}").exists()]
    if missing:
        raise RuntimeError(f"SLURM is not installed ({', '.join(missing)} missing): "
                           "apt-get install -y slurm-wlm munge (.ci/run does)")
    subprocess.run(["pkill", "-x", "slurmctld"], check=False)
    subprocess.run(["pkill", "-x", "slurmd"], check=False)
    shutil.rmtree(HOME, ignore_errors=True)
    for folder in ("state", "spool"):
        (HOME / folder).mkdir(parents=True)
    CONF.write_text(_config())
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "-c"], check=True)
    subprocess.run(["chown", "munge:munge", str(key)], check=True)
    Path("/run/munge").mkdir(exist_ok=True)
    subprocess.run(["chown", "munge:munge", "/run/munge"], check=True)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run(["/usr/sbin/slurmctld"], env=env(), check=True)
    subprocess.run(["/usr/sbin/slurmd"], env=env(), check=True)
    deadline = time.monotonic() + 60
    while not _answers():
        if time.monotonic() > deadline:
            log = (HOME / "slurmctld.log").read_text()[-2000:] if (HOME / "slurmctld.log").exists() else ""
            raise RuntimeError(f"the test SLURM cluster did not come up in 60 s: {log}")
        time.sleep(0.5)
    return env()


def cancel_all() -> None:
    """Cancel every job on the cluster (it is the tests' own): a test that failed halfway must
    not leave tasks that hold the CPUs the next test's jobs wait for."""
    ids = set(run("squeue", "-h", "-o", "%A", check=False).stdout.split())
    if ids:
        run("scancel", *sorted(ids), check=False)
