"""The device's measured limits and the work each benchmark must do at the very least.

FLOP counts (multiply-add = 2 FLOPs; embeddings, norms, softmax and sampling are O(D) per
token and left out), for a config with D = model_dim, L = num_blocks, V = vocab_size,
C = context_length, F = 4D, and P_a = 8D^2 (qkv 6D^2 + `compute` 2D^2, "drake") or 6D^2
("learning") per token for the attention projections:

    per token and block, projections:      W = P_a + 4 D F  = 24 D^2 (drake) / 22 D^2 (learning)
    attention of a query attending S keys:  4 S D            (q.k scores 2SD, weights.v 2SD)
    vocabulary projection, per logit row:   2 D V

A *cached step* (one new character while the context grows; the query at 0-based position p
attends p + 1 cached keys, only its logits are needed):

    F_cached(p) = L (W + 4 (p + 1) D) + 2 D V

A *window step* (the exact notebook semantics once the context is full: the last C tokens are
re-encoded at positions 0..C-1, every query attends causally to t + 1 keys, only the last
logit row is needed):

    F_window = L (C W + 2 C (C + 1) D) + 2 D V

For the published config (D 252, L 6, V 104, C 128) F_cached ranges 9.2-10.0 MFLOP and
F_window = 1.22 GFLOP per character: exact generation is ~125x dearer per character once the
window is full, which is what strided generation avoids. The floor of a run is its FLOP sum
divided by the measured matmul peak; bytes (weights read once per step) give a second,
memory-bandwidth floor that dominates small-batch cached steps.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


# ----------------------------------------------------------------------------- FLOP counts
def _proj_flops(config) -> int:
    d = config.model_dim
    attention = (8 if config.variant == "drake" else 6) * d * d
    return attention + 4 * d * config.hidden_dim


def flops_cached_step(config, position: int) -> int:
    """FLOPs of one cached step whose query sits at 0-based `position` (attends position+1 keys)."""
    d = config.model_dim
    return config.num_blocks * (_proj_flops(config) + 4 * (position + 1) * d) + 2 * d * config.vocab_size


def flops_window_step(config, length: int | None = None) -> int:
    """FLOPs of a full re-encode of `length` (default C) tokens keeping the last logit row only."""
    t = config.context_length if length is None else length
    d = config.model_dim
    return config.num_blocks * (t * _proj_flops(config) + 2 * t * (t + 1) * d) + 2 * d * config.vocab_size


def flops_forward(config, batch: int, length: int) -> int:
    """FLOPs of `model(tokens)` on `(batch, length)`: every position's logits (causal attention)."""
    d = config.model_dim
    per_row = config.num_blocks * (length * _proj_flops(config) + 2 * length * (length + 1) * d)
    return batch * (per_row + 2 * length * d * config.vocab_size)


def flops_train_step(config, batch: int, length: int) -> int:
    """Forward + backward (2x forward) of a training step: 3 x `flops_forward`."""
    return 3 * flops_forward(config, batch, length)


def flops_generation(config, batch: int, prompt_len: int, num_new: int, keep: int | None = None) -> int:
    """FLOPs of generating `num_new` characters per row, as jaxgpt's engine schedules them.

    Step s sees prompt_len + s tokens. While they fit the window (counted from the cache base)
    it is a cached step; otherwise the last `keep` tokens are re-encoded (a window step of
    length keep) and the cache base moves. keep = C (default) is the exact notebook semantics,
    keep = C + 1 - stride strided mode. The prompt's own prefill is not counted.
    """
    c = config.context_length
    keep = c if keep is None else keep
    base, total = 0, 0
    for s in range(num_new):
        length = prompt_len + s
        if length - base > c:
            base = length - keep
            total += flops_window_step(config, keep)
        else:
            total += flops_cached_step(config, length - 1 - base)
    return batch * total


def weight_bytes(config, itemsize: int = 4) -> int:
    """Bytes of the parameters every step reads (all but the embedding tables, of which one row is read)."""
    d = config.model_dim
    return itemsize * (config.num_params() - (config.vocab_size + config.context_length) * d)


