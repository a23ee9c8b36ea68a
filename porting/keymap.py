"""The one mapping between the notebooks' torch state-dict keys and jaxgpt's Flax parameter paths.

`TABLE` below is the whole mapping. Each row is one Flax parameter: its path, its shape in
symbols, its torch key in each notebook variant (None: the variant has no such parameter) and
the transform between the two layouts:

  copy       same array (embeddings, biases, LayerNorm weight -> scale, bias -> bias)
  transpose  torch `nn.Linear.weight` [out, in]  <->  Flax kernel (in, out)
  qkv        the 3*H per-head torch weights [K, D]  <->  one fused kernel (D, 3, H, K):
             kernel[:, c, j, :] = W_{c,j}.T with c = 0 query, 1 key, 2 value
  out        torch `compute.weight` [D, H*K]  <->  out_kernel (H, K, D) = weight.T.reshape(H, K, D)
             (the heads are concatenated in order j = 0..H-1 before `compute`)

Symbols: V vocab_size, C context_length, D model_dim, H num_heads, K head_size = D / H,
F hidden = 4D. `{i}` is the block index, `{j}` the head index, `{c}` one of key/query/value.

The same table gives the variant of a state dict (from its key names), the whole configuration
(from shapes and key indices), the expected keys and shapes of a configuration in torch's own
order, and the conversions both ways. All functions are pure and work on numpy arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from jaxgpt.config import VARIANTS, GPTConfig
from porting.errors import CheckpointError, summarize

COPY, TRANSPOSE, QKV, OUT = "copy", "transpose", "qkv", "out"
QKV_AXIS_ORDER = ("query", "key", "value")  # axis 1 of the fused Flax kernel
TORCH_HEAD_ORDER = ("key", "query", "value")  # registration order in the notebooks' head modules
TORCH, FLAX = "torch", "flax"  # the two key-naming schemes


@dataclasses.dataclass(frozen=True)
class Row:
    """One Flax parameter and its torch counterpart(s); see the module docstring."""

    flax: str
    shape: tuple[str | int, ...]  # the Flax shape, in symbols
    drake: str | None
    learning: str | None
    transform: str

    def name(self, scheme: str, variant: str) -> str | None:
        """The key pattern in `scheme` for `variant`, None if the variant lacks the parameter."""
        torch_name = self.drake if variant == "drake" else self.learning
        if scheme == TORCH or torch_name is None:
            return torch_name
        return self.flax

    def symbolic_shape(self, scheme: str) -> tuple[str | int, ...]:
        if scheme == FLAX or self.transform == COPY:
            return self.shape
        if self.transform == TRANSPOSE:
            return self.shape[::-1]
        return ("K", "D") if self.transform == QKV else ("D", "D")  # OUT: [D_out, H*K = D_in]

    @property
    def per_block(self) -> bool:
        return "{i}" in self.flax


_D = "transformer_blocks.{i}"  # drake block prefix
_L = "blocks.{i}"  # learning block prefix
TABLE: tuple[Row, ...] = (
    Row("token_embedding.embedding", ("V", "D"), "token_embedding.weight", "token_embeddings.weight", COPY),
    Row("pos_embedding.embedding", ("C", "D"), "pos_embedding.weight", "pos_embeddings.weight", COPY),
    # per block, in torch's registration order
    Row("blocks.{i}.attention.qkv", ("D", 3, "H", "K"), _D + ".mhsa.attention_heads.{j}.{c}_layer.weight",
        _L + ".attention.att_heads.{j}.{c}_gen.weight", QKV),
    Row("blocks.{i}.attention.out_kernel", ("H", "K", "D"), _D + ".mhsa.compute.weight", None, OUT),
    Row("blocks.{i}.attention.out_bias", ("D",), _D + ".mhsa.compute.bias", None, COPY),
    Row("blocks.{i}.mlp.up.kernel", ("D", "F"), _D + ".vanilla_nn.first_linear_layer.weight",
        _L + ".linear_network.up_projection.weight", TRANSPOSE),
    Row("blocks.{i}.mlp.up.bias", ("F",), _D + ".vanilla_nn.first_linear_layer.bias",
        _L + ".linear_network.up_projection.bias", COPY),
    Row("blocks.{i}.mlp.down.kernel", ("F", "D"), _D + ".vanilla_nn.second_linear_layer.weight",
        _L + ".linear_network.down_projection.weight", TRANSPOSE),
    Row("blocks.{i}.mlp.down.bias", ("D",), _D + ".vanilla_nn.second_linear_layer.bias",
        _L + ".linear_network.down_projection.bias", COPY),
    Row("blocks.{i}.norm1.scale", ("D",), _D + ".layer_norm_one.weight", _L + ".first_norm.weight", COPY),
    Row("blocks.{i}.norm1.bias", ("D",), _D + ".layer_norm_one.bias", _L + ".first_norm.bias", COPY),
    Row("blocks.{i}.norm2.scale", ("D",), _D + ".layer_norm_two.weight", _L + ".second_norm.weight", COPY),
    Row("blocks.{i}.norm2.bias", ("D",), _D + ".layer_norm_two.bias", _L + ".second_norm.bias", COPY),
    # after the blocks
    Row("final_norm.scale", ("D",), "layer_norm_three.weight", "final_ln.weight", COPY),
    Row("final_norm.bias", ("D",), "layer_norm_three.bias", "final_ln.bias", COPY),
    Row("vocab_projection.kernel", ("D", "V"), "vocab_projection.weight", "vocab_projection.weight", TRANSPOSE),
    Row("vocab_projection.bias", ("V",), "vocab_projection.bias", "vocab_projection.bias", COPY),
)


# ----------------------------------------------------------------------------- layouts
def _dims(config: GPTConfig) -> dict[str, int]:
    return {"V": config.vocab_size, "C": config.context_length, "D": config.model_dim,
            "H": config.num_heads, "K": config.head_size, "F": config.hidden_dim}


def _expand(row: Row, scheme: str, config: GPTConfig, i: int | None):
    """Yields (key, j, c) for one row and block: 3*H keys for torch qkv, else one key."""
    pattern = row.name(scheme, config.variant)
    if scheme == TORCH and row.transform == QKV:
        for j in range(config.num_heads):
            for proj in TORCH_HEAD_ORDER:
                yield pattern.format(i=i, j=j, c=proj), j, QKV_AXIS_ORDER.index(proj)
    else:
        yield pattern.format(i=i), None, None


def _walk(scheme: str, config: GPTConfig):
    """Yields (row, i, key, j, c) for every parameter of `config`, in torch's state_dict order."""
    rows = [r for r in TABLE if r.name(scheme, config.variant) is not None]
    first = next(k for k, r in enumerate(rows) if r.per_block)
    last = max(k for k, r in enumerate(rows) if r.per_block)
    plan = [(r, None) for r in rows[:first]]
    plan += [(r, i) for i in range(config.num_blocks) for r in rows[first : last + 1]]
    plan += [(r, None) for r in rows[last + 1 :]]
    for row, i in plan:
        for key, j, c in _expand(row, scheme, config, i):
            yield row, i, key, j, c


