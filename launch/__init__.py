"""Adapters to the launch engines: plain values in, command lines, environments and files out."""

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class LaunchCommand:
    """A command line and the environment variables to add to the parent's environment to run it."""

    argv: tuple[str, ...]
    env: Mapping[str, str]

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))

    def shell(self) -> str:
        """The command as one shell line, environment assignments first, for display by `orch plan`."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def thread_env(threads: int | None) -> dict[str, str]:
    """OMP_NUM_THREADS and MKL_NUM_THREADS pinned to `threads` per process, or nothing when None."""
    if threads is None:
        return {}
    if threads < 1:
        raise ValueError(f"threads per process must be at least 1, got {threads}; pass a positive count or None")
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def check_entry(entry: Sequence[str], module_only: bool = False) -> tuple[str, ...]:
    """The entry command as a tuple, after checking it names something to run."""
    entry = tuple(entry)
    if not entry:
        raise ValueError("the entry command is empty; pass e.g. ('-m', 'orchestrator.worker', JOB_DIR)")
    if module_only and (entry[0] != "-m" or len(entry) < 2):
        raise ValueError(
            f"the entry command {list(entry)} must start with '-m MODULE' for this launcher; "
            "pass e.g. ('-m', 'orchestrator.worker', JOB_DIR)"
        )
    return entry


def check_positive(name: str, value: int) -> None:
    """Raise ValueError unless `value` is at least 1."""
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
