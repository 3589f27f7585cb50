"""The README documents every subcommand with an example and every benchmark by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from looplm.cli import BENCHES, COMMANDS
from looplm.layers.mixers import MIXERS

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


CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "looplm" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_is_named(config: str) -> None:
    assert f"`{config}`" in README, f"looplm/configs/{config}.yaml is not named in the README"


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_every_registered_mixer_is_in_the_config_table(mixer: str) -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `mixer` |"))
    assert f"`{mixer}`" in row, f"mixer {mixer!r} is missing from the README's `mixer` row"
