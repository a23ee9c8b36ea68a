"""`jaxgpt score`: how likely a text is under the model, character by character.

stdout: total and mean surprisal (nats and bits per character), perplexity and the 10 most
surprising characters in context; with --json one JSON document instead (every character's
log-probability included). --html OUT.html writes one self-contained page that colours every
character by its surprisal; hovering a character shows its probability and the 5 likeliest
alternatives. Diagnostics and progress go to stderr.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys

import click

from jaxgpt.cli import CLIError, load_model

TOP = 5  # alternatives shown per character
SURPRISING = 10
PROGRESS_MIN_WINDOWS = 64  # no progress bar for short texts


def _read_text(text_file: str | None, string: str | None) -> str:
    if (text_file is None) == (string is None):
        raise click.UsageError("give exactly one of --text FILE and --string TEXT")
    if string is not None:
        text = string
    else:
        try:
            with open(text_file, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise CLIError(f"--text {text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise CLIError(f"--text {text_file}: {e.strerror or e}") from None
    if not text:
        raise CLIError("the text to score is empty")
    return text


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"--html {path}: is a directory")
    if not os.path.isdir(parent):
        raise CLIError(f"--html {path}: directory {parent} does not exist")


def _char(c: str) -> str:
    return {"\n": "\\n", "\t": "\\t", " ": "' '"}.get(c, c)


def summary(text: str, logprobs, top_ids, top_logprobs, vocab) -> dict:
    """The numbers `jaxgpt score` prints: totals, means, perplexity, the most surprising characters."""
    n = len(text)
    total = -float(sum(float(x) for x in logprobs))
    mean = total / n
    order = sorted(range(n), key=lambda i: (float(logprobs[i]), i))[:SURPRISING]
    surprising = [{
        "index": i, "char": text[i], "logprob": float(logprobs[i]), "probability": math.exp(float(logprobs[i])),
        "bits": -float(logprobs[i]) / math.log(2), "context": text[max(0, i - 30) : i],
        "expected": [{"char": vocab.chars[int(t)], "probability": math.exp(float(p))}
                     for t, p in zip(top_ids[i][:3], top_logprobs[i][:3])],
    } for i in order]
    return {"characters": n, "total_nats": total, "total_bits": total / math.log(2), "mean_nats": mean,
            "bits_per_char": mean / math.log(2), "perplexity": math.exp(mean), "most_surprising": surprising}


def _print_summary(s: dict, out) -> None:
    out.write(f"characters      {s['characters']:,}\n"
              f"total           {s['total_nats']:.2f} nats ({s['total_bits']:.2f} bits)\n"
              f"mean            {s['mean_nats']:.4f} nats/char, {s['bits_per_char']:.4f} bits/char\n"
              f"perplexity      {s['perplexity']:.3f}\n"
              f"most surprising characters (in context):\n")
    for rank, m in enumerate(s["most_surprising"], 1):
        expected = ", ".join(f"{_char(e['char'])} {e['probability']:.2f}" for e in m["expected"])
        context = m["context"].replace("\n", "\\n")[-30:]
        char = m["char"].replace("\n", "\\n")
        out.write(f"  {rank:2d}. {_char(m['char']):>4} at {m['index']:<6} p={m['probability']:.2e} "
                  f"({m['bits']:.1f} bits)  ...{context}[{char}]  expected: {expected}\n")


def _colour(bits: float) -> str:
    """Background of a character: pale at 0 bits, through yellow to red at 8 bits and more."""
    t = min(max(bits / 8.0, 0.0), 1.0)
    return f"hsl({60 - 60 * t:.0f},100%,{96 - 46 * t:.0f}%)"


def surprisal_page(text: str, logprobs, top_ids, top_logprobs, vocab, stats: dict, title: str) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no external resources)."""
    spans = []
    for i, c in enumerate(text):
        p = math.exp(float(logprobs[i]))
        bits = -float(logprobs[i]) / math.log(2)
        alternatives = "&#10;".join(
            f"{html.escape(_char(vocab.chars[int(t)]), quote=True)}  {math.exp(float(q)):.3f}"
            for t, q in zip(top_ids[i], top_logprobs[i]))
        tip = f"{html.escape(_char(c), quote=True)}  p={p:.4f}  ({bits:.2f} bits)&#10;likeliest:&#10;{alternatives}"
        shown = "\u21b5\n" if c == "\n" else html.escape(c)
        spans.append(f'<span style="background:{_colour(bits)}" data-tip="{tip}">{shown}</span>')
    legend = "".join(f'<span class="key" style="background:{_colour(b)}">{b} bits</span>' for b in range(0, 9, 2))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
