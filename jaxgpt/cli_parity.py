"""`jaxgpt parity`: per-layer differences between jaxgpt and the torch reference (porting/parity.py)."""

from __future__ import annotations

import json

import click

from jaxgpt.cli import CLIError, load_vocab


def _fmt(x: float) -> str:
    return f"{x:.2e}"


@click.command("parity")
@click.argument("weights")
@click.option("--text", "text_path", metavar="FILE",
              help="Held-out text whose windows are compared (default: seeded random tokens).")
@click.option("--vocab", "vocab_path", metavar="JSON", help="Vocabulary of the text (default: vocab.json beside "
              "WEIGHTS, else the published 104-character map).")
@click.option("--batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Windows of context_length tokens.")
@click.option("--float64", "float64", is_flag=True, help="Run both frameworks in float64 (JAX x64): every layer "
              "must then agree to 1e-12, which shows they compute the same function.")
@click.option("--tolerance", type=float, default=None, help="Largest max-abs difference allowed in any layer "
              "(default 5e-5, with --float64 1e-12).")
@click.option("--tokens", "num_new", type=click.IntRange(0, 100_000), default=1000, show_default=True,
              help="Tokens generated for the greedy and sampled agreement (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed of the sampled agreement.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def parity_command(weights, text_path, vocab_path, batch, float64, tolerance, num_new, seed, as_json) -> None:
    """Compare jaxgpt with the notebook's torch model layer by layer on one checkpoint.

    Reports, per layer (embeddings sum, each block's output, final norm, logits), the max and
    mean absolute difference, and (float32) each framework's error against a float64 torch
    run; then greedy and sampled agreement. Exits 1 when a layer exceeds the tolerance.
    Needs torch (pip install "jaxgpt[torch]").
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CLIError('jaxgpt parity needs torch, which is not installed: pip install "jaxgpt[torch]"') from None
    from porting import parity, read_checkpoint

    config = read_checkpoint(weights).config
    if text_path is None:
        tokens = parity.random_windows(config.vocab_size, batch, config.context_length)
        source = "seeded random tokens"
    else:
        vocab, _ = load_vocab(vocab_path, weights)
        if vocab.size != config.vocab_size:
            raise CLIError(f"the vocabulary has {vocab.size} characters but the model's vocab_size is {config.vocab_size}")
        try:
            with open(text_path, encoding="utf-8") as f:
                text = f.read()
            tokens = parity.text_windows(vocab.encode(text), batch, config.context_length)
        except OSError as e:
            raise CLIError(f"--text {text_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise CLIError(f"--text {text_path}: {e}") from None
        source = text_path
    result = parity.report(weights, tokens, float64=float64, tolerance=tolerance, num_new=num_new, seed=seed)
    result["text"] = source
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_table(result)
    if not result["passed"]:
        raise click.exceptions.Exit(1)


def _print_table(r: dict) -> None:
    b, t = r["windows"]
    click.echo(f"{r['path']}: {r['variant']} model, {r['dtype']}, {b} windows of {t} tokens ({r['text']})")
    float32 = r["dtype"] == "float32"
    head = f"{'layer':<12} {'max |jax-torch|':>15} {'mean':>9} {'max |value|':>11}"
    if float32:
        head += f"   {'jax vs f64: max':>15} {'mean':>9}   {'torch vs f64: max':>17} {'mean':>9}"
    click.echo(head)
    for row in r["layers"]:
        line = f"{row['layer']:<12} {_fmt(row['max_abs_diff']):>15} {_fmt(row['mean_abs_diff']):>9} {row['max_abs_value']:>11.3g}"
        if float32:
            j, th = row["jax_vs_float64"], row["torch_vs_float64"]
            line += f"   {_fmt(j['max']):>15} {_fmt(j['mean']):>9}   {_fmt(th['max']):>17} {_fmt(th['mean']):>9}"
        click.echo(line)
    g = r["generation"]
    if g:
        for name in ("greedy", "sampled"):
            a = g[name]
            first = "none" if a["first_divergence"] is None else f"at token {a['first_divergence']}"
            click.echo(f"{name} agreement: {a['agreement'] * a['tokens']:.0f}/{a['tokens']} tokens (first divergence {first})")
        click.echo(f"generation: {g['how']}")
    verdict = "PASS" if r["passed"] else "FAIL"
    click.echo(f"{verdict}: worst layer {r['worst_layer']} at {_fmt(r['worst_max_abs_diff'])} "
               f"({'within' if r['passed'] else 'above'} the tolerance {r['tolerance']:.0e})")


def register(app: click.Group) -> None:
    app.add_command(parity_command)