# ----------------------------------------------------------------------------- measured limits
@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """Best-of-repetitions matmul throughput (GFLOP/s) per framework, and memory bandwidth (GB/s)."""

    matmul_gflops: dict
    bandwidth_gbs: dict
    matmul_size: int
    bandwidth_mbytes: int

    @property
    def peak_gflops(self) -> float:
        """The best matmul throughput any framework reached: the ceiling every result is held to."""
        return max(self.matmul_gflops.values())

    @property
    def peak_bandwidth_gbs(self) -> float:
        return max(self.bandwidth_gbs.values())

    def as_dict(self) -> dict:
        return {
            "matmul_gflops": self.matmul_gflops,
            "bandwidth_gbs": self.bandwidth_gbs,
            "peak_gflops": self.peak_gflops,
            "peak_bandwidth_gbs": self.peak_bandwidth_gbs,
            "matmul_size": self.matmul_size,
            "bandwidth_mbytes": self.bandwidth_mbytes,
            "method": "float32 n x n matmul (2 n^3 FLOPs) and float32 array sum (bytes read), best of reps, "
                      "measured at the start and at the end of the suite (the better counts)",
        }


def _best(fn, reps: int) -> float:
    fn()  # warm-up: compilation, page faults
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits(n: int = 1024, mbytes: int = 128, reps: int = 5, torch_device: str = "cpu") -> DeviceLimits:
    """Measures float32 matmul peak (numpy, jax, torch) and read bandwidth (numpy, jax, torch).

    Args:
      n: matmul size (n x n times n x n).
      mbytes: size of the summed array in MB (well beyond the caches).
      reps: repetitions; the best one counts (a peak is the best the device can do).
      torch_device: torch device for the torch figures ("cpu" or "cuda").
    """
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3
    ja = jnp.asarray(a)
    jmm = jax.jit(lambda x: x @ x)
    ta = torch.from_numpy(a).to(torch_device)

    def tsync():
        if torch_device.startswith("cuda"):
            torch.cuda.synchronize()

    matmul = {
        "numpy": flops / _best(lambda: a @ a, reps) / 1e9,
        "jax": flops / _best(lambda: jmm(ja).block_until_ready(), reps) / 1e9,
        "torch": flops / _best(lambda: (ta @ ta, tsync()), reps) / 1e9,
    }

    # Read bandwidth: a float32 sum streams the array once and writes nothing (a copy would
    # also count the allocation of a fresh output in jax, which is not what is asked).
    count = mbytes * 2**20 // 4
    src = np.ones(count, np.float32)
    moved = src.nbytes
    jsrc = jnp.asarray(src)
    jsum = jax.jit(jnp.sum)
    tsrc = torch.from_numpy(src).to(torch_device)
    bandwidth = {
        "numpy": moved / _best(lambda: src.sum(), reps) / 1e9,
        "jax": moved / _best(lambda: jsum(jsrc).block_until_ready(), reps) / 1e9,
        "torch": moved / _best(lambda: (tsrc.sum(), tsync()), reps) / 1e9,
    }
    return DeviceLimits(matmul, bandwidth, n, mbytes)


def floor_seconds(flops: float, bytes_read: float, limits: DeviceLimits) -> dict[str, float]:
    """The FLOP floor (flops / peak) and the memory floor (bytes / bandwidth) in seconds."""
    return {
        "flop_floor_s": flops / (limits.peak_gflops * 1e9),
        "memory_floor_s": bytes_read / (limits.peak_bandwidth_gbs * 1e9),
    }


def annotate(row: dict, flops: float, bytes_read: float, limits: DeviceLimits | None = None) -> dict:
    """Adds the work of a result (flops, flops_per_char, bytes_read, achieved_gflops), and the
    floors if `limits` is given (see `apply_floors`)."""
    row["flops"] = float(flops)
    row["flops_per_char"] = float(flops) / row["chars"]
    row["bytes_read"] = float(bytes_read)
    row["achieved_gflops"] = float(flops) / row["seconds"] / 1e9
    if limits is not None:
        apply_floors(row, limits)
    return row


def apply_floors(row: dict, limits: DeviceLimits) -> dict:
    """flop_floor_s, memory_floor_s, floor_fraction (FLOP floor / median time) and
    roofline_fraction (the larger floor / median time) of a row that `annotate` filled."""
    if "flops" in row:
        floors = floor_seconds(row["flops"], row["bytes_read"], limits)
        row.update(floors)
        row["floor_fraction"] = floors["flop_floor_s"] / row["seconds"]
        row["roofline_fraction"] = max(floors.values()) / row["seconds"]
    return row


def merge_limits(a: DeviceLimits | None, b: DeviceLimits) -> DeviceLimits:
    """The better figure of two measurements for each framework (a peak is a maximum)."""
    if a is None:
        return b
    best = lambda x, y: {k: max(x[k], y[k]) for k in x}
    return DeviceLimits(best(a.matmul_gflops, b.matmul_gflops), best(a.bandwidth_gbs, b.bandwidth_gbs),
                        a.matmul_size, a.bandwidth_mbytes)
