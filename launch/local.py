"""One process on this machine: the entry command run by the given Python."""

from collections.abc import Sequence

from launch import LaunchCommand, check_entry, thread_env


def local_command(python: str, entry: Sequence[str], threads: int | None = None) -> LaunchCommand:
    """`python ENTRY...` as a single process, with its CPU thread count pinned when `threads` is given."""
    entry = check_entry(entry)
    return LaunchCommand(argv=(python, *entry), env=thread_env(threads))