def layout(config: GPTConfig, scheme: str = TORCH) -> dict[str, tuple[int, ...]]:
    """Every key of a checkpoint of `config` with its shape.

    Args:
      config: the model configuration (its variant picks the key names).
      scheme: "torch" (the notebook's state_dict keys, in torch's own order) or "flax"
        (jaxgpt's parameter paths, e.g. "blocks.0.attention.qkv").

    Returns:
      Ordered key -> shape.
    """
    dims = _dims(config)
    return {key: tuple(dims[s] if isinstance(s, str) else s for s in row.symbolic_shape(scheme))
            for row, _, key, _, _ in _walk(scheme, config)}


# ----------------------------------------------------------------------------- recognition
def _regex(pattern: str) -> re.Pattern:
    index = r"(0|[1-9][0-9]{0,8})"  # no leading zeros: "blocks.01" is not block 1
    body = re.escape(pattern).replace(r"\{i\}", f"(?P<i>{index})").replace(r"\{j\}", f"(?P<j>{index})")
    return re.compile(body.replace(r"\{c\}", "(?P<c>key|query|value)"))


_PATTERNS = {(s, v, r.flax): _regex(r.name(s, v)) for s in (TORCH, FLAX) for v in VARIANTS for r in TABLE
             if r.name(s, v) is not None}


# Per naming, one regex matching any of its keys (the named groups dropped: they would repeat).
_NAMING = {(s, v): re.compile("|".join(f"(?:{re.sub(r'[?]P<[a-z]>', '?:', p.pattern)})"
                                       for (s2, v2, _), p in _PATTERNS.items() if (s2, v2) == (s, v)))
           for s in (TORCH, FLAX) for v in VARIANTS}


def _matches(key: str, scheme: str, variant: str) -> bool:
    return _NAMING[(scheme, variant)].fullmatch(key) is not None


