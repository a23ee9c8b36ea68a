"""`jaxgpt train` and `jaxgpt eval`.

`train` checks every input first (text, vocabulary, --init checkpoint, configuration, output
directory) and creates nothing until all are good. It then writes under --out:

    checkpoints/<step>/   orbax checkpoints (params + optimizer state), the latest two
    checkpoints/run.json  the settings the checkpoints belong to (checked on resume)
    history.json          loss, validation loss, gradient norm, learning rate, tokens/s
    loss_curve.png        redrawn at every checkpoint
    vocab.json            the id -> character map the weights use
    weights.pt            the final model for the notebook's torch class (porting.save_weights)

Running the same command again resumes from the latest checkpoint and computes exactly what
an uninterrupted run would have. Ctrl-C finishes the current step, checkpoints and stops.

Devices: training is data-parallel over every visible device (--batch-size must divide by
their number; --devices N uses the first N, --devices 1 one device). Several hosts: start the
same command on every host with --coordinator-address HOST:PORT --num-processes N
--process-id I (or --distributed alone on a TPU pod slice, under Slurm or Open MPI, where JAX
detects them); jax.distributed is initialized before anything else touches JAX. --out must
then be a directory every host reaches: orbax writes the checkpoints from all processes,
and process 0 alone writes vocab.json, history.json, run.json, the loss curve and the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys

import click

from jaxgpt.cli import CLIError, load_model, load_vocab
from jaxgpt.cli_devices import FLAGS, describe_parallel, device_options, devices_option, start_distributed

_CONFIG_OPTIONS = ("context_length", "model_dim", "num_blocks", "num_heads", "variant")
OUTPUTS = ("checkpoints", "history.json", "loss_curve.png", "vocab.json", "weights.pt", "weights.safetensors")


class Interrupted(CLIError):
    """Ctrl-C during training: a checkpoint was written; exit status 130."""

    exit_code = 130


def _encode(text: str, text_path: str, vocab, drop_unknown: bool, quiet: bool, remedy: str):
    """Ids of the text; unknown characters are an error unless dropped, and dropping is reported."""
    from jaxgpt.data import count_unknown, encode_text

    unknown = vocab.unknown_chars(text)
    if unknown and not drop_unknown:
        raise CLIError(f"{text_path}: {count_unknown(text, unknown)} are not in the vocabulary: {remedy}")
    if unknown and not quiet:
        print(f"jaxgpt: note: dropped {count_unknown(text, unknown)} not in the vocabulary", file=sys.stderr)
    return encode_text(text, vocab, drop_unknown=drop_unknown)


def _read_text(path: str, max_chars: int | None = None) -> str:
    from jaxgpt.data import read_text

    text = read_text(path)
    return text[:max_chars] if max_chars is not None else text


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """`jaxgpt train`'s command line as given (one field per option); `_plan` checks it."""

    # The text and its vocabulary.
    text_path: str
    val_fraction: float
    vocab_path: str | None
    vocab_from_text: bool
    drop_unknown: bool
    # The model: None is the published value, or with --init the checkpoint's.
    init_path: str | None
    context_length: int | None
    model_dim: int | None
    num_blocks: int | None
    num_heads: int | None
    variant: str | None
    dropout: float | None
    # Optimisation: the fields of jaxgpt.train.TrainConfig.
    steps: int
    batch_size: int
    learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    seed: int
    eval_interval: int
    eval_batches: int
    checkpoint_interval: int
    log_interval: int
    # The run.
    out: str
    resume: bool
    quiet: bool
    # Devices and hosts (jaxgpt.cli_devices).
    devices: int | None
    distributed: bool
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: str | None

    def model_options(self) -> dict:
        """The model options given on the command line (None: not given)."""
        return {name: getattr(self, name) for name in _CONFIG_OPTIONS}

    def train_config(self):
        """The TrainConfig of these options (it raises a precise ValueError for a bad value)."""
        from jaxgpt.train import TrainConfig

        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)
                              if hasattr(self, f.name)})


