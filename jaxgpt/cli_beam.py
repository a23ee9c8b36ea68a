"""`jaxgpt generate --beams N`: beam search instead of sampling (the option lives in cli_generate).

stdout: the best continuation of each prompt (stop strings trimmed), several prompts separated
as generate separates samples; with --json one JSON object per prompt and line, holding every
beam, best first: {"prompt", "beams": [{"text", "score", "stopped"}, ...], "num_chars",
"weights"} (score: the sum of the characters' log-probabilities, natural log).
"""

from __future__ import annotations

import json
import sys
import time

from jaxgpt.cli import CLIError

# generate's sampling options and their defaults: any other value means nothing to beam search
SAMPLING_DEFAULTS = dict(seed=0, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                         ban=None, logprobs=0, batch=1, slots=None, mode="exact", stride=None)


def check_beam_options(beams: int, vocab_size: int, sampling: dict) -> None:
    """One clear error for --beams beyond the vocabulary or with options that mean nothing to it.

    Args:
      beams: the --beams value.
      vocab_size: the checkpoint's vocabulary size (the most beams there can be).
      sampling: generate's values of the `SAMPLING_DEFAULTS` options.
    """
    if beams > vocab_size:
        raise CLIError(f"--beams must be in 1..{vocab_size} (the checkpoint's vocab_size), got {beams}")
    conflicts = ["--" + name.replace("_", "-") + (f" {value}" if name == "mode" else "")
                 for name, value in sampling.items() if value != SAMPLING_DEFAULTS[name]]
    if conflicts:
        raise CLIError(f"--beams searches for the likeliest continuation with the notebook's exact window; "
                       f"{', '.join(conflicts)} only apply to sampling")


def run_beams(model, vocab, path: str, prompts, num_chars: int, beams: int, stops, *, as_json: bool, devices,
              quiet: bool, sampling: dict) -> None:
    """`jaxgpt generate --beams`: checks the options, searches, writes stdout, times on stderr."""
    check_beam_options(beams, model.config.vocab_size, sampling)
    started = time.perf_counter()
    count = write_beams(model, vocab, prompts, num_chars, beams, stops, as_json=as_json, path=path, devices=devices)
    if not quiet:
        lead = "\n" if sys.stdout.isatty() else ""
        print(f"{lead}jaxgpt: beam search ({beams} beams), {count} characters in {time.perf_counter() - started:.2f} s "
              "(compilation or compiled-code loading included)", file=sys.stderr)


def write_beams(model, vocab, prompts, num_chars: int, beams: int, stops, *, as_json: bool, path: str,
                devices=None, out=None) -> int:
    """Runs the beam search of every prompt and writes it; returns the characters written."""
    from jaxgpt.beam import beam_search_text
    from jaxgpt.score import sampler_of

    out = out or sys.stdout
    sampler = sampler_of(model)
    written = 0
    for index, prompt in enumerate(prompts):
        hypotheses = beam_search_text(sampler, prompt, num_chars, beams=beams, stop=list(stops) or None,
                                      vocab=vocab, devices=devices)
        stopped = [len(text) < num_chars for text, _ in hypotheses]
        if as_json:
            doc = {"prompt": prompt, "num_chars": num_chars, "weights": path,
                   "beams": [{"text": t, "score": s, "stopped": st} for (t, s), st in zip(hypotheses, stopped)]}
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        else:
            out.write((f"\n--- sample {index + 1} ---\n" if index else "") + hypotheses[0][0])
        written += len(hypotheses[0][0])
        out.flush()
    return written
