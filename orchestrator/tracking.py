"""The trainer's only door to MLflow: a Tracker interface, a do-nothing default, and an MLflow client that never blocks.

Only global rank 0 starts an MlflowTracker; every other rank, and a job without tracking, uses NullTracker.
mlflow is imported inside MlflowTracker.start, never at module level, so the CLI can import this module cheaply.

How MlflowTracker survives a slow or dead server: every call puts one item on a bounded queue (default
1,000 items) and returns at once; ONE background thread sends the items in order. A failed item is retried
with backoff (0.5 s doubling to 5 s) for as long as the server has been unreachable for less than
`retry_for` seconds (default 120 s): an outage shorter than that loses nothing but what overflowed the
queue, also when it spans the end of a job (close(outlast_outage=True) waits out the rest of it). Past that bound each
item is tried once and dropped, so whatever is logged after the server comes
back is sent at once. Requests MLflow refuses outright (a 4xx, e.g. a changed param value) are dropped
at once. Every drop is counted (`dropped`) and warned about.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import PIL.Image
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# mlflow's own HTTP client retries 7 times with backoff and waits 120 s per request by default, which would
# stall the sending thread for minutes per item; this module does its own retrying. Set before mlflow is
# imported (mlflow reads them per request); a value the user exported wins.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

QUEUE_SIZE = 1000
RETRY_FOR_S = 120.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0
CLOSE_FLUSH_SHARE = 0.8  # close() spends this share of its timeout sending the queue, the rest ending the run

# MLflow's limits, as in mlflow.utils.validation (checked by a test).
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
IMAGE_KEY_PATTERN = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")  # what MlflowClient.log_image accepts as a key
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3's UI files an experiment without this tag under its GenAI view (traces, prompts); orch's runs are model
# training (the UI's constant CUSTOM_MODEL_DEVELOPMENT, read from the tag mlflow.experimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused to start the run; the caller may fall back to NullTracker."""


class Tracker(Protocol):
    """What the trainer may ask of experiment tracking; no call blocks on, or raises for, the tracking server."""

    run_id: str | None

    def log_params(self, params: Mapping[str, object]) -> None:
        """Record the run's parameters (values stringified)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at a training step."""

    def log_image(self, image: PIL.Image.Image, key: str, step: int) -> None:
        """Record an image as a step-slider card under `key` and as the artifact `key/step_NNNNNNN.png`."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Record text as an artifact file of the run."""

    def close(self, status: str = "FINISHED", timeout: float = 30.0, outlast_outage: bool = False) -> None:
        """Send what is pending within `timeout` seconds (or, with outlast_outage, until a server that is away
        has been away for retry_for), then mark the run ended with `status`."""


class NullTracker:
    """A Tracker that records nothing: for ranks other than 0 and for jobs without tracking."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, object]) -> None:
        """Do nothing."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Do nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Do nothing."""

    def log_image(self, image: PIL.Image.Image, key: str, step: int) -> None:
        """Do nothing."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Do nothing."""

    def close(self, status: str = "FINISHED", timeout: float = 30.0, outlast_outage: bool = False) -> None:
        """Do nothing."""


# One queued item: what it is (for warnings) and the call that sends it.
Item = tuple[str, Callable[[], object]]


