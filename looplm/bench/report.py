"""``looplm bench report``: write the saved bench results into docs/results.md.

Every ``<results>/<bench>/*.json`` becomes one generated section of the document, between the markers
``<!-- looplm-bench:NAME -->`` and ``<!-- /looplm-bench:NAME -->``: the command that produced it, its
table, and its PNGs (copied to ``docs/figures/<bench>-<file>.png``). A section already in the document
is replaced in place, a new one is appended under its own heading; text outside the markers (the
hand-written reading of a result, other people's sections) is never touched.

Tables: the ``table`` (markdown) a bench stored in its JSON; else the markdown file of the same name
next to it (``quant.md`` beside ``quant.json``); else ``looplm.bench.<name>.render(data)`` if that
module provides it; else a generic key/value table of the JSON's scalar leaves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from looplm.bench.runner import markdown_table
from looplm.errors import DataError

TITLES = {
    "mqar": "Multi-query associative recall (MQAR)",
    "mqar_long": "MQAR, longer training (1500 steps)",
    "lm": "Compute-matched language modelling",
    "lm_3x": "Compute-matched language modelling, 3× the budget",
    "decode": "Decoding cost against context length",
}
HEADER = ("# looplm results\n\nTables and figures produced by `looplm bench ...`; "
          "regenerate with `looplm bench report`.\n")
MAX_ROWS = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="bench_results", help="directory of saved bench results")
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--figures", default=None, help="where PNGs are copied (default: <doc dir>/figures)")


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested dicts/lists as ``(dotted.key, value)``; short lists of scalars kept whole."""
    if isinstance(data, dict):
        return [kv for k, v in data.items() for kv in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, list):
        if len(data) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in data):
            return [(prefix, ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in data))]
        return [kv for i, v in enumerate(data) for kv in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, data)]


def render_table(name: str, data: dict[str, Any], markdown: Path | None = None) -> str:
    """The markdown table of one result file (see the module docstring for the order of choices)."""
    if isinstance(data.get("table"), str):
        return data["table"]
    if markdown is not None and markdown.is_file():
        return markdown.read_text().strip()
    try:
        render = getattr(importlib.import_module(f"looplm.bench.{name}"), "render", None)
    except ImportError:
        render = None
    if callable(render):
        return str(render(data))
    rows = [[k, v] for k, v in flatten({k: v for k, v in data.items() if k != "settings"})]
    more = f"\n\n({len(rows) - MAX_ROWS} more values in the JSON)" if len(rows) > MAX_ROWS else ""
    return markdown_table(["key", "value"], rows[:MAX_ROWS]) + more


def section(name: str, directory: Path, figures: Path, doc_dir: Path) -> str:
    """The generated markdown of one bench directory (all its JSON files and PNGs)."""
    parts = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            parts.append(f"`{path}`: unreadable ({exc})")
            continue
        if not isinstance(data, dict):
            continue
        if data.get("command"):
            parts.append(f"Command: `{data['command']}`")
        if data.get("settings"):
            parts.append("Settings: `" + json.dumps(data["settings"], separators=(", ", ": ")) + "`")
        parts.append(render_table(name, data, path.with_suffix(".md")))
    for png in sorted(directory.glob("*.png")):
        target = figures / f"{name}-{png.name}"
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        rel = Path(os.path.relpath(target, doc_dir)).as_posix()
        parts.append(f"![{name} {png.stem}]({rel})")
    return "\n\n".join(parts)


def update(doc: str, name: str, body: str) -> str:
    """Replace the generated section ``name`` in ``doc`` (or append it under a heading)."""
    start, end = f"<!-- looplm-bench:{name} -->", f"<!-- /looplm-bench:{name} -->"
    new = f"{start}\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: new, doc, count=1)
    title = TITLES.get(name, f"bench {name}")
    return doc.rstrip("\n") + f"\n\n## {title}\n\n{new}\n"


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    doc_path = Path(args.doc)
    figures = Path(args.figures) if args.figures else doc_path.parent / "figures"
    found = [d for d in results.iterdir() if d.is_dir() and any(d.glob("*.json"))] if results.is_dir() else []
    order = list(TITLES)  # the research benches first, then the others by name
    dirs = sorted(found, key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    if not dirs:
        raise DataError(f"no bench results (*.json) under {results}/: run `looplm bench ...` first")
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc = doc_path.read_text() if doc_path.exists() else HEADER
    for d in dirs:
        doc = update(doc, d.name, section(d.name, d, figures, doc_path.parent))
    doc_path.write_text(doc.rstrip("\n") + "\n")
    print(f"wrote {doc_path} ({', '.join(d.name for d in dirs)})")
    return 0
