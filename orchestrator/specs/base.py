"""What every spec of orch shares: the typed section base, YAML with line numbers, --set overrides, and
validation whose every problem is one line naming where it is (a line or a --set) and what would fix it.

specs/job.py (the job spec) and specs/prepare.py (the prepare spec) are built on it. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.errors import UserError


class SpecError(UserError):
    """A spec the user must fix; the message says where and how."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


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


def load_yaml_with_lines(
    text: str, source: str, empty_hint: str = "it needs its sections"
) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Parse YAML safely (no duplicate keys); return the data and the line of every mapping key, by key path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}:{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
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
    """`KEY.PATH=VALUE` of a --set: the key path (short names rewritten by `aliases`) and the YAML value."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. --set train.learning_rate=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    path = tuple(key.strip().split("."))
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
    return f"{where}{message[0].lower() + message[1:]}, got {error['input']!r}"


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
