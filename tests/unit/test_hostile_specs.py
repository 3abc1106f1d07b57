"""Hostile specs: whatever a file or a --set holds, `orch validate` answers with exit 0 or one clear message and exit
2, fast, creating nothing, and never says yes to a value no job can train with.

A fuzz (hypothesis, derandomized: the same cases on every run) mutates the shipped specs' values, structure, encoding
and aliases; a table pins each class of hostile input to its message; a few real `orch validate` processes show the
installed command exits 2 at once on the worst of them.
"""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import cli
from tests.helpers import orch

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("dit_digits.yaml", "dit_cats.yaml", "prepare_text.yaml")
SHIPPED_TEXT = {name: (REPO / "jobs" / name).read_text() for name in SHIPPED}
SHIPPED_TREE = {name: yaml.safe_load(text) for name, text in SHIPPED_TEXT.items()}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # a mutated source never waits on the Hub
CASE_SECONDS = 2.0
HANG_SECONDS = 10.0


# ---- the check every case goes through ---------------------------------------------------------


class _Hang(BaseException):
    """A case ran past HANG_SECONDS (a BaseException: CliRunner catches Exception)."""


def _on_alarm(signum, frame):
    raise _Hang()


def run_validate(spec_bytes: bytes, overrides: tuple[str, ...] = ()) -> tuple[str | None, float]:
    """`orch validate` (the real command group, in this process) on a spec file holding spec_bytes: what is wrong
    with the answer (None: exit 0 or 2, no traceback, nothing created, no unfit spec accepted) and its seconds."""
    with tempfile.TemporaryDirectory(prefix="orch-hostile-") as folder:
        spec, root = Path(folder) / "spec.yaml", Path(folder) / "runs"
        spec.write_bytes(spec_bytes)
        args = ["--root", str(root), "validate", str(spec), *(arg for o in overrides for arg in ("--set", o))]
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
        start = time.perf_counter()
        try:
            result = CliRunner().invoke(cli, args, env=OFFLINE)
        except _Hang:
            return f"no answer within {HANG_SECONDS} s", HANG_SECONDS
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - start
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            return f"traceback: {type(result.exception).__name__}: {str(result.exception)[:200]}", seconds
        if result.exit_code not in (0, 2) or "Traceback" in result.output:
            return f"exit {result.exit_code}: {result.output[-300:]}", seconds
        if seconds > CASE_SECONDS:
            return f"took {seconds:.2f} s", seconds
        if sorted(p.name for p in Path(folder).iterdir()) != ["spec.yaml"]:
            return f"validate created {sorted(p.name for p in Path(folder).iterdir())}", seconds
        if result.exit_code == 0:
            return _unfit(spec, overrides), seconds
    return None, seconds