class MlflowTracker:
    """A Tracker logging to one MLflow run through a bounded queue and one sending thread (see the module docstring)."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        uri: str,
        experiment_id: str | None = None,
        queue_size: int = QUEUE_SIZE,
        retry_for: float = RETRY_FOR_S,
    ):
        """Wire an already started run to its sending thread; use MlflowTracker.start() to get one."""
        self.run_id: str | None = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.dropped = 0  # items given up on: queue full, refused by MLflow, or server unreachable too long
        self._client = client
        self._retry_for = retry_for
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        self._drop_lock = threading.Lock()  # `dropped` is counted from the caller's thread and the sender's
        self._closed = False
        self._close_requested = threading.Event()
        self._flush_deadline = math.inf  # time.monotonic() after which queued items are dropped unsent
        self._close_deadline = math.inf  # time.monotonic() after which ending the run is given up
        self._final_status = "FINISHED"
        self._unreachable_since: float | None = None
        self._sender = threading.Thread(target=self._send_until_closed, name="mlflow-tracker", daemon=True)
        self._sender.start()

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        queue_size: int = QUEUE_SIZE,
        retry_for: float = RETRY_FOR_S,
    ) -> MlflowTracker:
        """Get or create `experiment`, resume `run_id` (back to RUNNING) or create a run; raise TrackingError if that
        fails."""
        for name, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = get_or_create_experiment(client, experiment, artifact_location)
            if run_id is None:
                run_tags = {key: str(value) for key, value in (tags or {}).items()}
                run_id = client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
            else:
                client.get_run(run_id)  # raises if the run does not exist
                client.update_run(run_id, status="RUNNING")
                if tags:
                    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
        except Exception as error:
            what = f"resume MLflow run {run_id}" if run_id else f"create MLflow run {run_name!r}"
            raise TrackingError(
                f"could not {what} in experiment {experiment!r} at {uri}: {first_line(error)}; "
                "check that the tracking URI is reachable (`orch validate` checks it) and the run id is right"
            ) from error
        return cls(client, run_id, uri, experiment_id, queue_size=queue_size, retry_for=retry_for)

    @property
    def reachable(self) -> bool:
        """Whether the server answered the last request sent (False while, and after, an outage close() gave up on)."""
        return self._unreachable_since is None

    def log_params(self, params: Mapping[str, object]) -> None:
        """Queue `params`, values stringified and cut to MLflow's maximum length, 100 per request."""
        from mlflow.entities import Param

        entities = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()]
        for chunk in chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self._enqueue(f"{len(chunk)} params", partial(self._client.log_batch, self.run_id, params=chunk))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue `tags`, values cut to MLflow's maximum length, 100 per request."""
        from mlflow.entities import RunTag

        entities = [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]
        for chunk in chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self._enqueue(f"{len(chunk)} tags", partial(self._client.log_batch, self.run_id, tags=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metric values at `step`, stamped with the time of this call."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        entities = [Metric(key, float(value), timestamp_ms, step) for key, value in metrics.items()]
        for chunk in chunks(entities, MAX_METRICS_PER_BATCH):
            self._enqueue(f"metrics at step {step}", partial(self._client.log_batch, self.run_id, metrics=chunk))

    def log_image(self, image: PIL.Image.Image, key: str, step: int) -> None:
        """Queue `image` as the UI's step-slider card under `key` and as the artifact `key/step_NNNNNNN.png`."""
        if not IMAGE_KEY_PATTERN.match(key):
            raise ValueError(
                f"image key {key!r} has characters MLflow refuses; use letters, digits, '_', '-', '.', ' ' and '/'"
            )
        image = image.copy()  # the caller may draw into its image again before the sender gets to it
        timestamp_ms = int(time.time() * 1000)
        card = partial(self._client.log_image, self.run_id, image, key=key, step=step, timestamp=timestamp_ms)
        file = partial(self._client.log_image, self.run_id, image, artifact_file=f"{key}/step_{step:07d}.png")
        self._enqueue(f"image card {key!r} at step {step}", card)
        self._enqueue(f"image file {key}/step_{step:07d}.png", file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue `text` as the artifact `artifact_file`."""
        self._enqueue(f"text file {artifact_file}", partial(self._client.log_text, self.run_id, text, artifact_file))

    def close(self, status: str = "FINISHED", timeout: float = 30.0, outlast_outage: bool = False) -> None:
        """Send the queue within 80% of `timeout`, mark the run `status` in the rest, and return by `timeout`
        regardless.

        outlast_outage: if the server is away when close() is called, keep retrying until the outage has
        lasted retry_for, then take `timeout` as usual: an outage shorter than retry_for loses nothing even
        at the very end of a job (a job that finished; a stopping one had better exit quickly).
        """
        if status not in RUN_END_STATUSES:
            raise ValueError(f"run end status {status!r} is not one of {', '.join(RUN_END_STATUSES)}")
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        outage_left = 0.0
        away_since = self._unreachable_since
        if outlast_outage and away_since is not None:
            outage_left = max(0.0, away_since + self._retry_for - now)
            logger.warning(
                "MLflow server at %s is still unreachable; waiting up to %.0f s more for it before ending the run (%d "
                "item(s) unsent)",
                self.uri,
                outage_left + timeout,
                self._queue.qsize() + 1,
            )
        self._final_status = status
        self._flush_deadline = now + outage_left + CLOSE_FLUSH_SHARE * timeout
        self._close_deadline = now + outage_left + timeout
        self._close_requested.set()
        self._sender.join(timeout=max(0.0, self._close_deadline - time.monotonic()))
        if self._sender.is_alive():
            logger.warning(
                "MLflow run %s: close() gave up after %.0f s; the run may still show RUNNING",
                self.run_id,
                outage_left + timeout,
            )
        if self.dropped:
            logger.warning(
                "MLflow run %s: %d logged item(s) were never sent to %s", self.run_id, self.dropped, self.uri
            )

    def _enqueue(self, what: str, send: Callable[[], object]) -> None:
        """Put one item on the queue without waiting; drop it (counted) if the queue is full."""
        if self._closed:
            logger.debug("MLflow tracker already closed; ignoring %s", what)
            return
        try:
            self._queue.put_nowait((what, send))
        except queue.Full:
            self._count_drop(what, f"the queue of {self._queue.maxsize} unsent items is full")

    def _send_until_closed(self) -> None:
        """The sending thread: send items in order until close() was asked for and the queue is empty, then end the
        run."""
        while not (self._close_requested.is_set() and self._queue.empty()):
            try:
                what, send = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._send_with_retry(what, send, final=False)
        end_run = partial(self._client.set_terminated, self.run_id, self._final_status)
        self._send_with_retry(f"end of run ({self._final_status})", end_run, final=True)

    def _send_with_retry(self, what: str, send: Callable[[], object], final: bool) -> None:
        """Send one item, retrying while the server is unreachable (within retry_for and close()'s deadline)."""
        backoff = FIRST_BACKOFF_S
        while True:
            deadline = self._close_deadline if final else self._flush_deadline
            if time.monotonic() >= deadline:
                self._count_drop(what, "close()'s timeout ran out before it was sent")
                return
            try:
                send()
            except Exception as error:  # noqa: BLE001 - no failure of MLflow may end this thread or training
                if is_refusal(error):
                    self._count_drop(what, f"MLflow refused it: {first_line(error)}", always_warn=True)
                    return
                self._note_unreachable(error)
                if time.monotonic() - self._unreachable_since >= self._retry_for:
                    self._count_drop(what, f"the server has been unreachable for over {self._retry_for:.0f} s")
                    return
                self._pause(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            self._note_reachable()
            return

    def _pause(self, seconds: float) -> None:
        """Sleep between retries; before close() is asked for, wake early when it is."""
        if self._close_requested.is_set():
            time.sleep(seconds)
        else:
            self._close_requested.wait(seconds)

    def _note_unreachable(self, error: Exception) -> None:
        """Warn once when the server stops answering."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            logger.warning(
                "MLflow server at %s is unreachable (%s); training goes on and unsent items are retried for up to "
                "%.0f s",
                self.uri,
                first_line(error),
                self._retry_for,
            )

    def _note_reachable(self) -> None:
        """Say once when the server answers again."""
        if self._unreachable_since is not None:
            outage_s = time.monotonic() - self._unreachable_since
            self._unreachable_since = None
            logger.info("MLflow server at %s is reachable again after %.0f s", self.uri, outage_s)

    def _count_drop(self, what: str, why: str, always_warn: bool = False) -> None:
        """Count one item given up on; warn for the first, every 100th, and every refusal."""
        with self._drop_lock:
            self.dropped += 1
            dropped = self.dropped
        if always_warn or dropped == 1 or dropped % 100 == 0:
            logger.warning("MLflow run %s: dropped %s: %s (%d dropped so far)", self.run_id, what, why, dropped)


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with `artifact_location` when given) or restored from deletion as
    needed."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another job created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before orch set it, or by someone else
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG])
    return experiment.experiment_id


def is_refusal(error: Exception) -> bool:
    """Whether MLflow refused the request itself (a 4xx other than 429, or a local check): sending again cannot help."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return isinstance(error, (ValueError, TypeError))


def chunks(items: list, size: int) -> list[list]:
    """`items` cut into consecutive lists of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def first_line(error: Exception, limit: int = 300) -> str:
    """The first line of an error's message, cut to `limit` characters, for one-line log messages."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:limit]


def default_tracking_uri(root: Path) -> str:
    """The SQLite store used when nothing else is configured: sqlite:///<abs root>/mlflow.db."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def default_artifact_location(root: Path) -> str:
    """The file:// URI of <abs root>/mlartifacts, so artifacts never land in whatever the working directory is."""
    return (Path(root).resolve() / "mlartifacts").as_uri()


def resolve_tracking_uri(spec_uri: str | None, root: Path) -> str:
    """The tracking URI to use: the spec's, else env MLFLOW_TRACKING_URI, else the default SQLite store under root."""
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


UI_PORT = 5000  # where `orch ui` serves a local store by default


def run_page(uri: str, experiment_id: str | None, run_id: str, ui_port: int = UI_PORT) -> str:
    """The address of a run's page in the MLflow UI: on the tracking server for an http(s) store, else where `orch ui`
    serves a local one. `workflowType=machine_learning` opens MLflow 3's model-training view (without it the UI opens
    an experiment in the view the browser used last, the GenAI one in a fresh browser; measured with MLflow 3.17)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{ui_port}"
    path = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else "#/experiments"  # an older record
    return f"{base}/{path}?workflowType=machine_learning"


def served_by_orch_ui(uri: str) -> bool:
    """Whether the store is local (its pages exist once `orch ui` serves it) rather than a tracking server."""
    return not uri.startswith(("http://", "https://"))


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None if the tracking URI looks usable, else one line naming the URI, the problem and the fix (imports no
    mlflow)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return check_http_server(uri, timeout)
    if scheme == "sqlite":
        return check_sqlite_store(uri)
    if scheme in ("file", ""):
        return check_file_store(uri)
    return None  # databases and hosted services: nothing to check without their clients


def check_http_server(uri: str, timeout: float) -> str | None:
    """None if GET <uri>/health answers 200 within `timeout` seconds, else why not."""
    import urllib.error  # here: urllib.request costs `orch status` and `orch list` ~20 ms of start-up
    import urllib.request

    health_url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health_url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:  # URLError, refused, timed out, malformed URL
        reason = getattr(error, "reason", error)
        return (
            f"MLflow tracking server {uri} is not reachable ({reason}); start it "
            "(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or set tracking.uri / MLFLOW_TRACKING_URI to a "
            "running one"
        )
    if status != 200:
        return (
            f"MLflow tracking server {uri} answered HTTP {status} at /health; "
            "check that tracking.uri / MLFLOW_TRACKING_URI is the address of an MLflow server"
        )
    return None


def check_sqlite_store(uri: str) -> str | None:
    """None if the SQLite database (or its folder) can be written, else why not."""
    path_part = uri[len("sqlite://") :].split("?")[0]  # "//abs/x.db", "/relative.db", or "" for in-memory
    if path_part in ("", "/", "/:memory:"):
        return None
    database = Path(path_part[1:]).absolute()
    if database.exists() and not os.access(database, os.W_OK):
        return (
            f"MLflow store {uri}: the database {database} is not writable; "
            "fix its permissions or use another tracking.uri"
        )
    return check_writable_folder(database.parent, uri)


def check_file_store(uri: str) -> str | None:
    """None if the file store's folder can be written and MLflow is allowed to use it, else why not."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        return (
            f"MLflow 3 refuses the file store {uri} unless MLFLOW_ALLOW_FILE_STORE=true; "
            "use a sqlite:/// tracking.uri (the default) or export MLFLOW_ALLOW_FILE_STORE=true"
        )
    folder = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)).absolute()
    return check_writable_folder(folder, uri)


def check_writable_folder(folder: Path, uri: str) -> str | None:
    """None if `folder` exists and is writable, or can be created under its nearest existing ancestor, else why not."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"MLflow store {uri}: cannot create {folder} because {existing} is a file; use another tracking.uri"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"MLflow store {uri}: {existing} is not writable; fix its permissions or use another tracking.uri"
    return None


def log_to_run(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Add metrics at `step` to an existing run, leaving its status as it is (`orch eval` of a job's checkpoint);
    TrackingError if the server or the run cannot be reached."""
    for name, value in MLFLOW_CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    try:
        MlflowClient(tracking_uri=uri).log_batch(
            run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )
    except Exception as error:
        raise TrackingError(f"could not log to MLflow run {run_id} at {uri}: {first_line(error)}") from error