def _model_config(args: TrainArgs, vocab, init_checkpoint):
    """The GPTConfig to train: the checkpoint's with --init (options must agree), else options/defaults."""
    from jaxgpt.config import PUBLISHED, GPTConfig

    given = args.model_options()
    dropout = PUBLISHED.dropout if args.dropout is None else args.dropout
    if init_checkpoint is not None:
        config = init_checkpoint.config
        clashes = [f"--{name.replace('_', '-')} {given[name]} (the checkpoint has {getattr(config, name)})"
                   for name in _CONFIG_OPTIONS if given[name] is not None and given[name] != getattr(config, name)]
        if clashes:
            raise CLIError(f"--init {args.init_path}: {'; '.join(clashes)}: leave these options out to fine-tune it")
        if config.vocab_size != vocab.size:
            raise CLIError(f"--init {args.init_path} has vocab_size {config.vocab_size} but the vocabulary has "
                           f"{vocab.size} characters: pass the vocabulary it was trained with (--vocab JSON)")
        return config.replace(dropout=dropout)
    fields = {name: given[name] if given[name] is not None else getattr(PUBLISHED, name) for name in _CONFIG_OPTIONS}
    if fields["model_dim"] % fields["num_heads"]:
        raise CLIError(f"--model-dim {fields['model_dim']} must be divisible by --num-heads {fields['num_heads']}"
                       + ("" if given["num_heads"] is not None else " (the default)"))
    return GPTConfig(vocab_size=vocab.size, dropout=dropout, **fields)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything `train` needs, checked, before anything is written."""

    out: str
    model_config: object
    train_config: object
    split: object
    vocab: object
    vocab_source: str
    init: object  # porting.Checkpoint or None
    run_info: dict
    resume_step: int | None
    export_torch: bool
    devices: int | None  # None: every device


def _vocabulary(args: TrainArgs, text: str):
    """(Vocab, description) from --vocab, --vocab-from-text, beside --init, or the published map."""
    from jaxgpt.vocab import Vocab, VocabError

    if args.vocab_path is not None and args.vocab_from_text:
        raise CLIError("--vocab and --vocab-from-text exclude each other")
    if args.vocab_from_text and args.init_path is not None:
        raise CLIError("--vocab-from-text cannot fine-tune --init: the checkpoint's ids follow its own vocabulary "
                       "(pass that one with --vocab)")
    if not args.vocab_from_text:
        return load_vocab(args.vocab_path, args.init_path)
    try:
        return Vocab.from_text(text), f"built from {args.text_path}"
    except VocabError as e:
        raise CLIError(f"{args.text_path}: {e}") from None


def _check_out(out: str) -> str:
    """The absolute --out directory, if it is new or holds only a training run's outputs."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out):
        foreign = sorted(n for n in os.listdir(out) if n not in OUTPUTS and not n.startswith("."))
        if foreign:
            raise CLIError(f"--out {out}: holds files that are not a jaxgpt training run ({', '.join(foreign[:3])}"
                           f"{' ...' if len(foreign) > 3 else ''}): choose a new or empty directory")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {out}: the parent directory {parent} does not exist")
    if not os.access(parent if not os.path.exists(out) else out, os.W_OK):
        raise CLIError(f"--out {out}: not writable")
    return out


