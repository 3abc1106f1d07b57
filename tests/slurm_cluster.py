"""A real single-machine Slurm for tests: munged, slurmctld and one slurmd (node `localhost`), all private.

Everything lives in one temporary folder: the munge key and socket, slurm.conf, state, spool and logs,
on ports picked free; the system's own munge or Slurm, if any, is left alone. Jobs see the cluster
through SLURM_CONF, which `env` carries. `stop()` cancels every job before stopping the daemons,
because a stopped slurmd leaves its jobs' processes running.

Settings that matter (measured here, see DESIGN.md):
- AuthInfo cred_expire=10 and SchedulerParameters sched_interval=2: a requeued job runs again after
  ~12 s instead of 120-180 s.
- MinJobAge=600: `scontrol show job` still answers for finished jobs (there is no sacct without slurmdbd).
- SlurmdParameters=config_overrides with CPUs=8 on a 2-core machine: a few sleeping test jobs at once.
- KillWait=5: a cancel or requeue sends SIGTERM, then SIGKILL this long after.

Run `python -m tests.slurm_cluster` to start one by hand (it prints the SLURM_CONF to export).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 30.0
ACTIVE_STATES = (
    "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,RESIZING,SIGNALING,STAGE_OUT"
)

SLURM_CONF = """\
ClusterName=orchtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here; the message says why."""


def ensure_installed() -> None:
    """Install the Debian packages when slurmctld is missing (apt-get update first only if needed)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(install, check=False, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, check=False, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(install)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


class SlurmCluster:
    """munged + slurmctld + slurmd on 127.0.0.1 under `root`, with helpers to submit and inspect jobs."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}

    # --- start and stop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start the three daemons and wait for the node to be idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a private slurmd must run as root (it starts jobs as their users)")
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged refuses a socket folder that others cannot enter
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(exist_ok=True)
        self.conf.write_text(
            SLURM_CONF.format(root=self.root, cpus=self.cpus, ctld_port=free_port(), slurmd_port=free_port())
        )
        key = self.root / "munge.key"
        if not key.exists():
            self.run("mungekey", "--create", f"--keyfile={key}")
        # Foreground daemons (-F, -D) in their own sessions: this object holds their pids and their
        # exit status, and a failed start shows at once instead of as a stale pid file.
        self.spawn(
            "munged",
            "munged",
            "-F",
            f"--socket={self.root}/munge.socket",
            f"--key-file={key}",
            f"--log-file={self.root}/log/munged.log",
            f"--pid-file={self.root}/munged.pid",
            f"--seed-file={self.root}/munged.seed",
        )
        self.wait_for(lambda: (self.root / "munge.socket").exists(), "munged's socket", START_TIMEOUT_S)
        self.spawn("slurmctld", "slurmctld", "-D", "-i")  # -i: ignore state left by an earlier run
        self.spawn("slurmd", "slurmd", "-D", "-N", "localhost")
        self.wait_for(self.node_is_idle, "node localhost to be idle", START_TIMEOUT_S)

    def spawn(self, name: str, *argv: str) -> None:
        """Start one daemon in the foreground, its output in log/<name>.out."""
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(
                argv, env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def node_is_idle(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with code {process.returncode} while starting\n{self.logs()}")
        result = self.run("sinfo", "-h", "-n", "localhost", "-o", "%t", check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons, and kill whatever of this cluster still runs.

        Returns what had to be killed at the end (empty when the orderly stop was enough)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            jobs = self.active_jobs()
            if jobs:
                self.run("scancel", *jobs, check=False)
            try:
                self.wait_for(lambda: not self.active_jobs(), "every job to end", STOP_TIMEOUT_S)
            except TimeoutError:
                pass  # the leftover check below kills what still runs
        for name in ("slurmd", "slurmctld", "munged"):  # reverse order of start
            process = self.processes.pop(name, None)
            if process is None:
                continue
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        leftovers = self.leftover_processes()
        for pid, command in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"{pid} {command}" for pid, command in leftovers]

    def leftover_processes(self) -> list[tuple[int, str]]:
        """Processes that carry this cluster's SLURM_CONF: daemons, slurmstepd and job processes."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes() + b"\0":
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append((int(entry.name), command))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    # --- jobs -------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster."""
        result = subprocess.run(argv, check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def submit(self, script_path: str | Path, *options: str) -> str:
        """`sbatch --parsable [options] SCRIPT`; returns the job id."""
        return self.run("sbatch", "--parsable", *options, str(script_path)).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", line))

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def requeue(self, job_id: str) -> None:
        self.run("scontrol", "requeue", job_id)

    def cancel(self, job_id: str, signal_name: str | None = None, batch: bool = False) -> None:
        """scancel the job, or send it a signal (to its steps; with batch=True to the batch shell only)."""
        options = ([f"--signal={signal_name}"] if signal_name else []) + (["--batch"] if batch else [])
        self.run("scancel", *options, job_id)

    def active_jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-t", ACTIVE_STATES, "-o", "%i", check=False).stdout.split()

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def wait_for(condition, what: str, timeout: float, interval: float = 0.2):
        """Poll `condition` until it returns something true; TimeoutError naming `what` otherwise."""
        return helpers.wait_for(condition, timeout=timeout, interval=interval, what=what)

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def started_cluster() -> Iterator[SlurmCluster]:
    """Start a private Slurm, yield it, and stop it (jobs cancelled, daemons gone) at the end.

    Skips the test with the reason when Slurm cannot be installed or started, unless
    ORCH_REQUIRE_SLURM=1 (set it in CI, where a silent skip would hide a broken set-up)."""
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="orch-slurm-")))
    try:
        started = time.monotonic()
        cluster.start()
        print(f"slurm cluster up in {time.monotonic() - started:.1f} s, SLURM_CONF={cluster.conf}")
    except (SlurmUnavailable, TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        helpers.service_unavailable(f"a local Slurm could not start: {err}", "ORCH_REQUIRE_SLURM")
    try:
        yield cluster
    finally:
        leftovers = cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        assert not leftovers, f"processes outlived the cluster's stop and were killed: {leftovers}"


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running private Slurm shared by a test module (list tests.slurm_cluster in conftest's pytest_plugins)."""
    yield from started_cluster()


if __name__ == "__main__":
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="orch-slurm-")))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        print("stopped; killed:", cluster.stop())
        shutil.rmtree(cluster.root, ignore_errors=True)