#text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; font-size: 15px; }}
#text span {{ position: relative; }}
#text span:hover {{ outline: 1px solid #333; }}
#text span:hover::after {{ content: attr(data-tip); position: absolute; left: 0; top: 1.6em; z-index: 1;
  white-space: pre; background: #222; color: #fff; padding: .4em .6em; border-radius: 4px; font-size: 13px; }}
.key {{ display: inline-block; padding: 0 .6em; margin-right: .3em; font-size: 13px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{stats['characters']:,} characters: {stats['mean_nats']:.4f} nats/char, {stats['bits_per_char']:.4f} bits/char,
perplexity {stats['perplexity']:.3f}, total {stats['total_bits']:.1f} bits. Each character is coloured by its
surprisal, -log2 p(character | everything before it); hover a character for its probability and the {TOP}
likeliest characters at that point.</p>
<p>{legend}</p>
<div id="text">{''.join(spans)}</div>
</body></html>
"""


@click.command("score")
@click.option("--text", "text_file", type=str, default=None, metavar="FILE", help="UTF-8 file to score.")
@click.option("--string", type=str, default=None, metavar="TEXT", help="Text to score, given inline.")
@click.option("--weights", type=str, default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors, jaxgpt orbax directory or `jaxgpt train` output directory "
                   "[default: the bundled one].")
@click.option("--vocab", type=str, default=None, metavar="JSON",
              help="id -> character JSON [default: vocab.json beside the weights, else the published 104 characters].")
@click.option("--mode", type=click.Choice(["exact", "strided"]), default="exact", show_default=True,
              help="exact: the notebook's window (one forward pass per character past the first C); "
                   "strided: strided generation's windows (faster).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Strided mode only [default: context_length // 2].")
@click.option("--html", "html_out", type=str, default=None, metavar="OUT.html",
              help="Write a self-contained page colouring every character by its surprisal.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (every character's log-probability).")
@click.option("-q", "--quiet", is_flag=True, help="No diagnostics or progress on stderr.")
def score_command(text_file, string, weights, vocab, mode, stride, html_out, as_json, quiet) -> None:
    """Score a text: the log-probability of every character given everything before it."""
    text = _read_text(text_file, string)
    if stride is not None and mode != "strided":
        raise CLIError("--stride applies to --mode strided only")
    if html_out is not None:
        _check_output(html_out)
    from jaxgpt import compile_cache
    from jaxgpt.generate import Sampler
    from jaxgpt.score import score_details

    compile_cache.enable()
    model, path, characters, _ = load_model(weights, vocab)
    config = model.config
    unknown = characters.unknown_chars(text)
    if unknown:
        raise CLIError(f"the text holds characters not in the vocabulary: {', '.join(repr(c) for c in unknown[:10])}")
    if stride is not None and not 1 <= stride <= config.context_length:
        raise CLIError(f"--stride must be in 1..{config.context_length} (the checkpoint's context_length), got {stride}")
    if not quiet:
        print(f"jaxgpt: {path}: {config.variant}, context {config.context_length}; scoring {len(text):,} characters, "
              f"{mode} mode", file=sys.stderr)
    bars = []

    def progress(done: int, total: int) -> None:  # a bar for long texts only
        if not bars and not quiet and total >= PROGRESS_MIN_WINDOWS:
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="window", file=sys.stderr, leave=False))
        if bars:
            bars[0].update(done - bars[0].n)

    details = score_details(Sampler(model), text, vocab=characters, mode=mode, stride=stride, top=TOP,
                            progress=progress)
    for bar in bars:
        bar.close()
    stats = summary(text, details.logprobs, details.top_ids, details.top_logprobs, characters)
    if html_out is not None:
        from jaxgpt.atomic import write_text

        title = f"Surprisal of {os.path.basename(text_file) if text_file else 'the text'} under {os.path.basename(path)}"
        write_text(html_out, surprisal_page(text, details.logprobs, details.top_ids, details.top_logprobs,
                                            characters, stats, title))
        if not quiet:
            print(f"jaxgpt: wrote {html_out}", file=sys.stderr)
    if as_json:
        doc = dict(stats, weights=path, mode=mode, logprobs=[round(float(x), 6) for x in details.logprobs])
        sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    else:
        _print_summary(stats, sys.stdout)


def register(app) -> None:
    app.add_command(score_command)
