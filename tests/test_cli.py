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


def test_load_model_reads_a_train_directory_and_checks_the_vocabulary(tmp_path):
    from flax import nnx

    import porting
    from jaxgpt import GPT, GPTConfig, Vocab, default_vocab

    model = GPT(GPTConfig(vocab_size=5, context_length=8, model_dim=12, num_blocks=1, num_heads=2), rngs=nnx.Rngs(0))
    porting.save_flax(model, tmp_path / "weights.safetensors")
    Vocab(tuple("\nabcd")).save(tmp_path / "vocab.json")
    loaded, path, vocab, source = cli.load_model(str(tmp_path), None)
    assert path == str(tmp_path / "weights.safetensors") and source == str(tmp_path / "vocab.json")
    assert vocab.chars == tuple("\nabcd") and loaded.config == model.config
    default_vocab().save(tmp_path / "published.json")
    with pytest.raises(cli.CLIError, match="published.json has 104 characters but .* has vocab_size 5"):
        cli.load_model(str(tmp_path), str(tmp_path / "published.json"))
