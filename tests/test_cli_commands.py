"""Mounting the CLI's commands: a missing or broken command module is an error that surfaces; a
command whose documented extra is not installed answers in one line naming the extra."""

from __future__ import annotations

import sys

import pytest

from gptedge.runtime import cli


def test_a_missing_command_module_is_not_skipped(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("ghost", "gptedge.runtime.cli.ghost_cmd", None)])
    with pytest.raises(ModuleNotFoundError, match="gptedge.runtime.cli.ghost_cmd"):
        cli.main(["inspect", "--help"])


def test_a_broken_command_module_raises_its_import_error(monkeypatch, tmp_path):
    (tmp_path / "broken_cmd.py").write_text("from gptedge.runtime import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("broken", "broken_cmd", "export")])
    with pytest.raises(ImportError, match="no_such_name"):
        cli.build_parser()


def test_a_command_without_its_extra_names_the_extra(monkeypatch, tmp_path, capsys):
    (tmp_path / "needs_torch_cmd.py").write_text("import torch\n\n\ndef register(subparsers):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as on a runtime-only install
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("train", "needs_torch_cmd", "export")])
    assert cli.main(["train", "data.txt", "-o", "out"]) == cli.MISSING_EXTRA_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'torch'" in err and "pip install 'gptedge[export]'" in err
    with pytest.raises(ModuleNotFoundError, match="torch"):
        cli.main(["--debug", "train"])
    parser = cli.build_parser()  # the other commands still mount and parse
    assert parser.parse_args(["inspect", "bundle"]).command == "inspect"
    assert "gptedge[export]" in parser.format_help()
