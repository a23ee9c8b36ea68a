"""Scaling out with JAX's own machinery: a 1-D data mesh, named shardings, multi-host start-up.

Everything here is data parallelism, the only kind a 4.7 M-parameter model needs: the
parameters (and optimizer state) are *replicated* on every device of a `Mesh` with one axis,
`"data"`, and arrays with a leading batch axis are *split* along it (`PartitionSpec("data")`).
The jitted functions themselves are unchanged: XLA's SPMD partitioner (GSPMD/Shardy) sees
the input shardings and partitions the program, inserting the collectives a data-parallel
program needs (e.g. the all-reduce that averages the gradients of a sharded batch). The
mesh axis is of type `Auto` for that reason: `jax.make_mesh` defaults to `Explicit` axes
(sharding in types), which would make every reshape of the batch axis in the model an
explicit resharding decision.

Multi-host (several processes, e.g. one per TPU VM host or per GPU node):
`initialize_distributed` wraps `jax.distributed.initialize`, which must run before anything
touches a JAX device. Afterwards `jax.devices()` lists the devices of every process and
`jax.local_devices()` those of this one. A global batch is assembled with
`put_global_batch`: every process computes the same host array (the training batches are a
pure function of (seed, step)) and hands only the rows of its own devices to JAX.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

DATA_AXIS = "data"


class DistributedError(ValueError):
    """Bad multi-host settings, or `jax.distributed.initialize` refused to start."""


# ----------------------------------------------------------------------------- devices and meshes
def given(name: str, value) -> str:
    """How a message quotes a setting: `devices=9` for an argument, `--devices 9` for a flag."""
    return f"{name}={value!r}" if name.isidentifier() else f"{name} {value}"


def resolve_devices(devices=None, *, pool: Sequence[jax.Device] | None = None,
                    name: str = "devices") -> list[jax.Device]:
    """The devices a computation should use.

    Args:
      devices: None for every device of `pool`; a positive int n for the first n of them
        (1 turns sharding off); or a non-empty sequence of distinct `jax.Device`s from `pool`.
      pool: the devices to choose from (default `jax.local_devices()`, this process's).
      name: what messages call `devices` (a CLI passes its flag, "--devices").

    Returns:
      The chosen devices, in order.

    Raises:
      ValueError: any other value, naming `devices` and what is available.
    """
    pool = list(jax.local_devices() if pool is None else pool)
    if devices is None:
        return pool
    if isinstance(devices, bool):  # bool is an int: devices=True/False would silently mean 1 / 0 devices
        raise ValueError(f"devices must be None (all {len(pool)} devices), a device count or a list of devices, "
                         f"got {devices!r}: pass devices=1 to use a single device")
    if isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(pool):
            raise ValueError(f"{given(name, int(devices))}: must be between 1 and the {len(pool)} available "
                             f"device{'s' if len(pool) != 1 else ''}")
        return pool[: int(devices)]
    if isinstance(devices, (list, tuple)) and devices and all(isinstance(d, jax.Device) for d in devices):
        unknown = [d for d in devices if d not in pool]
        if unknown:
            raise ValueError(f"devices: {unknown[0]} is not one of the available devices {pool}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices: a device is listed twice in {list(devices)}")
        return list(devices)
    raise ValueError(f"devices must be None (all {len(pool)} devices), a positive device count or a non-empty list "
                     f"of jax.Device, got {devices!r}")


def data_mesh(devices=None, *, pool: Sequence[jax.Device] | None = None, name: str = "devices") -> Mesh:
    """A 1-D mesh with the axis "data" over the chosen devices (see `resolve_devices`).

    The default (every device of the pool) goes through `jax.make_mesh`, which orders the
    devices along the physical topology (a ring on TPUs, good for the gradient all-reduce);
    an explicit count or list keeps the pool's / the caller's order.
    """
    chosen = resolve_devices(devices, pool=pool, name=name)
    if devices is None:
        return jax.make_mesh((len(chosen),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=chosen)
    return Mesh(np.asarray(chosen), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split evenly over the "data" axis; other axes are whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def placements(devices: Sequence[jax.Device]) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
    """(whole, rows): where replicated arrays and batch-split arrays go on these devices.

    Several devices: `replicated` and `batch_sharded` of their data mesh. One device: that
    device for both (`SingleDeviceSharding`): XLA reports a 1-device mesh's outputs as
    `P()` whatever their input spec, which would make a loop that feeds its outputs back in
    (the generation carry) see new input shardings, and trace again, on its second call.
    """
    if len(devices) == 1:
        single = SingleDeviceSharding(devices[0])
        return single, single
    mesh = data_mesh(devices)
    return replicated(mesh), batch_sharded(mesh)


def padded_size(batch: int, num_devices: int) -> int:
    """The smallest multiple of `num_devices` that is >= `batch`."""
    return math.ceil(batch / num_devices) * num_devices


def pad_rows(array: np.ndarray, num_devices: int) -> np.ndarray:
    """Appends zero rows so that the leading axis divides by `num_devices`.

    Args:
      array: `(B, ...)`.
      num_devices: the size of the data axis.

    Returns:
      `(padded_size(B, num_devices), ...)`; the first B rows are `array` (the same object
      when no padding is needed).
    """
    extra = padded_size(array.shape[0], num_devices) - array.shape[0]
    if extra == 0:
        return array
    return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])


def put_global_batch(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full, as a global jax.Array with `sharding`.

    Each process copies only the slices of its own (addressable) devices, so this works
    unchanged on one process and on many; unlike `jax.device_put` of a host value onto a
    multi-process sharding it needs no cross-process check that the values agree.

    Args:
      array: `(B, ...)` host data, identical on every process.
      sharding: e.g. `batch_sharded(mesh)`; B must divide by the size of the data axis.
    """
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_replicated(tree, sharding: NamedSharding):
    """A fresh copy of every array in `tree` on every device of `sharding` (e.g. `replicated(mesh)`).

    Through host memory, so it works for arrays committed to one device and on several
    processes (where each process must hold the same values, e.g. the same initialisation
    seed or checkpoint); meant for one-off placement such as a model's parameters.
    """
    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def is_primary_process() -> bool:
    """True on process 0, the one that writes run records, plots and exported weights."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- multi-host start-up
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def check_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
                      names: Mapping[str, str] | None = None) -> None:
    """Validates multi-host settings without touching JAX (so a CLI can refuse them at once).

    Either all of coordinator_address, num_processes and process_id are given (any cluster),
    or none of them (JAX then detects them on a Cloud TPU pod slice, under Slurm or Open MPI).

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: as
        `initialize_distributed`.
      names: how to call each setting in messages (a CLI passes its flags, e.g.
        {"num_processes": "--num-processes"}); default: the argument names.

    Raises:
      DistributedError: naming the missing or bad setting.
    """
    name = lambda key: (names or {}).get(key, key)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [key for key, value in given.items() if value is None]
    if 0 < len(missing) < 3:
        present = [name(key) for key in given if key not in missing]
        raise DistributedError(f"{' and '.join(present)} given without {' and '.join(map(name, missing))}: pass "
                               "all three (or none of them, to let JAX detect a TPU pod slice, Slurm or Open MPI "
                               "cluster)")
    if coordinator_address is not None:
        match = _ADDRESS.match(coordinator_address)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            raise DistributedError(f"{name('coordinator_address')} must be HOST:PORT (port 1..65535), got "
                                   f"{coordinator_address!r}")
        if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
            raise DistributedError(f"{name('num_processes')} must be a positive integer, got {num_processes!r}")
        if (isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer))
                or not 0 <= process_id < num_processes):
            raise DistributedError(f"{name('process_id')} must be an integer in 0..{num_processes - 1} (one less "
                                   f"than {name('num_processes')}), got {process_id!r}")
    if local_device_ids is not None:
        ids = list(local_device_ids)
        if not ids or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
            raise DistributedError(f"{name('local_device_ids')} must be non-negative integers, got "
                                   f"{local_device_ids!r}")
        if len(set(ids)) != len(ids):
            raise DistributedError(f"{name('local_device_ids')} lists a device twice: {ids}")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
                           initialization_timeout: int = 300) -> None:
    """Joins this process to a multi-host JAX cluster (`jax.distributed.initialize`).

    Must run before anything touches a JAX device (`jax.devices()`, a computation, a
    `device_put`): the devices of every process then appear in `jax.devices()`. Every process
    runs the same program with its own `process_id`.

    Args:
      coordinator_address: "HOST:PORT" of process 0, reachable from every process; None on a
        TPU pod slice / Slurm / Open MPI, where JAX detects all settings.
      num_processes: the number of processes (all three or none; see `check_distributed`).
      process_id: this process's index, 0..num_processes-1.
      local_device_ids: the local accelerator ids this process uses (e.g. one process per
        GPU: [i]); None for all.
      initialization_timeout: seconds to wait for every process to connect.

    Raises:
      DistributedError: inconsistent settings, JAX already in use in this process (or
        already initialized), or the cluster could not be formed.
    """
    check_distributed(coordinator_address, num_processes, process_id, local_device_ids)
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized in this process")
    try:
        jax.distributed.initialize(
            coordinator_address, None if num_processes is None else int(num_processes),
            None if process_id is None else int(process_id),
            None if local_device_ids is None else [int(i) for i in local_device_ids],
            initialization_timeout=initialization_timeout)
    except (RuntimeError, ValueError, TypeError) as e:
        # e.g. the backend is already up, auto-detection found no cluster, the coordinator did
        # not answer in time: one line, with JAX's reason.
        reason = " ".join(str(e).split())
        raise DistributedError(f"cannot initialize jax.distributed: {reason}") from None
