"""What every spec of orch shares: the typed section base, YAML with line numbers, --set overrides, and
validation whose every problem is one line naming where it is (a line or a --set) and what would fix it.

specs/job.py (the job spec) and specs/prepare.py (the prepare spec) are built on it. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import UserError


class SpecError(UserError):
    """A spec the user must fix; the message says where and how."""


class _NotYaml(SpecError):
    """Text that is not YAML (a --set value is then taken as plain text)."""


class Section(BaseModel):
    """A typed section of a spec: unknown keys refused, frozen once read, and no float infinite or NaN (YAML's `.inf`,
    `.nan` and overflowing literals such as `1e309`): no field of orch trains with one."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


# The ranges every numeric field states (in `orch schema` and the spec reference): far beyond any real job, below what
# the code that uses the value can hold.
MAX_COUNT = 2**31 - 1
"""Steps, images, samples, buckets: a 32-bit count."""
MAX_SEED = 2**32 - 1
"""Seeds: 0 to 2**32 - 1, what numpy and torch both accept (torch alone takes up to 2**64 - 1)."""
MAX_TIMESTEPS = 1_000_000
"""Noise levels and denoising steps."""
MAX_RESOLUTION = 16384
"""Image side in pixels (and patch side)."""
MAX_WIDTH = 65536
"""Network widths (hidden size, channels, embedding width)."""
MAX_CLASSES = 1_000_000
"""Classes of a class-conditional model (ImageNet-21k has 21,841)."""
MAX_PROCESSES = 4096
"""Ranks, threads, workers or CPUs on one node."""
MAX_NODES = 65536
"""Nodes of one job."""
MAX_TIMEOUT_S = 30 * 24 * 3600
"""Timeouts, in seconds: at most 30 days."""
Beta = Annotated[float, Field(ge=0, lt=1)]
"""An Adam beta: 0 <= beta < 1 (what torch's AdamW accepts)."""
Channels = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
"""A channel count."""


HUB_FIELDS = ("config", "split", "revision", "image_column")
CROPS = ("center_crop", "resize")


class HubDatasetFields(Section):
    """The fields of a Hugging Face `datasets` source (`source: hf_dataset`), shared by the prepare and job specs."""

    config: str | None = None
    """hf_dataset: the dataset's configuration (subset) name, where it has several."""
    split: str = "train"
    """hf_dataset: the split to read."""
    revision: str | None = None
    """hf_dataset: a Hub branch, tag or commit, to pin the data a job was trained on."""
    image_column: str = "image"
    """hf_dataset: the column of images (a datasets Image feature)."""

    def hub_fields_misplaced(self, source: str) -> list[str]:
        """The hf_dataset fields given other than their defaults (compared by value: a job's saved spec holds them
        all) while the source is another."""
        fields = type(self).model_fields
        return [f for f in HUB_FIELDS if getattr(self, f) != fields[f].default and source != "hf_dataset"]