def _plan(args: TrainArgs) -> _Plan:
    from jaxgpt.data import DataError, train_val_split
    from jaxgpt.runs import check_resumable
    from jaxgpt.train import data_parallel_mesh

    text = _read_text(args.text_path)
    vocab, vocab_source = _vocabulary(args, text)
    init = None
    if args.init_path is not None:
        import porting

        try:
            init = porting.read_checkpoint(args.init_path)
        except porting.CheckpointError as e:
            raise CLIError(f"--init {e}") from None
    model_config = _model_config(args, vocab, init)
    tokens = _encode(text, args.text_path, vocab, args.drop_unknown, args.quiet, "pass --drop-unknown to remove "
                     "them, --vocab-from-text to build the vocabulary from the text, or --vocab JSON")
    try:
        split = train_val_split(tokens, args.val_fraction, model_config.context_length)
    except DataError as e:
        raise CLIError(f"{args.text_path}: {e}") from None
    train_config = args.train_config()
    data_parallel_mesh(args.devices, train_config.batch_size, names=FLAGS)
    run_info = {
        "text_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "val_fraction": args.val_fraction,
        "vocab": "".join(vocab.chars),
        "init_sha256": (_file_sha256(args.init_path) if args.init_path and os.path.isfile(args.init_path)
                        else args.init_path),
    }
    out = _check_out(args.out)
    resume_step = check_resumable(os.path.join(out, "checkpoints"), model_config, train_config, run_info)
    if resume_step is not None and not args.resume:
        raise CLIError(f"--out {out} already holds checkpoints (up to step {resume_step}): drop --no-resume to "
                       "continue that run, or choose another --out")
    return _Plan(out, model_config, train_config, split, vocab, vocab_source, init, run_info, resume_step,
                 export_torch=importlib.util.find_spec("torch") is not None, devices=args.devices)


@click.command("train")
@click.option("--text", "text_path", required=True, metavar="FILE", help="UTF-8 training text.")
@click.option("--out", default="jaxgpt-train", show_default=True, metavar="DIR",
              help="Output directory (its parent must exist); an existing run there is resumed.")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (after warmup).")
