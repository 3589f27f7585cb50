"""The ``looplm`` entry point: a subcommand whose module does not import fails loudly."""

from __future__ import annotations

import pytest

from looplm import cli


def test_a_subcommand_module_that_does_not_import_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "broken", ("looplm.no_such_module", "a subcommand of a broken install"))
    with pytest.raises(ModuleNotFoundError, match="looplm.no_such_module"):
        cli.main(["broken"])
    monkeypatch.setitem(cli.BENCHES, "broken", ("looplm.no_such_bench", "a bench of a broken install"))
    with pytest.raises(ModuleNotFoundError, match="looplm.no_such_bench"):
        cli.main(["bench", "broken"])


def test_no_command_prints_help(capsys: pytest.CaptureFixture) -> None:
    assert cli.main([]) == 0
    assert "usage: looplm" in capsys.readouterr().out