def _unfit(path: Path, overrides: tuple[str, ...]) -> str | None:
    """Why a spec validate accepted cannot train (a value no optimizer, RNG or layer takes), or None. Written against
    plain values, not the schema's bounds, so that it judges the code before and after the same way."""
    from orchestrator.specs.job import load_spec, spec_kind
    from orchestrator.specs.prepare import load_prepare_spec

    spec = load_prepare_spec(path, overrides) if spec_kind(path) == "prepare" else load_spec(path, overrides)
    flat = _flat(spec.model_dump())  # python mode: a JSON dump would turn inf into null
    for key, value in flat.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                return f"accepted {key} = {item}"
            if isinstance(item, int) and not isinstance(item, bool) and not -(2**31) < item < 2**32:
                return f"accepted {key} = {item} (beyond what the code's integers and seeds hold)"
            if key.endswith("seed") and item < 0:
                return f"accepted {key} = {item} (numpy seeds are 0..2**32-1)"
    if any(not 0 <= beta < 1 for beta in flat.get("train.adam_betas", ())):
        return f"accepted train.adam_betas = {flat['train.adam_betas']}"
    if any(c < 0 for c in flat.get("sample.classes") or ()):
        return f"accepted sample.classes = {flat['sample.classes']}"
    if "model.mlp_ratio" in flat and int(flat["model.hidden_size"] * flat["model.mlp_ratio"]) < 1:
        return f"accepted model.mlp_ratio = {flat['model.mlp_ratio']} (a feed-forward layer of no unit)"
    return None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Validate each shipped spec once: the first call imports what validate needs (torch, for the shards' check),
    which is not what the per-case bound measures."""
    for name in SHIPPED:
        run_validate((REPO / "jobs" / name).read_bytes())


# ---- the fuzz ------------------------------------------------------------------------------------

HOSTILE_NUMBERS = st.sampled_from(
    [-1, 0, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 10**30, float("inf"), float("-inf"), float("nan"), 1e-320, -0.0]
)
HOSTILE_TEXT = st.sampled_from(
    [".inf", "-.inf", ".nan", "1e309", "1.0e309", "9" * 100, "-" + "9" * 100, "0x" + "f" * 40, "[" * 3000, "{a: " * 50,
     "&a [*a]", "", "~", "yes", "no", "'", '"', "{", "a: b: c", "\x00", "\x1b[31m", "é", "\ud800", "1:2:3"]
)  # fmt: skip
LEAVES = st.one_of(
    HOSTILE_NUMBERS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    HOSTILE_TEXT,
    st.booleans(),
    st.none(),
)
VALUES = st.one_of(
    LEAVES,
    st.lists(LEAVES, max_size=4),
    st.dictionaries(st.text(max_size=8), LEAVES, max_size=3),
    st.integers(min_value=2, max_value=60).map(lambda depth: _nested(depth)),
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a spec tree (sections, values and list items)."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            out += _paths(value, prefix + (index,))
    return out


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Any, path: tuple, value: Any, delete: bool = False) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@st.composite
def tree_mutations(draw, tree: dict) -> dict:
    """The spec's tree with 1-3 values replaced, sections deleted or swapped for lists, keys misspelt."""
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(tree)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["number", "number", "value", "value", "delete", "rename", "listify"]))
        numbers = [p for p in paths if isinstance(_get(tree, p), (int, float)) and not isinstance(_get(tree, p), bool)]
        if kind == "number" and numbers:  # the values a job trains with: out of range, infinite, NaN, huge
            path = draw(st.sampled_from(numbers))
        node = tree
        for key in path[:-1]:
            node = node[key]
        if kind == "number" and numbers:
            _set(tree, path, draw(HOSTILE_NUMBERS | st.floats() | st.integers(-(2**70), 2**70)))
        elif kind == "delete":
            _set(tree, path, None, delete=True)
        elif kind == "rename" and isinstance(node, dict):
            node[str(path[-1]) + draw(st.sampled_from(["_", "s", "X"]))] = node.pop(path[-1])
        elif kind == "listify":
            _set(tree, path, [node[path[-1]]])
        else:
            _set(tree, path, draw(VALUES))
    return tree


def _flow_bomb(fanout: int, levels: int) -> str:
    """A billion-laughs list in flow style (one line, for a --set): `levels` lists of `fanout` aliases of the one
    below."""
    anchors = ["&l0 [lol]"] + [f"&l{n} [{', '.join([f'*l{n - 1}'] * fanout)}]" for n in range(1, levels + 1)]
    return "[" + ", ".join(anchors) + "]"


def _bomb(fanout: int, levels: int) -> str:
    lines = ["description:", '  - &l0 ["lol"]']
    for level in range(1, levels + 1):
        lines.append(f"  - &l{level} [{', '.join([f'*l{level - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


@st.composite
def text_mutations(draw, text: str) -> bytes:
    """The spec's text, encoded otherwise, cut, with bytes put in, or with an alias bomb or loop added."""
    kind = draw(st.sampled_from(["encoding", "truncate", "insert", "replace", "bomb", "loop", "anchor", "bom"]))
    data = text.encode()
    if kind == "encoding":
        text = text.replace("description: ", "description: café ", 1)
        return text.encode(draw(st.sampled_from(["latin-1", "utf-16", "utf-16-be", "utf-32", "cp1252"])))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if kind == "replace":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == "bomb":
        body = "\n".join(line for line in text.splitlines() if not line.startswith("description:"))
        return (body + "\n" + _bomb(draw(st.integers(2, 12)), draw(st.integers(1, 12)))).encode()
    if kind == "loop":
        body = "\n".join(line for line in text.splitlines() if not line.startswith("description:"))
        return (body + "\ndescription: &a [x, *a]\n").encode()
    if kind == "anchor":  # a real use of aliases: one section's mapping reused for another
        tree = yaml.safe_load(text)
        sections = [key for key, value in tree.items() if isinstance(value, dict)]
        first, second = draw(st.sampled_from(sections)), draw(st.sampled_from(sections))
        return text.replace(f"\n{first}:", f"\n{first}: &s", 1).encode() + f"\n{second}x: *s\n".encode()
    return b"\xef\xbb\xbf" + data


@st.composite
def hostile_cases(draw) -> tuple[bytes, tuple[str, ...]]:
    name = draw(st.sampled_from(SHIPPED))
    text, tree = SHIPPED_TEXT[name], copy.deepcopy(SHIPPED_TREE[name])
    kind = draw(st.sampled_from(["tree", "tree", "text", "set"]))
    overrides: tuple[str, ...] = ()
    if kind == "tree":
        data = yaml.safe_dump(draw(tree_mutations(tree)), sort_keys=False, allow_unicode=True).encode()
    elif kind == "text":
        data = draw(text_mutations(text))
    else:
        data = text.encode()
        keys = [".".join(map(str, path)) for path in _paths(tree) if all(isinstance(p, str) for p in path)]
        overrides = tuple(
            f"{draw(st.sampled_from(keys) | st.text(max_size=12))}={draw(HOSTILE_TEXT | st.text(max_size=20))}"
            for _ in range(draw(st.integers(1, 3)))
        )
    return data, overrides


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=hostile_cases())
def test_mutated_shipped_specs_get_exit_0_or_2_fast_and_never_a_silent_yes(case):
    data, overrides = case
    problem, _ = run_validate(data, overrides)
    assert problem is None, f"{problem}\nspec: {data[:300]!r}...\n--set: {overrides}"