# What a spec reader accepts before it looks at the fields: bounds far above any real spec (the shipped ones are under
# 4 KiB, about 150 values and 5 levels deep), well below what would take it more than a fraction of a second.
MAX_SPEC_BYTES = 256 * 1024
"""A spec file (or a --set value) larger than this is refused unread."""
MAX_NESTING = 12
"""Mappings and lists nested deeper than this are refused (the deepest field, model.unet.down_channels, is 4 down)."""
MAX_VALUES = 2000
"""A spec whose values, keys and sections number more than this once every alias is expanded is refused: an alias
"bomb" of a few hundred bytes can otherwise expand to billions."""
MAX_INTEGER = 2**64 - 1
"""No integer a spec field holds is larger (seeds, steps and sizes have tighter bounds of their own)."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses, while composing, nesting deeper than MAX_NESTING and more than MAX_VALUES
    nodes, and while constructing, integers beyond MAX_INTEGER and strings with a NUL or a lone surrogate (escapes a
    double-quoted string allows, which no path or UTF-8 file takes); Python would otherwise spend its time on them or
    raise outside YAMLError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nesting = 0
        self.nodes = 0

    def compose_node(self, parent, index):
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        mark = self.peek_event().start_mark
        self.nodes += 1
        if self.nodes > MAX_VALUES:
            raise _Refused(mark, f"holds more than {MAX_VALUES} values and keys (a job spec has about 150)")
        if collection:
            self.nesting += 1
            if self.nesting > MAX_NESTING:
                raise _Refused(
                    mark, f"nests mappings or lists more than {MAX_NESTING} deep (a spec field is at most 4 down)"
                )
        try:
            return super().compose_node(parent, index)
        finally:
            self.nesting -= collection

    def construct_yaml_int(self, node):
        text = str(node.value).replace("_", "")
        digits = sum(ch.isalnum() for ch in text)
        try:
            value = None if digits > 40 else super().construct_yaml_int(node)
        except ValueError:
            value = None
        if value is None or abs(value) > MAX_INTEGER:
            shown = text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"
            raise _Refused(node.start_mark, f"integer {shown} is larger than any spec field holds (at most 2**64 - 1)")
        return value

    def construct_yaml_str(self, node):
        value = super().construct_yaml_str(node)
        bad = re.search("[\x00\ud800-\udfff]", value)
        if bad:
            raise _Refused(
                node.start_mark,
                f"the text {_shown(value, 40)} holds U+{ord(bad.group()):04X}, which no path, name or log line can "
                "hold (an escape such as \\0 or \\ud800 in a double-quoted string)",
            )
        return value


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)
_SpecLoader.add_constructor("tag:yaml.org,2002:str", _SpecLoader.construct_yaml_str)


class _Refused(yaml.YAMLError):
    """Input a spec reader refuses before validating it: too deep, too many values, an integer too large, a string
    that cannot be text."""

    def __init__(self, mark: yaml.Mark | None, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


def _expanded(node: yaml.Node, source: str) -> None:
    """Refuse a node graph whose aliases expand beyond MAX_VALUES nodes or MAX_NESTING levels, or refer to a node that
    holds them (a loop); counted without expanding anything (each node once, memoised)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, nesting) once expanded
    active: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SpecError(
                f"{source}: line {node.start_mark.line + 1}: an alias refers to a mapping or list that contains it "
                "(a loop); a spec is a tree"
            )
        if not isinstance(node, yaml.CollectionNode):
            return 1, 0
        active.add(key)
        children = (
            [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else node.value
        )
        count, depth = 1, 0
        for child in children:
            child_count, child_depth = measure(child)
            count, depth = count + child_count, max(depth, child_depth)
            if count > MAX_VALUES:
                raise SpecError(
                    f"{source}: line {node.start_mark.line + 1}: its aliases expand to more than {MAX_VALUES} values "
                    "and keys (a job spec has about 150); write the values out, or use fewer aliases"
                )
        active.discard(key)
        sizes[key] = count, depth + 1
        if depth + 1 > MAX_NESTING:
            raise SpecError(
                f"{source}: line {node.start_mark.line + 1}: its aliases nest mappings or lists more than "
                f"{MAX_NESTING} deep (a spec field is at most 4 down)"
            )
        return sizes[key]

    measure(node)


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file: UTF-8 (a byte-order mark allowed), at most MAX_SPEC_BYTES; SpecError naming the byte
    that is not UTF-8 otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read spec {path}: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a short YAML text file")
    return decode_spec_text(data, str(path))


def decode_spec_text(data: bytes, source: str) -> str:
    """UTF-8 bytes as text; SpecError naming the first byte that is not UTF-8 (and a UTF-16 byte-order mark)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = (
            "it starts with a UTF-16 byte-order mark: save it as UTF-8"
            if utf16
            else "save it as UTF-8 (an editor's 'encoding' setting), or check that it is a spec at all"
        )
        raise SpecError(
            f"{source}: byte {err.start} (0x{data[err.start]:02x}) is not UTF-8; a spec is UTF-8 text: {hint}"
        ) from None


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The node graph and the data of one YAML document, within the reader's bounds; SpecError otherwise."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a short YAML text")
    loader = None
    try:
        loader = _SpecLoader(text)  # its reader checks the first characters already
        root = loader.get_single_node()
        if root is None:
            return None, None
        _expanded(root, source)
        return root, loader.construct_document(root)
    except yaml.reader.ReaderError as err:
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        raise SpecError(
            f"{source}: character {char} at position {err.position} is not allowed in YAML ({err.reason})"
        ) from None
    except _Refused as err:
        where = "" if source.startswith("--set") else f" line {err.problem_mark.line + 1}:"
        raise SpecError(f"{source}:{where} {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise _NotYaml(f"{source}:{where} is not valid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML the way every spec reader does (safe, bounded); SpecError if it is not YAML or out of bounds."""
    return _compose(text, source)[1]


def load_yaml_with_lines(
    text: str, source: str, empty_hint: str = "it needs its sections"
) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Parse YAML safely (no duplicate keys; bounded in size, nesting, aliases and integers: see MAX_*); return the
    data and the line of every mapping key, by key path."""
    root, data = _compose(text, source)
    if data is None:
        raise SpecError(f"{source}: the spec is empty; {empty_hint}")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping of sections, not a {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise SpecError(
                    f"{source}: line {key_node.start_mark.line + 1}: key {'.'.join(prefix + (key,))} appears twice"
                )
            seen.add(key)
            lines[prefix + (key,)] = key_node.start_mark.line + 1
            walk(value_node, prefix + (key,))

    walk(root, ())
    return data, lines


def parse_override(override: str, aliases: dict[tuple[str, str], str] | None = None) -> tuple[tuple[str, ...], Any]:
    """`KEY.PATH=VALUE` of a --set: the key path (short names rewritten by `aliases`) and the YAML value (read within
    the bounds of a spec file; text that is not YAML stays text)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. --set train.learning_rate=3e-4")
    shown = override if len(override) <= 80 else override[:60] + "..."
    try:
        value = _compose(text, f"--set {shown}")[1] if text.strip() else None
    except _NotYaml:
        value = text
    path = tuple(key.strip().split("."))
    if len(path) > MAX_NESTING:
        raise SpecError(f"--set {shown}: the key path is more than {MAX_NESTING} deep (a spec field is at most 4 down)")
    section, *rest = path
    if rest and (section, rest[0]) in (aliases or {}):
        path = (section, aliases[(section, rest[0])], *rest[1:])
    return path, value


def set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any, origin: str) -> None:
    node = raw
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {origin}: {'.'.join(path[: depth + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def validate_tree(root: type[BaseModel], raw: dict[str, Any], source: str, origins: dict[tuple[str, ...], str]):
    """root.model_validate(raw), every problem turned into one line of a SpecError (origin, path, what is wrong, the
    near miss)."""
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        problems = sorted((_describe(root, error, origins) for error in err.errors()), key=_line_number)
    noun = "problem" if len(problems) == 1 else "problems"
    raise SpecError(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  {p}" for p in problems))


def _describe(root: type[BaseModel], error: dict[str, Any], origins: dict[tuple[str, ...], str]) -> str:
    """One line per problem: where (line or --set), the dotted path, what is wrong, what is allowed."""
    loc = tuple(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    loc = tuple(part for part in loc if part not in ("literal['dit']",))
    dotted = ".".join(loc)
    where = _origin(loc, origins) + (f"{dotted}: " if dotted else "")
    kind = error["type"]
    if kind == "extra_forbidden":
        section_cls = _section_class(root, loc[:-1])
        valid = list(section_cls.model_fields) if section_cls else []
        hint = did_you_mean(loc[-1], valid)
        return f"{where}unknown key{hint} (valid: {', '.join(valid)})"
    if kind == "missing":
        return f"{where}required, missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error") or "input" not in error:
        return f"{where}{message}"
    return f"{where}{message[0].lower() + message[1:]}, got {_shown(error['input'])}"


def _shown(value: Any, limit: int = 100) -> str:
    """A value as a message quotes it: its repr, cut in the middle when long (a whole section, a long string)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 30]}...{text[-20:]} ({len(text)} characters)"


def _line_number(problem: str) -> int:
    match = re.match(r"line (\d+):", problem)
    return int(match.group(1)) if match else 0


def _origin(loc: tuple[str, ...], origins: dict[tuple[str, ...], str]) -> str:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in origins:
            return f"{origins[loc[:cut]]}: "
    return ""


def _section_class(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    cls = root
    for part in loc:
        field = cls.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
