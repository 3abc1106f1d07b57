"""How a rank ends: with its exit code, its output and its atexit handlers, but without the interpreter's
teardown, where finalising torch's process groups could abort a rank that finished (orchestrator.worker)."""

import subprocess
import sys
import textwrap


def test_a_finished_rank_keeps_its_exit_code_output_and_exit_handlers_and_skips_teardown(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, sys
        from orchestrator.worker import exit_without_teardown

        atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").close())  # e.g. inductor's compile workers

        class FinalisedAtTeardown:
            def __del__(self):
                sys.__stderr__.write("finalised at teardown")  # builtins such as open() are gone by then

        held_until_exit = FinalisedAtTeardown()
        sys.stdout.write("last words, unflushed")
        exit_without_teardown(3)
    """)
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 3, ended.stderr
    assert ended.stdout == "last words, unflushed"
    assert (tmp_path / "atexit").exists(), "the atexit handlers must still run"
    assert "finalised at teardown" not in ended.stderr, "objects alive at exit must not be finalised"


def test_without_it_the_same_object_would_be_finalised():
    # The control for the test above: a plain exit does finalise module globals, so its check can fail.
    script = textwrap.dedent("""
        import sys

        class FinalisedAtTeardown:
            def __del__(self):
                sys.__stderr__.write("finalised at teardown")  # builtins such as open() are gone by then

        held_until_exit = FinalisedAtTeardown()
    """)
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert "finalised at teardown" in ended.stderr
