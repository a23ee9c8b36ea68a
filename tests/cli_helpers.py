"""Shared by the CLI tests: a small random-weight checkpoint and one command run in-process."""

from __future__ import annotations

import pytest
from flax import nnx

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT
from porting import save_flax

# The published vocabulary at a small size: the window (C = 16) slides within a few dozen characters.
CONFIG = GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)


def small_checkpoint(tmp_path_factory: pytest.TempPathFactory, name: str, seed: int) -> str:
    """A safetensors checkpoint of a `CONFIG` GPT initialised from `seed`; its path."""
    path = tmp_path_factory.mktemp(name) / "small.safetensors"
    save_flax(GPT(CONFIG, rngs=nnx.Rngs(seed)), path)
    return str(path)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`jaxgpt ARGV...` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
