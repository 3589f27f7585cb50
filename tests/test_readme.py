"""The README documents every subcommand with an example and every benchmark by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from looplm.cli import BENCHES, COMMANDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_an_example(command: str) -> None:
    pattern = rf"(^|\| *)looplm {command}\b"  # a command line, or the end of a pipe
    assert re.search(pattern, EXAMPLES, flags=re.M), f"no `looplm {command} ...` example"


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_every_benchmark_is_named(bench: str) -> None:
    named = re.findall(r"looplm bench ([\w|]+)", README)
    assert any(bench in n.split("|") for n in named), f"`looplm bench {bench}` is not in the README"


@pytest.mark.parametrize("flag", ["--qat", "--state-format", "--format", "--group-size", "--resume", "--set"])
def test_flags_the_readme_must_explain(flag: str) -> None:
    assert flag in README
