"""Device and multi-host options shared by commands (`jaxgpt train`, `jaxgpt eval`): not a command module.

    @click.command("train")
    @device_options              # --devices, --distributed, --coordinator-address, ...
    def train_command(..., devices, distributed, coordinator_address, num_processes, process_id,
                      local_device_ids, ...):
        start_distributed(distributed, coordinator_address, num_processes, process_id, local_device_ids)
        ...                       # only now may anything touch a JAX device
        data_parallel_mesh(devices, batch_size, names=FLAGS)   # the library's checks, named by flag

`devices_option` is the one `--devices` of every command. Every problem ends as one
`jaxgpt: error: ...` line naming the flag: the library raises it, given `FLAGS`.
"""

from __future__ import annotations

import click

from jaxgpt.cli import CLIError

# What library messages call each setting (`names=` / `name=` of sharding and train functions).
FLAGS = {"devices": "--devices", "batch_size": "--batch-size", "coordinator_address": "--coordinator-address",
         "num_processes": "--num-processes", "process_id": "--process-id", "local_device_ids": "--local-device-ids"}


def devices_option(what: str):
    """The `--devices N` option; `what` says what is split over the first N devices."""
    return click.option("--devices", type=click.IntRange(min=1), default=None, metavar="N",
                        help=f"{what} over the first N devices [default: all; 1: a single device].")


def device_options(command):
    """Adds --devices and the multi-host flags (in this order, after the command's own options)."""
    options = [
        devices_option("Data-parallel training"),
        click.option("--distributed", is_flag=True, help="Multi-host run; settings detected by JAX (TPU pod "
                     "slice, Slurm, Open MPI) unless given below."),
        click.option("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="Multi-host: process 0's address, reachable from every host (with --num-processes, "
                     "--process-id)."),
        click.option("--num-processes", type=int, default=None, help="Multi-host: number of processes."),
        click.option("--process-id", type=int, default=None, help="Multi-host: this process's index, 0..N-1."),
        click.option("--local-device-ids", default=None, metavar="IDS",
                     help="Multi-host: comma-separated local accelerator ids of this process [default: all]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def start_distributed(distributed: bool, coordinator_address, num_processes, process_id, local_device_ids) -> bool:
    """Initializes jax.distributed when asked to; True if it did.

    Call it first: `jax.distributed.initialize` refuses to run once anything has touched a
    JAX device. With none of the flags this does nothing (a single-process run).
    """
    from jaxgpt.sharding import check_distributed, initialize_distributed

    ids = None
    if local_device_ids is not None:
        try:
            ids = [int(i) for i in local_device_ids.split(",")]
        except ValueError:
            raise CLIError(f"--local-device-ids must be comma-separated integers, got {local_device_ids!r}") from None
    settings = (coordinator_address, num_processes, process_id)
    if not distributed and all(v is None for v in settings):
        if ids is not None:
            raise CLIError("--local-device-ids applies to multi-process runs: add --coordinator-address, "
                           "--num-processes and --process-id (or --distributed)")
        return False
    check_distributed(*settings, ids, names=FLAGS)  # a DistributedError (ValueError): one error line
    initialize_distributed(*settings, ids)
    return True


def describe_parallel(devices: int | None) -> str:
    """", data-parallel over 8 devices (2 processes)", or "" for a single device."""
    import jax

    n = jax.device_count() if devices is None else devices
    if n == 1:
        return ""
    processes = jax.process_count()
    return f", data-parallel over {n} devices" + (f" ({processes} processes)" if processes > 1 else "")