# ---- the classes of the issue, one by one ---------------------------------------------------------

DIGITS = (REPO / "jobs" / "dit_digits.yaml").read_text()
DESCRIPTION = "description: class-conditional DiT on the 8x8 digits (CPU demo)"
PREPARE = (REPO / "jobs" / "prepare_text.yaml").read_text()


def _with(text: str, old: str, new: str) -> bytes:
    assert old in text
    return text.replace(old, new, 1).encode()


BOMB = DIGITS.replace(DESCRIPTION + "\n", "") + _bomb(9, 9)
TABLE = [
    ("binary", bytes(range(256)) * 8, (), "byte 128 (0x80) is not UTF-8"),
    ("latin-1", _with(DIGITS, "(CPU demo)", "(café)").decode().encode("latin-1"), (), "is not UTF-8"),
    ("utf-16", DIGITS.encode("utf-16"), (), "UTF-16 byte-order mark"),
    ("prepare latin-1", PREPARE.replace("kind:", "# é\nkind:").encode("latin-1"), (), "is not UTF-8"),
    ("NUL byte", _with(DIGITS, "name:", "name: \x00"), (), "#x0000"),
    ("escaped NUL", _with(DIGITS, "dit-digits", '"dit\\0digits"'), (), "holds U+0000"),
    ("lone surrogate", _with(DIGITS, DESCRIPTION, 'description: "\\ud800"'), (), "holds U+D800"),
    ("--set surrogate path", DIGITS.encode(), ('data.path="\\udc80"',), "holds U+DC80"),
    ("deep list", _with(DIGITS, DESCRIPTION, "description: " + "[" * 5000 + "]" * 5000), (), "more than 12 deep"),
    (
        "deep map",
        _with(DIGITS, DESCRIPTION, "description: " + "{a: " * 2000 + "1" + "}" * 2000),
        (),
        "more than 12 deep",
    ),
    ("alias bomb", BOMB.encode(), (), "aliases expand to more than 2000"),
    ("alias loop", _with(DIGITS, "description:", "description: &a [*a]\nx:"), (), "a loop"),
    (
        "too many values",
        _with(DIGITS, DESCRIPTION, "description: [" + "1, " * 3000 + "1]"),
        (),
        "more than 2000 values",
    ),
    ("too large", (DIGITS + "# " + "x" * 300_000 + "\n").encode(), (), "larger than 256 KiB"),
    ("100-digit steps", _with(DIGITS, "steps: 1500", "steps: " + "9" * 100), (), "larger than any spec field holds"),
    ("5000-digit seed", _with(DIGITS, "seed: 0", "seed: " + "9" * 5000), (), "larger than any spec field holds"),
    ("--set steps", DIGITS.encode(), ("train.steps=" + "9" * 100,), "larger than any spec field holds"),
    ("--set seed", DIGITS.encode(), ("train.seed=" + "9" * 100,), "larger than any spec field holds"),
    ("--set nesting", DIGITS.encode(), ("description=" + "[" * 3000,), "more than 12 deep"),
    ("--set key path", DIGITS.encode(), ("a" + ".a" * 100 + "=1",), "key path is more than 12 deep"),
    ("--set bomb", DIGITS.encode(), ("description=" + _flow_bomb(9, 9),), "2000"),
    ("steps 2**31", _with(DIGITS, "steps: 1500", "steps: 2147483648"), (), "train.steps: input should be less"),
    ("inf lr", _with(DIGITS, "1.0e-3", ".inf"), (), "train.learning_rate: input should be a finite number"),
    ("1e309 lr", _with(DIGITS, "1.0e-3", "1.0e309"), (), "train.learning_rate: input should be a finite number"),
    ("--set lr", DIGITS.encode(), ("train.lr=1e309",), "train.learning_rate: input should be a finite number"),
    ("beta 1", _with(DIGITS, "grad_clip:", "adam_betas: [0.9, 1.0]\n  grad_clip:"), (), "adam_betas.1: input should"),
    ("beta nan", _with(DIGITS, "grad_clip:", "adam_betas: [.nan, 0.9]\n  grad_clip:"), (), "adam_betas.0: input"),
    ("beta < 0", _with(DIGITS, "grad_clip:", "adam_betas: [-0.1, 0.9]\n  grad_clip:"), (), "adam_betas.0: input"),
    ("inf eps", _with(DIGITS, "grad_clip:", "adam_eps: .inf\n  grad_clip:"), (), "train.adam_eps: input should be a"),
    ("inf decay", _with(DIGITS, "grad_clip:", "weight_decay: .inf\n  grad_clip:"), (), "train.weight_decay: input"),
    ("inf guidance", _with(DIGITS, "guidance_scale: 1.5", "guidance_scale: .inf"), (), "eval.guidance_scale: input"),
    ("--set guidance", DIGITS.encode(), ("sample.guidance_scale=.inf",), "sample.guidance_scale: input should be a"),
    ("inf ema power", _with(DIGITS, "warmup_power: 0.75", "warmup_power: .inf"), (), "ema.warmup_power: input"),
    ("inf mlp_ratio", _with(DIGITS, "depth: 4", "depth: 4\n  mlp_ratio: .inf"), (), "model.mlp_ratio: input should"),
    ("no mlp unit", _with(DIGITS, "depth: 4", "depth: 4\n  mlp_ratio: 0.001"), (), "without a unit"),
    ("class -1", _with(DIGITS, "per_class: 8", "per_class: 8\n  classes: [3, -1]"), (), "sample.classes.1: input"),
    ("class 10", _with(DIGITS, "per_class: 8", "per_class: 8\n  classes: [10]"), (), "sample.classes 10 do(es) not"),
    ("seed -1", _with(DIGITS, "seed: 0", "seed: -1"), (), "train.seed: input should be greater than or equal to 0"),
    ("seed 2**32", _with(DIGITS, "seed: 0", "seed: 4294967296"), (), "train.seed: input should be less than or"),
    ("--set sample seed", DIGITS.encode(), ("sample.seed=4294967296",), "sample.seed: input should be less than"),
    ("prepare inf timeout", PREPARE.encode(), ("input.download_timeout=.inf",), "input.download_timeout: input"),
    ("prepare huge shard", PREPARE.encode(), ("output.shard_size=" + "9" * 30,), "larger than any spec field holds"),
]


