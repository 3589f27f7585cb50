"""References in the code and docs lead somewhere inside the repository.

Paths such as ``looplm/layers/layer_step.py`` or ``docs/mechanisms.md`` named in a source file,
a C++ kernel or a document exist; sections cited as ``docs/mechanisms.md §N`` are headings
there; code and tests cite no issue numbers (they mean nothing to a reader of the code).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [*ROOT.glob("looplm/**/*.py"), *ROOT.glob("looplm/**/*.cpp"), *ROOT.glob("looplm/**/*.h"),
        *ROOT.glob("tests/**/*.py"), *ROOT.glob("scripts/*")]
CODE = [f for f in CODE if f != Path(__file__).resolve()]  # this file quotes bad references
TEXTS = [*CODE, *ROOT.glob("docs/*.md"), ROOT / "README.md"]
PATH = re.compile(r"(?<![\w/.])((?:looplm|docs|tests|scripts)/[\w/.-]*\w)")
SECTION = re.compile(r"docs/mechanisms\.md §(\d+(?:\.\d+)?)")
ISSUE = re.compile(r"\b[Ii]ssue \d+\b|\bissue #\d+")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_named_paths_exist() -> None:
    # files a benchmark writes (its figures) exist once it has run: named by a looplm/bench module
    outputs = {m for f in ROOT.glob("looplm/bench/*.py") for m in PATH.findall(f.read_text())
               if m.startswith("docs/figures/")}
    missing = [f"{_rel(f)} names {m}" for f in TEXTS if f.is_file() for m in PATH.findall(f.read_text())
               if "NAME" not in m and m not in outputs and not (ROOT / m).exists()]
    assert not missing, "\n".join(missing)


def test_no_reference_outside_the_repository() -> None:
    outside = [_rel(f) for f in TEXTS if f.is_file()
               if re.search(r"\bMECHANISMS\.md|\.\./shared/|shared/ARCHITECTURE", f.read_text())]
    assert not outside, f"these cite files outside the repository: {outside}"


def test_cited_mechanism_sections_exist() -> None:
    doc = (ROOT / "docs" / "mechanisms.md").read_text()
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", doc, flags=re.M))
    cited = {(s, _rel(f)) for f in TEXTS if f.is_file() for s in SECTION.findall(f.read_text())}
    assert cited, "no docstring cites docs/mechanisms.md"
    assert not [c for c in cited if c[0] not in headings], sorted(c for c in cited if c[0] not in headings)


def test_no_issue_numbers_in_code() -> None:
    found = [f"{_rel(f)}: {m}" for f in CODE if f.is_file() for m in ISSUE.findall(f.read_text())]
    assert not found, "\n".join(found)


def test_patterns_match_what_they_should() -> None:
    assert PATH.findall("see looplm/ops/nowhere.py for why") == ["looplm/ops/nowhere.py"]
    assert SECTION.findall("(docs/mechanisms.md §1.2)") == ["1.2"]
    assert ISSUE.findall("a quantised checkpoint (issue 6)") == ["issue 6"]


def test_the_map_names_every_module() -> None:
    """docs/architecture.md names each source file of the package (by its file name)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    sources = [*ROOT.glob("looplm/**/*.py"), *ROOT.glob("looplm/**/*.cpp"), *ROOT.glob("looplm/**/*.h")]
    missing = [_rel(f) for f in sources if f.name != "__init__.py" and f.name not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"