def detect_naming(keys, source: str = "<state dict>") -> tuple[str, str]:
    """The key-naming scheme and the variant of a set of keys.

    Only names count that belong to one candidate alone (e.g. `vocab_projection.bias` is in
    every naming), and the candidate with the most such names wins.

    Args:
      keys: the state dict's keys.
      source: the file, for error messages.

    Returns:
      (scheme, variant): scheme "torch" or "flax", variant "drake" or "learning".

    Raises:
      CheckpointError: no key (or as many keys of two candidates) identifies a naming.
    """
    keys = list(keys)
    candidates = [(TORCH, "drake"), (TORCH, "learning"), (FLAX, "drake")]  # flax drake names include learning's
    scores = {}
    for cand in candidates:
        others = [o for o in candidates if o != cand]
        scores[cand] = sum(1 for k in keys if _matches(k, *cand) and not any(_matches(k, *o) for o in others))
    ranked = sorted(scores.values(), reverse=True)
    if ranked[0] == 0 or ranked[0] == ranked[1]:
        shown = summarize(sorted(keys, key=natural_key), 5) if keys else "no keys at all"
        raise CheckpointError(
            source,
            f"cannot recognise the model variant: the key names are neither the drake notebook's "
            f"(token_embedding.weight, transformer_blocks.N...) nor the learning notebook's "
            f"(token_embeddings.weight, blocks.N...); keys: {shown}",
        )
    scheme, variant = max(scores, key=scores.get)
    if scheme == FLAX:  # the attention output projection is what tells the variants apart
        has_out = any(_PATTERNS[(FLAX, "drake", r.flax)].fullmatch(k) for k in keys for r in TABLE if r.learning is None)
        variant = "drake" if has_out else "learning"
    return scheme, variant


def infer_config(state: Mapping[str, np.ndarray], scheme: str, variant: str, source: str = "<state dict>",
                 dropout: float = 0.2) -> GPTConfig:
    """The configuration that a state dict's shapes and key indices describe.

    vocab_size, context_length and model_dim come from the first key (in table order) whose
    shape holds them (token embedding, then position embedding, ...); num_blocks and (torch)
    num_heads from the largest block and head index; (flax) num_heads from the qkv kernel.
    The result is not yet checked against every key: see `check_layout`.

    Args:
      state: key -> array (anything with `.shape`).
      scheme, variant: from `detect_naming`.
      source: the file, for error messages.
      dropout: the dropout rate of the returned config (not stored in checkpoints).

    Raises:
      CheckpointError: a dimension has no key to infer it from, or the dimensions found are
        not a valid configuration (e.g. model_dim not divisible by num_heads).
    """
    found: dict[str, int] = {}
    blocks = heads = 0
    for row in TABLE:
        regex = _PATTERNS.get((scheme, variant, row.flax))
        if regex is None:
            continue
        symbols = row.symbolic_shape(scheme)
        for key, value in state.items():
            m = regex.fullmatch(key)
            if not m:
                continue
            if "i" in m.groupdict():
                blocks = max(blocks, int(m["i"]) + 1)
            if "j" in m.groupdict():
                heads = max(heads, int(m["j"]) + 1)
            shape = tuple(value.shape)
            if len(shape) == len(symbols):
                for sym, n in zip(symbols, shape):
                    if sym in ("V", "C", "D", "H") and sym not in found:
                        found[sym] = n
    if scheme == TORCH and heads:
        found["H"] = heads
    if blocks:
        found["N"] = blocks
    if blocks > len(state) or heads > len(state):
        # A complete checkpoint has several keys per block and per head.
        raise CheckpointError(source, f"block/head indices (up to {max(blocks, heads) - 1}) exceed the {len(state)} keys present")
    names = {"V": "vocab_size", "C": "context_length", "D": "model_dim", "N": "num_blocks", "H": "num_heads"}
    lacking = [names[s] for s in names if s not in found]
    if lacking:
        raise CheckpointError(source, f"cannot infer {', '.join(lacking)} of the {variant} model: the keys that hold it are missing")
    try:
        return GPTConfig(vocab_size=found["V"], context_length=found["C"], model_dim=found["D"],
                         num_blocks=found["N"], num_heads=found["H"], variant=variant, dropout=dropout)
    except ValueError as e:
        raise CheckpointError(source, f"the shapes describe no valid model: {e}") from None


def natural_key(key: str):
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def describe(config: GPTConfig) -> str:
    return (f"{config.variant} model (vocab_size={config.vocab_size}, context_length={config.context_length}, "
            f"model_dim={config.model_dim}, num_blocks={config.num_blocks}, num_heads={config.num_heads})")


