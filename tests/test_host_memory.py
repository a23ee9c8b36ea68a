"""jaxgpt.host_memory: XLA:CPU's scratch buffer is reused instead of page-faulted per call."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxgpt.host_memory import reuse_host_memory

# One fresh process per setting (the malloc settings must come before JAX starts): it compiles
# a program with a scratch buffer over glibc's 64 MB arena limit and counts the page faults
# of each of 16 calls. With reuse some calls still fault the buffer in: the heap is
# fragmented by small allocations around the 64-byte-aligned buffer and glibc grows it now
# and then (6-13 of 16 calls of this small program were fault-free in 10 runs; 38-39 of 40
# training steps). Without reuse no call is.
_PROGRAM = textwrap.dedent("""
    import json, resource, sys
    from jaxgpt.host_memory import reuse_host_memory
    applied = reuse_host_memory() if sys.argv[1] == "on" else False
    import jax, jax.numpy as jnp
    x = jnp.linspace(0.0, 1.0, 5000)
    f = jax.jit(lambda x: jnp.sin(jnp.outer(x, x)) @ x)  # (5000, 5000) intermediate: 100 MB
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "temp_bytes": temp, "faults": faults}))
""")


def _run(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, setting], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_scratch_buffer_is_reused_not_faulted_afresh():
    off, on = _run("off"), _run("on")
    pages = off["temp_bytes"] // 4096
    assert off["temp_bytes"] > 64 * 2**20  # the case glibc serves with a fresh mmap per call
    fault_free = lambda run: sum(f < pages // 20 for f in run["faults"])
    assert fault_free(off) == 0 and min(off["faults"]) >= pages // 2, off  # every call faults it in
    assert on["applied"] is True
    assert fault_free(on) >= 3, on  # with reuse, calls find the buffer already mapped


# A freed block above 2 GB (a batch-64 training step has 1.34 GB of scratch, and two steps in
# flight free 2.7 GB together) must stay mapped too: glibc trims the heap's top once it exceeds
# the trim threshold, and the next use faults every page in again.
_BIG_FREE = textwrap.dedent("""
    import ctypes, json, resource
    from jaxgpt.host_memory import reuse_host_memory
    assert reuse_host_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 2**31 + 2**27  # 2.125 GB
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"pages": size // 4096, "faults": faults}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_a_freed_block_over_2_gb_stays_mapped():
    out = subprocess.run([sys.executable, "-c", _BIG_FREE], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=300)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    first, second = run["faults"]
    assert first >= run["pages"] // 2, run  # the first use maps the block in
    assert second < run["pages"] // 100, run  # the second finds it mapped: the heap was not trimmed


def test_refuses_once_jax_runs():
    jax.numpy.zeros(1).block_until_ready()  # the backends exist now
    assert reuse_host_memory() is False
