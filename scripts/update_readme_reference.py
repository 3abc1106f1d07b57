"""Rewrite the README's spec reference (between the spec-reference markers) from the spec's own docstrings."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.specs.job import reference_markdown  # noqa: E402

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start, end = "<!-- spec-reference:start -->\n", "<!-- spec-reference:end -->"
updated = re.sub(
    re.escape(start) + r".*?" + re.escape(end), lambda _: start + reference_markdown() + end, text, flags=re.S
)
readme.write_text(updated)
print("README spec reference", "updated" if updated != text else "already current")
