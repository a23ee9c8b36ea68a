"""`jaxgpt inspect` and `jaxgpt convert`: look into and convert checkpoints (porting/)."""

from __future__ import annotations

import json
import os

import click

from jaxgpt.cli import CLIError

_FORMAT_NAMES = {
    ("torch", "torch"): "torch zip (torch.save state dict)",
    ("safetensors", "torch"): "safetensors, torch key names",
    ("safetensors", "flax"): "safetensors, Flax parameter paths",
    ("orbax", "flax"): "orbax checkpoint directory",
}


def _summary(checkpoint) -> dict:
    config = checkpoint.config
    return {
        "path": checkpoint.path,
        "format": checkpoint.format,
        "key_names": checkpoint.scheme,
        "variant": config.variant,
        "config": {
            "vocab_size": config.vocab_size,
            "context_length": config.context_length,
            "model_dim": config.model_dim,
            "num_blocks": config.num_blocks,
            "num_heads": config.num_heads,
            "head_size": config.head_size,
            "hidden_dim": config.hidden_dim,
        },
        "num_params": checkpoint.num_params,
        "num_tensors": checkpoint.num_tensors,
        "dtypes": checkpoint.dtypes,
        "file_size": checkpoint.file_size,
    }


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_command(path: str, as_json: bool) -> None:
    """Show the variant, inferred config, parameter count, dtypes and size of a checkpoint.

    PATH: a torch .pt (state dict), a .safetensors file (torch keys or Flax paths) or a
    jaxgpt orbax checkpoint directory. The file is checked completely; torch is not used.
    """
    from porting import read_checkpoint

    info = _summary(read_checkpoint(path))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    c = info["config"]
    dtypes = ", ".join(f"{name} x{count}" for name, count in sorted(info["dtypes"].items()))
    rows = [
        ("path", info["path"]),
        ("format", _FORMAT_NAMES.get((info["format"], info["key_names"]), info["format"])),
        ("variant", info["variant"]),
        ("config", " ".join(f"{k}={c[k]}" for k in ("vocab_size", "context_length", "model_dim", "num_blocks", "num_heads"))
         + f" (head_size {c['head_size']}, hidden {c['hidden_dim']})"),
        ("parameters", f"{info['num_params']:,} in {info['num_tensors']} tensors"),
        ("dtypes", dtypes),
        ("file size", f"{info['file_size']:,} bytes ({info['file_size'] / 2**20:.1f} MiB)"),
    ]
    for name, value in rows:
        click.echo(f"{name:<11} {value}")


@click.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--to", "fmt", type=click.Choice(["torch", "safetensors", "torch-safetensors", "orbax"]), default=None,
              help="Output format. Default from OUT: .pt/.pth/.bin torch, .safetensors Flax-native, "
                   "a directory (no suffix, .orbax or a trailing /) orbax.")
@click.option("--force", is_flag=True, help="Replace an existing OUT file (directories are never replaced).")
@click.option("--verify", "check", is_flag=True,
              help="Re-read OUT and check every tensor bit for bit against IN (after the layout mapping), "
                   "the stored keys and the config.")
def convert_command(src: str, dst: str, fmt: str | None, force: bool, check: bool) -> None:
    """Convert a checkpoint between torch .pt, safetensors and orbax, exactly.

    IN is any checkpoint `jaxgpt inspect` reads; OUT is written atomically (never partially).
    Writing a torch .pt needs torch (pip install "jaxgpt[torch]").
    """
    from porting import TorchUnavailableError, convert, verify

    if os.path.lexists(dst.rstrip("/")) and not force:
        raise CLIError(f"{dst}: already exists (use --force to replace a file)")
    try:
        checkpoint = convert(src, dst, fmt)
    except TorchUnavailableError as e:
        raise CLIError(str(e)) from None
    line = (f"wrote {dst}: {checkpoint.config.variant} model, {checkpoint.num_params:,} parameters "
            f"(from {checkpoint.format} {src})")
    if check:
        out = verify(checkpoint, dst.rstrip("/" + os.sep) or dst)
        line += f"; verified: {len(out.params)} tensors identical bit for bit, {out.num_tensors} stored keys, same config"
    click.echo(line)


def register(app: click.Group) -> None:
    app.add_command(inspect_command)
    app.add_command(convert_command)