@pytest.mark.parametrize("spec_bytes, overrides, message", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_each_class_of_hostile_input_is_one_clear_message_and_exit_2(tmp_path, spec_bytes, overrides, message):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(spec_bytes)
    args = ["--root", str(tmp_path / "runs"), "validate", str(spec), *(a for o in overrides for a in ("--set", o))]
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args, env=OFFLINE)
    seconds = time.perf_counter() - start
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("orch: error:") and len(result.output) < 2000
    assert seconds < 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_the_shipped_specs_and_real_uses_of_aliases_stay_valid():
    shared = _with(DIGITS, "every: 500\n  keep: 2", "every: &every 500\n  keep: 2")  # checkpoint.every
    shared = shared.decode().replace("  every: 500\n  sampler:", "  every: *every\n  sampler:")  # sample.every
    merged = shared.replace("ema:\n", "ema: &ema\n").replace("checkpoint:\n", "checkpoint:\n  <<: {}\n")
    for text in (shared, merged, *(REPO.joinpath("jobs", name).read_text() for name in SHIPPED)):
        assert run_validate(text.encode())[0] is None, text


# ---- the installed command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_bytes, overrides, message",
    [
        (DIGITS.encode("utf-16"), (), "UTF-16 byte-order mark"),
        (BOMB.encode(), (), "aliases expand to more than 2000"),
        (_with(DIGITS, DESCRIPTION, "description: " + "[" * 100_000), (), "more than 12 deep"),
        (DIGITS.encode(), ("train.seed=" + "9" * 5000,), "larger than any spec field holds"),
    ],
    ids=["utf-16", "alias bomb", "deep nesting", "--set 5000 digits"],
)
def test_the_real_orch_validate_exits_2_at_once(tmp_path, spec_bytes, overrides, message):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(spec_bytes)
    start = time.perf_counter()
    result = orch(
        "validate", str(spec), *(a for o in overrides for a in ("--set", o)), root=tmp_path / "runs", timeout=30
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 10  # the interpreter's start and imports; the refusal itself is in ms
    assert not (tmp_path / "runs").exists() and os.listdir(tmp_path) == ["spec.yaml"]


# ---- job ids and checkpoint paths -----------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_places(tmp_path_factory):
    """A job root with one job, a plain file, a checkpoint-looking folder whose spec.yaml is binary, an empty folder."""
    from orchestrator.jobs.directory import JobDir, new_job_id

    base = tmp_path_factory.mktemp("odd")
    JobDir.create(base / "runs", new_job_id("demo"), "demo", "name: demo\n", total_steps=10)
    (base / "a-file").write_text("x")
    (base / "binary").mkdir()
    (base / "binary" / "spec.yaml").write_bytes(bytes(range(128, 256)))
    (base / "binary" / "ema.safetensors").write_bytes(b"")
    (base / "empty").mkdir()
    return base


ODD_REFS = [
    ("status", "x" * 5000, "File name too long"),
    ("resume", "a/" * 3000, "File name too long"),
    ("cancel", "x" * 5000, "File name too long"),
    ("logs", "demo-" + "9" * 300, "File name too long"),
    ("join", "", "the job id is empty"),
    ("status", " ", "the job id is empty"),
    ("sample", "{base}/a-file", "is a file"),
    ("export", "{base}/binary", "is not a spec orch wrote"),
    ("eval", "{base}/binary", "is not a spec orch wrote"),
    ("sample", "{base}/empty", "is neither a job directory"),
    ("export", "x" * 5000, "File name too long"),
    ("eval", "demo", "has no complete checkpoint"),
]


@pytest.mark.parametrize("command, ref, message", ODD_REFS, ids=[f"{c}-{m[:12]}" for c, _, m in ODD_REFS])
def test_odd_job_ids_and_checkpoint_paths_are_one_message_and_exit_2(odd_places, command, ref, message):
    ref = ref.format(base=odd_places)
    extra = {"sample": ["--out", str(odd_places / "out")], "export": ["--out", str(odd_places / "out")]}
    extra["join"] = ["--node-rank", "1"]
    args = ["--root", str(odd_places / "runs"), command, ref, *extra.get(command, [])]
    result = CliRunner().invoke(cli, args, env=OFFLINE)
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert message in result.output and result.output.startswith("orch: error:") and len(result.output) < 1000


# ---- orch prepare's inputs (corrupt and truncated images, a .tar that is not one: tests/integration/test_prepare.py)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("labels.jsonl", '{"url": "a.png", "label": 3}\n{"url": "b.png", "label": -1}\n', "row 2 has label -1"),
        ("huge.jsonl", '{"url": "a.png", "label": ' + "9" * 40 + "}\n", "row 1 has label 9999"),
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "cannot read table"),
        ("latin1.csv", "url,caption\na.png,caf\xe9\n", "cannot read table"),
        ("rows.jsonl", "[1, 2]\n", "line 1 is not a JSON object"),
    ],
    ids=["negative label", "huge label", "deep JSON", "latin-1 csv", "rows not objects"],
)
def test_a_table_that_cannot_be_read_or_labels_no_class_is_a_prepare_error(tmp_path, name, text, message):
    from orchestrator.prepare import PrepareError, _scan_table
    from orchestrator.specs.prepare import InputSpec

    table = tmp_path / name
    table.write_bytes(text.encode("latin-1" if name.startswith("latin1") else "utf-8"))
    with pytest.raises(PrepareError, match=re.escape(message)):
        _scan_table(InputSpec(source="table", path=str(table)), table)
