"""The `jaxgpt` command line: subcommands live one concern per module and register here.

Every user error (bad file, bad option, unknown character, ...) ends as one line
`jaxgpt: error: ...` on stderr and exit status 1 (2 for a usage error); no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click


@click.group(name="jaxgpt", no_args_is_help=True)
def app() -> None:
    """Run, convert, train and check the notebook's character-level GPT in JAX."""

# The command modules. Each has a `register(app)` function that adds its commands to `app`;
# a new module is one more line here (alphabetical).
COMMAND_MODULES = (
    "jaxgpt.cli_attention",
    "jaxgpt.cli_generate",
    "jaxgpt.cli_parity",
    "jaxgpt.cli_porting",
    "jaxgpt.cli_score",
    "jaxgpt.cli_serve",
    "jaxgpt.cli_train",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


class CLIError(click.ClickException):
    """Raise to end a command with one `jaxgpt: error: ...` line and exit status 1."""


# ----------------------------------------------------------------------------- shared by commands
def default_weights() -> str:
    """`jaxgpt.DEFAULT_WEIGHTS`, the bundled checkpoint used when no --weights is given."""
    import jaxgpt

    path = getattr(jaxgpt, "DEFAULT_WEIGHTS", None)
    if path is None or not os.path.exists(path):
        raise CLIError("no --weights given and the bundled default checkpoint is not installed: pass --weights PATH")
    return str(path)


def vocab_beside(weights_path: str) -> str | None:
    """`vocab.json` in the directory of a checkpoint written by `jaxgpt train`, if there is one."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "vocab.json")
    return candidate if os.path.isfile(candidate) else None


def load_vocab(vocab_path: str | None, weights_path: str | None):
    """(Vocab, description): --vocab, else vocab.json beside the weights, else the published map."""
    from jaxgpt.vocab import Vocab, VocabError, default_vocab

    source = vocab_path or (vocab_beside(weights_path) if weights_path else None)
    try:
        if source is None:
            return default_vocab(), "the published 104-character map"
        return Vocab.load(source), source
    except VocabError as e:
        raise CLIError(f"--vocab: {e}" if vocab_path else str(e)) from None


def load_model(weights_path: str | None, vocab_path: str | None):
    """(model, weights path, Vocab, vocab description): --weights and --vocab of any command.

    --weights defaults to the bundled checkpoint; a `jaxgpt train` --out directory means the
    weights in it. The vocabulary is `load_vocab`'s, and must have the model's vocab_size.
    """
    from porting import load_weights

    path = weights_path if weights_path is not None else default_weights()
    for name in ("weights.pt", "weights.safetensors"):  # a `jaxgpt train` output directory
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, name)):
            path = os.path.join(path, name)
            break
    vocab, vocab_source = load_vocab(vocab_path, path)
    model = load_weights(path)
    if vocab.size != model.config.vocab_size:
        raise CLIError(f"{vocab_source} has {vocab.size} characters but {path} has vocab_size "
                       f"{model.config.vocab_size}: pass the checkpoint's vocabulary with --vocab")
    return model, path, vocab, vocab_source


def main(argv: list[str] | None = None) -> int:
    from jaxgpt.host_memory import reuse_host_memory

    # Before any JAX work: XLA:CPU's per-call scratch buffer is then reused, not page-faulted
    # afresh on every training step (a no-op when JAX already runs, e.g. in the tests).
    reuse_host_memory()
    _register_all()
    try:
        result = app.main(args=argv, prog_name="jaxgpt", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 2
    except click.ClickException as e:  # usage errors (exit 2) and CLIError (exit 1)
        print(f"jaxgpt: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Abort:
        print("jaxgpt: error: aborted", file=sys.stderr)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except (ValueError, OSError) as e:
        # The API raises precise ValueError subclasses (CheckpointError, VocabError, DataError...)
        # whose message already names the file and the problem.
        print(f"jaxgpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxgpt: error: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
