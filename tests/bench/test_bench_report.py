"""`looplm bench report`: generated sections replace themselves, hand-written text survives."""

import json

import pytest

from looplm.bench.report import flatten, update
from looplm.cli import main


def write(results, name, data, png=True):
    d = results / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(data))
    if png:
        (d / f"{name}.png").write_bytes(b"\x89PNG fake")


def test_report_renders_tables_figures_and_keeps_other_text(tmp_path):
    results, doc = tmp_path / "res", tmp_path / "docs" / "results.md"
    table = "| x |\n|---|\n| 1 |"
    write(results, "mqar", {"settings": {"a": 1}, "table": table, "command": "looplm bench mqar"})
    write(results, "ops", {"checks": {"speed": {"ratio": 2.5}}, "rows": [1, 2]}, png=False)
    write(results, "quant", {"rows": []}, png=False)
    (results / "quant" / "quant.md").write_text("| from the quant bench |\n|---|\n")
    doc.parent.mkdir()
    doc.write_text("# results\n\nIntro by someone else.\n")
    assert main(["bench", "report", "--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "Intro by someone else." in text
    assert "`looplm bench mqar`" in text and "| 1 |" in text
    assert "![mqar mqar](figures/mqar-mqar.png)" in text
    assert (doc.parent / "figures" / "mqar-mqar.png").exists()
    assert "| checks.speed.ratio | 2.5 |" in text  # generic rendering of another bench
    assert "| from the quant bench |" in text  # a bench's own markdown next to its JSON
    assert text.index("<!-- looplm-bench:mqar -->") < text.index("<!-- looplm-bench:ops -->")

    # a reading written under the section survives a regeneration; the section is replaced, not duplicated
    doc.write_text(text.replace("<!-- /looplm-bench:mqar -->", "<!-- /looplm-bench:mqar -->\n\nMy reading."))
    write(results, "mqar", {"table": "| y |\n|---|\n| 2 |"})
    assert main(["bench", "report", "--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "My reading." in text and "| 2 |" in text and "| 1 |" not in text
    assert text.count("<!-- looplm-bench:mqar -->") == 1


def test_no_results_is_a_one_line_error(tmp_path, capsys):
    args = ["bench", "report", "--results", str(tmp_path / "none"), "--doc", str(tmp_path / "r.md")]
    assert main(args) == 2
    assert "run `looplm bench" in capsys.readouterr().err


def test_update_appends_then_replaces():
    doc = update("# r\n", "lm", "one")
    assert "## Compute-matched language modelling" in doc and "one" in doc
    assert update(doc, "lm", "two").count("two") == 1 and "one" not in update(doc, "lm", "two")


@pytest.mark.parametrize("data, expected", [
    ({"a": {"b": 1}}, [("a.b", 1)]),
    ({"l": [1, 2.5]}, [("l", "1, 2.5")]),
    ({"l": [{"x": 1}]}, [("l[0].x", 1)]),
])
def test_flatten(data, expected):
    assert flatten(data) == expected
