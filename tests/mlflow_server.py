"""A pytest fixture that runs a real `mlflow server` on a free loopback port, which a test may stop and restart."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0


class MlflowServer:
    """One `mlflow server` process on a fixed port, store and artifact folder, that can be stopped and started again."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The `mlflow server` command line: one worker, sqlite store and proxied artifacts under root."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]

    @property
    def running(self) -> bool:
        """Whether this fixture's server process is up (started and not stopped)."""
        return self.process is not None

    def start(self) -> None:
        """Start the server and wait until /health answers 200, failing with the server's log if it never does."""
        assert self.process is None, "the MLflow server is already running; stop() it first"
        # No job runner: tests need none, it slows startup and leaves a temp folder in /dev/shm per start.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the uvicorn and job-runner children too
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.fail(f"exited with code {self.process.returncode} before answering /health")
            if answers_health(self.uri):
                return
            time.sleep(0.25)
        self.fail(f"did not answer {self.uri}/health within {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, wait, then SIGKILL if it lingers."""
        if self.process is None:
            return
        process, self.process = self.process, None
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait(timeout=10)
        signal_group(process, signal.SIGKILL)  # children that outlived their parent
        wait_until_port_is_free(self.port)

    def fail(self, why: str) -> None:
        """Stop whatever started and fail the test with the server's log."""
        self.stop()
        pytest.fail(f"mlflow server {why}; its log:\n{self.log_path.read_text(errors='replace')[-5000:]}")


def answers_health(uri: str) -> bool:
    """Whether GET <uri>/health answers 200 right now."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the process group this fixture started (its id is the server's pid)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_port_is_free(port: int, timeout: float = 10.0) -> None:
    """Wait until nothing accepts connections on `port`, so a restart can bind it again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running MLflow server (`.uri`, `.stop()`, `.start()`), shared by a test module and always stopped after it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