def check_layout(state: Mapping[str, np.ndarray], config: GPTConfig, scheme: str, source: str = "<state dict>") -> None:
    """Checks that `state` has exactly the keys and shapes of `config`, with floating values.

    Raises:
      CheckpointError: one message listing every missing key, every unexpected key, each
        shape mismatch (expected and found), each non-floating dtype and each tensor with
        NaN or infinite values.
    """
    expected = layout(config, scheme)
    missing = sorted((k for k in expected if k not in state), key=natural_key)
    unexpected = sorted((k for k in state if k not in expected), key=natural_key)
    shapes, dtypes, nonfinite = [], [], []
    for key, shape in expected.items():
        if key not in state:
            continue
        value = state[key]
        if tuple(value.shape) != shape:
            shapes.append(f"{key} expected {list(shape)} found {list(value.shape)}")
        elif value.dtype.kind != "f" and not str(value.dtype).startswith("bfloat16"):
            dtypes.append(f"{key} is {value.dtype}")
        else:
            values = np.asarray(value, dtype=np.float32)
            # One pass without a temporary: the sum is finite unless a value is not (or the sum
            # overflows, which the exact count then tells apart).
            with np.errstate(over="ignore", invalid="ignore"):
                total = values.sum()
            if not np.isfinite(total):
                nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
                if nan or inf:
                    nonfinite.append(f"{key} ({nan} NaN, {inf} inf)")
    problems = []
    for what, items in (("missing key", missing), ("unexpected key", unexpected), ("shape mismatch", shapes),
                        ("non-floating tensor", dtypes), ("tensor with non-finite values", nonfinite)):
        if items:
            label = what if len(items) == 1 else what.replace("key", "keys").replace("mismatch", "mismatches").replace("tensor", "tensors")
            problems.append(f"{len(items)} {label}: {summarize(items)}")
    if problems:
        raise CheckpointError(source, f"does not match the inferred {describe(config)}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- conversions
ALIGNMENT = 64  # bytes


def aligned_arrays(shapes) -> list[np.ndarray]:
    """New uninitialised float32 arrays of `shapes` in one allocation, each starting at a
    multiple of `ALIGNMENT` bytes.

    XLA:CPU adopts a host array this aligned as its device buffer instead of copying it, and
    one large allocation gets huge pages (numpy advises them from 4 MiB), where many small
    ones are faulted in 4 KiB at a time.
    """
    step = ALIGNMENT // 4
    sizes = [math.prod(shape) for shape in shapes]
    raw = np.empty(sum(n + -n % step for n in sizes) + step, np.float32)
    at = (-raw.ctypes.data % ALIGNMENT) // 4
    arrays = []
    for shape, n in zip(shapes, sizes):
        arrays.append(raw[at : at + n].reshape(shape))
        at += n + -n % step
    return arrays


def aligned_copies(values) -> list[np.ndarray]:
    """`values` as new float32 arrays from `aligned_arrays`."""
    values = list(values)
    arrays = aligned_arrays([tuple(v.shape) for v in values])
    for array, value in zip(arrays, values):
        np.copyto(array, value, casting="unsafe")
    return arrays


def params_from_state_dict(state: Mapping[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Torch state dict -> Flax parameters (flat path -> float32 array). Run `check_layout` first.

    Args:
      state: torch key -> array with the shapes of `layout(config, "torch")` (any float dtype).
      config: the model configuration.

    Returns:
      Flax path (e.g. "blocks.0.attention.qkv") -> new contiguous float32 array, from
      `aligned_arrays` (none shares memory with `state`).
    """
    shapes = layout(config, FLAX)
    params = dict(zip(shapes, aligned_arrays(list(shapes.values()))))
    d = config.model_dim
    for row, i, key, j, c in _walk(TORCH, config):
        out, w = params[row.flax.format(i=i)], state[key]
        if row.transform == QKV:
            out[:, c, j, :] = w.T
        elif row.transform == OUT:
            out.reshape(d, d)[...] = w.T
        elif row.transform == TRANSPOSE:
            out[...] = w.T
        else:
            out[...] = w
    return params


def state_dict_from_params(params: Mapping[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Flax parameters -> torch state dict (float32, keys in torch's own order).

    Args:
      params: Flax path -> array with the shapes of `layout(config, "flax")`.
      config: the model configuration (its variant picks the torch key names).

    Returns:
      Ordered torch key -> contiguous float32 array.
    """
    d = config.model_dim
    state: dict[str, np.ndarray] = collections.OrderedDict()
    for row, i, key, j, c in _walk(TORCH, config):
        p = np.asarray(params[row.flax.format(i=i)], dtype=np.float32)
        if row.transform == QKV:
            p = p[:, c, j, :].T
        elif row.transform == OUT:
            p = p.reshape(d, d).T
        elif row.transform == TRANSPOSE:
            p = p.T
        state[key] = np.array(p, dtype=np.float32, order="C")
    return state
