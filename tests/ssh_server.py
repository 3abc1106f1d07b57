"""A private ssh server on 127.0.0.1 for the ssh-style multi-node tests (launcher deepspeed).

Everything lives in one temporary folder: host key, client key, authorized_keys, sshd_config, log,
and an `ssh` wrapper that logs in with the client key and accepts the throwaway host key. Jobs see it
through `env`: the wrapper's folder first on PATH (DeepSpeed's runner checks each host with a bare
`ssh HOST hostname`, and pdsh runs `ssh` from the PATH), the port goes into the spec's `ssh_port`.
Two host names that both reach this machine, `localhost` and `127.0.0.1`, make two "nodes".
The system's own ssh configuration (~/.ssh, port 22) is left alone.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import service_unavailable

START_TIMEOUT_S = 10.0
HOSTS = ("localhost", "127.0.0.1")

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {root}/host_key
AuthorizedKeysFile {root}/authorized_keys
PidFile {root}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""

SSH_WRAPPER = """\
#!/bin/sh
exec /usr/bin/ssh -i {root}/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \\
    -o BatchMode=yes -o LogLevel=ERROR "$@"
"""


class SshUnavailable(RuntimeError):
    pass


class SshServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the hosts: the ssh wrapper first on PATH."""
        return {"PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self) -> None:
        missing = [
            tool for tool in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen") if not Path(tool).exists()
        ]
        if shutil.which("pdsh") is None:
            missing.append("pdsh")
        if missing:
            raise SshUnavailable(
                f"{', '.join(missing)} missing (scripts/install_test_services.sh installs openssh-server and pdsh)"
            )
        for key in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)],
                check=True,
                capture_output=True,
            )
        shutil.copyfile(self.root / "client_key.pub", self.root / "authorized_keys")
        (self.root / "sshd_config").write_text(SSHD_CONFIG.format(port=self.port, root=self.root))
        (self.root / "bin").mkdir()
        wrapper = self.root / "bin" / "ssh"
        wrapper.write_text(SSH_WRAPPER.format(root=self.root))
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        self.process = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-f", str(self.root / "sshd_config"), "-E", str(self.root / "sshd.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SshUnavailable(f"sshd exited with {self.process.returncode}: {self._log()}")
            if self.reaches(HOSTS[-1]):
                return
            time.sleep(0.2)
        raise SshUnavailable(f"no ssh login to 127.0.0.1:{self.port} within {START_TIMEOUT_S:.0f} s: {self._log()}")

    def reaches(self, host: str) -> bool:
        done = subprocess.run(
            [str(self.root / "bin" / "ssh"), "-p", str(self.port), host, "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _log(self) -> str:
        log = self.root / "sshd.log"
        return log.read_text()[-500:] if log.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def started_ssh_server() -> Iterator[SshServer]:
    """Start a private sshd, yield it, stop it at the end. Skips the test with the reason when it cannot start,
    unless ORCH_REQUIRE_SSH=1 (for a CI where a silent skip would hide a broken set-up)."""
    server = SshServer(Path(tempfile.mkdtemp(prefix="orch-sshd-")))
    try:
        server.start()
    except (SshUnavailable, OSError, subprocess.SubprocessError) as err:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        service_unavailable(f"a local ssh server could not start: {err}", "ORCH_REQUIRE_SSH")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
