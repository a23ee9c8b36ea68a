"""Keep freed host memory for reuse, so XLA:CPU stops page-faulting its scratch buffer.

XLA:CPU gives every call of a compiled program one scratch buffer for its intermediates
(354 MB for a published-size training step at batch 16) and frees it when the call ends. It
allocates it with `posix_memalign` from the calling worker thread's glibc malloc arena, and
glibc serves an allocation that large (over 64 MB) from a non-main arena with a fresh `mmap`
and unmaps it on free. So every training step touches 354 MB of new pages: 94,000 page faults
and ~0.15 s of kernel time per step on the 2-core benchmark machine, while torch's per-tensor
allocations are recycled by its allocator.

`reuse_host_memory()` makes glibc keep such memory instead: one malloc arena (the main one,
which grows without the 64 MB limit), no `mmap` for large blocks and no trimming of the heap.
The next call then gets the same, already mapped buffer, most of the time: small allocations
around the buffer fragment the heap, and glibc grows it now and then (in 40 published-size
training steps, 1-2 after the first still faulted the buffer in). Measured: a ~12% faster
training step (benchmarks/train_step.py, 7 interleaved rounds).
"No trimming" must mean none: a threshold of 2**31 - 1 bytes (the largest positive `int`) was
not enough. At batch 64 the buffer is 1.34 GB, and a training loop that dispatches the next
step before the last one finishes has two of them; once both are free the heap's top passes
2 GB, glibc trims it, and every step faulted ~300,000 pages back in (1.45 instead of 1.0 s per
step in `jaxgpt train`). glibc takes -1 as "never".
The cost: the process never hands freed heap memory back to the system, so its resident size
stays at its peak. `jaxgpt` CLI commands turn it on; scripts call it themselves, first thing.
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
