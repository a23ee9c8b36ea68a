"""The `jaxgpt` command group: every command module registers, none is skipped silently."""

import pytest

from jaxgpt import cli


def test_help_lists_the_commands_of_every_module(capsys):
    assert cli.main([]) == 2
    listed = capsys.readouterr().err
    for command in ("generate", "inspect", "convert", "train", "eval"):
        assert f"  {command} " in listed, command


def test_a_missing_command_module_is_an_error_not_skipped(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "jaxgpt.cli_not_there"))
    with pytest.raises(ModuleNotFoundError, match="jaxgpt.cli_not_there"):
        cli.main(["--help"])
