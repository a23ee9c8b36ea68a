"""Keep freed host memory for reuse, so XLA:CPU stops page-faulting its scratch buffer.

XLA:CPU gives every call of a compiled program one large scratch buffer for its intermediates
and frees it when the call ends. glibc serves a block that large from a worker thread's arena
with a fresh `mmap` and unmaps it on free, so every training step would fault the whole buffer
in again, while torch's allocator recycles its tensors.

`reuse_host_memory()` makes glibc keep such memory: one malloc arena (the main one, which has
no 64 MB limit), no `mmap` for large blocks, and no trimming of the heap at all (-1, "never":
any finite threshold is passed once two large-batch buffers are free at the top of the heap).
The next call then gets the same, already mapped buffer, most of the time. The cost: the
process never hands freed heap memory back, so its resident size stays at its peak. `jaxgpt`
commands turn it on; scripts call it themselves, first thing. What it saves, measured: README,
"Benchmarks" (and benchmarks/results/train_step_cpu.md).
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # "disables trimming completely" (mallopt(3)): glibc stores it as SIZE_MAX


def _jax_started() -> bool:
    """Whether JAX has created its backends (and so XLA's worker threads and their arenas)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # no public equivalent as of jax 0.10

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # cannot tell: assume the threads exist


def reuse_host_memory() -> bool:
    """Makes glibc malloc keep freed memory for reuse (see the module docstring).

    Must run before the first JAX computation: XLA's worker threads pick their malloc arena
    when they first allocate, and a thread already on its own arena keeps it.

    Returns:
      True if the settings were applied; False where they cannot help (not Linux with glibc,
      or JAX's backends already started), in which case nothing is changed.
    """
    if not sys.platform.startswith("linux") or _jax_started():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries ignore or lack these options
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(mallopt(option, value) == 1 for option, value in settings)