@click.option("--min-lr", "min_learning_rate", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Learning rate at the end of the cosine decay.")
@click.option("--warmup", "warmup_steps", type=click.IntRange(min=0), default=100, show_default=True,
              help="Linear warmup steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Global gradient-norm clip.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Initialisation, batches and dropout.")
@click.option("--eval-interval", type=click.IntRange(min=1), default=250, show_default=True,
              help="Steps between validation losses.")
@click.option("--eval-batches", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--checkpoint-interval", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--log-interval", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between history records.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Held-out end of the text.")
@click.option("--init", "init_path", default=None, metavar="PATH",
              help="Fine-tune this checkpoint (torch .pt, .safetensors or orbax directory); its config is used.")
@click.option("--vocab", "vocab_path", default=None, metavar="JSON",
              help="id -> character map [default: vocab.json beside --init, else the published 104 characters].")
@click.option("--vocab-from-text", is_flag=True, help="Build the vocabulary from the text's characters.")
@click.option("--drop-unknown", is_flag=True, help="Remove characters outside the vocabulary (reported) "
              "instead of failing.")
@click.option("--context-length", type=click.IntRange(min=1), default=None, help="[default: 128]")
@click.option("--model-dim", type=click.IntRange(min=1), default=None, help="[default: 252]")
@click.option("--num-blocks", type=click.IntRange(min=1), default=None, help="[default: 6]")
@click.option("--num-heads", type=click.IntRange(min=1), default=None, help="[default: 6]")
@click.option("--variant", type=click.Choice(["drake", "learning"]), default=None, help="[default: drake]")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="[default: 0.2]")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue the run found in --out (--no-resume: refuse to).")
@device_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes.")
def train_command(**options) -> None:
    """Train (or fine-tune with --init) the character-level GPT on a text."""
    from jaxgpt import compile_cache

    args = TrainArgs(**options)
    # First of all: jax.distributed must start before anything touches a device.
    start_distributed(args.distributed, args.coordinator_address, args.num_processes, args.process_id,
                      args.local_device_ids)
    plan = _plan(args)
    compile_cache.enable()
    _run(plan, args.quiet)


def _run(plan: _Plan, quiet: bool) -> None:
    from flax import nnx

    import porting
    from jaxgpt.model import GPT
    from jaxgpt.plots import plot_history
    from jaxgpt.runs import latest_step
    from jaxgpt.sharding import is_primary_process
    from jaxgpt.train import fit

    mc, tc = plan.model_config, plan.train_config
    # Multi-host: every process trains (and orbax checkpoints from all); one writes the files.
    primary = is_primary_process()
    quiet = quiet or not primary
    ckpt_dir = os.path.join(plan.out, "checkpoints")
    curve = os.path.join(plan.out, "loss_curve.png")
    created = not os.path.exists(plan.out)
    if plan.init is not None:
        model = porting.model_from_params(plan.init.params, mc)
    else:
        model = GPT(mc, rngs=nnx.Rngs(tc.seed))
    if not quiet:
        print(_announcement(plan), file=sys.stderr)

    def redraw(step, history):
        if history and primary:  # the first checkpoint may come before the first record
            plot_history(history, curve, title=f"{os.path.basename(plan.out)}: {mc.num_params():,} parameters")

    before = set(os.listdir(plan.out)) if not created else set()
    try:
        os.makedirs(plan.out, exist_ok=True)
        if primary:
            plan.vocab.save(os.path.join(plan.out, "vocab.json"))  # atomic
        trained, history = fit(model, plan.split, tc, checkpoint_dir=ckpt_dir,
                               history_path=os.path.join(plan.out, "history.json"), run_info=plan.run_info,
                               progress=not quiet, on_checkpoint=redraw, devices=plan.devices)
    except KeyboardInterrupt:
        step = latest_step(ckpt_dir)
        if step is None and primary:
            _remove_new_outputs(plan.out, created, before)
            raise
        raise Interrupted(f"interrupted: checkpoint at step {step} in {ckpt_dir}; run the same command to resume") from None
    except BaseException:
        if latest_step(ckpt_dir) is None and primary:
            _remove_new_outputs(plan.out, created, before)
        raise
    redraw(tc.steps, history)
    if primary:
        _export(plan, trained, history, curve)


def _announcement(plan: _Plan) -> str:
    """The line `train` starts with: what is trained on what, how, and where."""
    mc, tc = plan.model_config, plan.train_config
    what = f"fine-tuning {plan.init.path}" if plan.init is not None else "training from scratch"
    where = f"resuming from step {plan.resume_step}" if plan.resume_step else f"writing {plan.out}"
    return (f"jaxgpt: {what}: {mc.variant}, {mc.num_params():,} parameters (context {mc.context_length}, dim "
            f"{mc.model_dim}, {mc.num_blocks} blocks, {mc.num_heads} heads, dropout {mc.dropout}); vocabulary "
            f"{plan.vocab_source}; {len(plan.split.train):,} training / {len(plan.split.val):,} validation "
            f"characters; {tc.steps} steps of {tc.batch_size} x {mc.context_length}"
            f"{describe_parallel(plan.devices)}; {where}")


def _export(plan: _Plan, trained, history: list[dict], curve: str) -> None:
    """Writes the final weights (torch if installed, else safetensors) and reports the last losses."""
    import porting

    if plan.export_torch:
        weights = os.path.join(plan.out, "weights.pt")
        porting.save_weights(trained, weights)
    else:
        weights = os.path.join(plan.out, "weights.safetensors")
        porting.save_flax(trained, weights, "safetensors")
        print('jaxgpt: note: torch is not installed, so the weights are in Flax-native safetensors (pip install '
              '"jaxgpt[torch]" for weights.pt)', file=sys.stderr)
    last = history[-1] if history else {}
    val = last.get("val_loss")
    print(f"step {plan.train_config.steps}: loss {last.get('loss', float('nan')):.4f}"
          + (f", validation loss {val:.4f} nats/char ({val / math.log(2):.4f} bits/char)" if val is not None else ""))
    print(f"wrote {weights}, {curve}, {os.path.join(plan.out, 'history.json')}")


def _remove_new_outputs(path: str, created: bool, before: set[str]) -> None:
    """A run that failed before its first checkpoint leaves nothing behind: the directory if it
    created it, else the outputs it added."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in OUTPUTS:
        target = os.path.join(path, name)
        if name not in before and os.path.lexists(target):
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)


# ----------------------------------------------------------------------------- eval
COMPARE_TOLERANCE = 1e-4  # nats/char: float32 summation orders differ, the models must not


@click.command("eval")
@click.option("--weights", default=None, metavar="PATH",
              help="Checkpoint: torch .pt, .safetensors, orbax directory or a `jaxgpt train` --out directory "
              "[default: the bundled one].")
@click.option("--text", "text_path", required=True, metavar="FILE", help="UTF-8 text to score.")
@click.option("--vocab", "vocab_path", default=None, metavar="JSON",
              help="id -> character map [default: vocab.json beside the weights, else the published 104 characters].")
@click.option("--drop-unknown", is_flag=True, help="Remove characters outside the vocabulary (reported).")
@click.option("--max-chars", type=click.IntRange(min=2), default=None, help="Score only the first N characters.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows per forward pass.")
@click.option("--compare-torch", is_flag=True, help="Also score with the notebook's torch model (needs torch).")
@devices_option("Split each batch")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes.")
def eval_command(weights, text_path, vocab_path, drop_unknown, max_chars, batch_size, compare_torch, devices,
                 as_json, quiet) -> None:
    """Teacher-forced loss of a checkpoint on a text: nats/char, bits/char, perplexity."""
    from jaxgpt import compile_cache

    if compare_torch and importlib.util.find_spec("torch") is None:
        raise CLIError('--compare-torch needs torch, which is not installed: pip install "jaxgpt[torch]"')
    text = _read_text(text_path, max_chars)
    model, path, vocab, vocab_source = load_model(weights, vocab_path)
    config = model.config
    tokens = _encode(text, text_path, vocab, drop_unknown, quiet or as_json,
                     "pass --drop-unknown to remove them, or the checkpoint's vocabulary with --vocab")
    compile_cache.enable()
    from jaxgpt.evaluate import evaluate
    from jaxgpt.sharding import resolve_devices

    resolve_devices(devices, name=FLAGS["devices"])  # refused before any compilation
    result = evaluate(model, tokens, batch_size=batch_size, progress=not (quiet or as_json), devices=devices)
    reference = None
    if compare_torch:
        from porting.torch_reference import evaluate_torch, reference_from_model

        reference = evaluate_torch(reference_from_model(model), tokens, config.context_length, batch_size=batch_size,
                                   progress=not (quiet or as_json))
    difference = abs(result.nats_per_char - reference.nats_per_char) if reference else None
    if as_json:
        doc = {"weights": path, "text": text_path, "vocab": vocab_source, "context_length": config.context_length,
               "jax": result.as_dict()}
        if reference is not None:
            doc["torch"] = reference.as_dict()
            doc["abs_difference_nats_per_char"] = difference
        print(json.dumps(doc, indent=1))
    else:
        print(f"{path}: {config.variant}, {model.num_params():,} parameters, vocabulary {vocab_source}; "
              f"{text_path}: {result.num_chars:,} characters predicted in {result.num_windows:,} windows of up to "
              f"{config.context_length}")
        rows = [("jaxgpt", result)] + ([("torch", reference)] if reference is not None else [])
        for name, r in rows:
            print(f"{name:7s} {r.nats_per_char:.5f} nats/char  {r.bits_per_char:.5f} bits/char  "
                  f"perplexity {r.perplexity:.4f}")
        if reference is not None:
            print(f"agreement: |jaxgpt - torch| = {difference:.2e} nats/char (tolerance {COMPARE_TOLERANCE:g})")
    if difference is not None and not difference <= COMPARE_TOLERANCE:
        raise CLIError(f"jaxgpt and torch disagree by {difference:.3g} nats/char (> {COMPARE_TOLERANCE:g})")


def register(app) -> None:
    app.add_command(train_command)
    app.add_command(eval_command)
