"""Does a ported model compute the notebook's function? Per-layer differences against torch.

The same checkpoint is loaded into jaxgpt (`porting.load_weights`) and into the torch
reference in the notebook's per-head structure (`porting.torch_reference`), and both are run
on the same token windows. Every layer's output is compared: the embeddings sum, each block's
output (the residual stream), the final LayerNorm and the logits. A float64 run of the torch
reference (the closest thing to the exact function) measures each float32 side's own error,
so jaxgpt's numerics can be held to torch's.

With `float64=True` both frameworks run in float64 (JAX's x64 mode, torch `.double()`): their
differences then fall to rounding of float64 (about 1e-13), which shows the two compute the
same function rather than nearly the same one.

Generation agreement: float32 runs jaxgpt's real engine (`generate_tokens`) against the
reference loop (`inverse_cdf_generate`, argmax for greedy, jaxgpt's own uniforms for
sampling); float64 runs the notebook's loop in both frameworks with one float64 inverse-CDF
pick in numpy (the engine and the torch sampler work in float32).
"""

from __future__ import annotations

import contextlib

import numpy as np

LAYER_TOLERANCE = 5e-5  # Hugging Face's pt-to-tf check holds every hidden state to this
FLOAT64_TOLERANCE = 1e-12


def layer_names(config) -> list[str]:
    return ["embeddings", *(f"block {i}" for i in range(config.num_blocks)), "final_norm", "logits"]


def jax_layers(model):
    """A jitted `tokens (B, T) -> [embeddings, block outputs..., final norm, logits]`.

    Walks the model's own modules in the order `GPT.__call__` does (embedding sum, blocks,
    final norm, vocabulary projection), so each intermediate is the model's, not a rewrite.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        x = m.token_embedding(tokens) + m.pos_embedding(jnp.arange(tokens.shape[1]))[None]  # (B, T, D)
        outs = [x]
        for block in m.blocks:
            x, _ = block(x)
            outs.append(x)
        x = m.final_norm(x)
        outs.append(x)
        outs.append(m.vocab_projection(x))  # (B, T, V)
        return outs

    return lambda tokens: [np.asarray(o) for o in run(state, np.asarray(tokens, np.int32))]


def torch_layers(reference, tokens) -> list[np.ndarray]:
    """The same intermediates from the torch reference (either variant's module names)."""
    import torch

    drake = hasattr(reference, "transformer_blocks")
    tok = reference.token_embedding if drake else reference.token_embeddings
    pos = reference.pos_embedding if drake else reference.pos_embeddings
    blocks = reference.transformer_blocks if drake else reference.blocks
    final = reference.layer_norm_three if drake else reference.final_ln
    with torch.no_grad():
        context = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        x = tok(context) + pos(torch.arange(context.shape[1]))
        outs = [x]
        for block in blocks:
            x = block(x)
            outs.append(x)
        x = final(x)
        outs.append(x)
        outs.append(reference.vocab_projection(x))
    return [o.numpy() for o in outs]


def differences(a: list[np.ndarray], b: list[np.ndarray], names: list[str]) -> list[dict]:
    """Per layer: max and mean |a - b| (computed in float64) and the largest |b|."""
    rows = []
    for name, x, y in zip(names, a, b):
        d = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
        rows.append({"layer": name, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                     "max_abs_value": float(np.abs(np.asarray(y, np.float64)).max())})
    return rows


def text_windows(text_ids: np.ndarray, batch: int, length: int) -> np.ndarray:
    """`batch` windows of `length` tokens spread evenly over a text (int32 `(batch, length)`)."""
    if text_ids.size < length:
        raise ValueError(f"the text has {text_ids.size} characters, fewer than one window of {length}")
    starts = np.linspace(0, text_ids.size - length, batch).astype(np.int64)
    return np.stack([text_ids[s : s + length] for s in starts]).astype(np.int32)


def random_windows(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


def _agreement(a, b) -> dict:
    equal = np.asarray(a) == np.asarray(b)
    mismatch = np.flatnonzero(~equal.all(axis=0))
    return {"tokens": int(equal.size), "agreement": float(equal.mean()),
            "first_divergence": int(mismatch[0]) if mismatch.size else None}


def _pick(logits: np.ndarray, u: float) -> int:
    """Inverse-CDF pick in float64: the first index whose cumulative probability exceeds u."""
    p = np.exp(logits - logits.max())
    cdf = np.cumsum(p)
    return int(min(np.sum(cdf <= u * cdf[-1]), logits.size - 1))


def _loop(last_logits, num_new: int, uniforms=None) -> np.ndarray:
    """The notebook's loop from the seed context [0]: greedy when `uniforms` is None."""
    context = [0]
    out = []
    for step in range(num_new):
        logits = np.asarray(last_logits(context), np.float64)
        nxt = int(np.argmax(logits)) if uniforms is None else _pick(logits, float(uniforms[step]))
        context.append(nxt)
        out.append(nxt)
    return np.array(out)[None]


def _generation(model, reference, num_new: int, seed: int, float64: bool) -> dict:
    import torch

    from jaxgpt.sampling import sampling_uniforms

    c = model.config.context_length
    uniforms = sampling_uniforms(seed, 1, num_new)
    if not float64:
        from jaxgpt.generate import generate_tokens
        from porting.torch_reference import inverse_cdf_generate

        seed_context = np.zeros((1, 1), np.int64)
        greedy = (generate_tokens(model, seed_context, num_new, temperature=0),
                  inverse_cdf_generate(reference, torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, num_new), c,
                                       temperature=0).numpy())
        sampled = (generate_tokens(model, seed_context, num_new, seed=seed),
                   inverse_cdf_generate(reference, torch.zeros((1, 1), dtype=torch.long), torch.tensor(uniforms), c).numpy())
        how = "jaxgpt generate_tokens vs the reference loop (inverse_cdf_generate)"
    else:
        import jax
        from flax import nnx

        graphdef, state = nnx.split(model)
        # One compiled shape: the window padded to C (causal, so the padding changes nothing).
        forward = jax.jit(lambda st, x, i: nnx.merge(graphdef, st)(x)[0, i])

        def jax_last(context):
            window = context[-c:]
            padded = np.zeros((1, c), np.int32)
            padded[0, : len(window)] = window
            return forward(state, padded, len(window) - 1)

        def torch_last(context):
            with torch.no_grad():
                return reference(torch.tensor([context[-c:]], dtype=torch.long))[0, -1].numpy()

        greedy = (_loop(jax_last, num_new), _loop(torch_last, num_new))
        sampled = (_loop(jax_last, num_new, uniforms[0]), _loop(torch_last, num_new, uniforms[0]))
        how = "the notebook's loop in both frameworks, float64 inverse-CDF picks with jaxgpt's uniforms"
    return {"greedy": _agreement(*greedy), "sampled": {**_agreement(*sampled), "seed": seed}, "how": how}


def report(path, tokens: np.ndarray, *, float64: bool = False, tolerance: float | None = None,
           num_new: int = 1000, seed: int = 0) -> dict:
    """The parity report of one checkpoint on `tokens` `(B, T)` windows.

    Args:
      path: any checkpoint `porting.load_weights` reads.
      tokens: int `(B, T)` windows, T <= context_length.
      float64: run both frameworks in float64 (default: float32, with torch float64 as truth).
      tolerance: the largest max-abs difference allowed in any layer (default 5e-5, or 1e-12
        with float64).
      num_new: tokens generated for the greedy and the sampled agreement (0: none).
      seed: the sampling seed (jaxgpt's stream (seed, 0)).

    Returns:
      {"layers": [{"layer", "max_abs_diff", "mean_abs_diff", "max_abs_value", (float32 only)
      "jax_vs_float64": {...}, "torch_vs_float64": {...}}], "generation": {...}, "passed": bool,
      "worst_layer", "tolerance", "dtype", "windows": [B, T], ...}.
    """
    import jax
    import torch

    from porting import keymap
    from porting.load import load_weights, read_checkpoint
    from porting.torch_reference import reference_from_config

    tolerance = tolerance if tolerance is not None else (FLOAT64_TOLERANCE if float64 else LAYER_TOLERANCE)
    checkpoint = read_checkpoint(path)
    config = checkpoint.config
    names = layer_names(config)
    state = {k: torch.from_numpy(v) for k, v in keymap.state_dict_from_params(checkpoint.params, config).items()}
    reference = reference_from_config(config)
    reference.load_state_dict(state, strict=True)
    reference64 = reference_from_config(config).double()
    reference64.load_state_dict(state, strict=True)
    reference64.eval()
    x64 = jax.enable_x64(True) if float64 else contextlib.nullcontext()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's many tiny per-head ops run fastest on one thread
    try:
        return _run(path, tokens, checkpoint, reference, reference64, names, tolerance, float64, num_new, seed, x64)
    finally:
        torch.set_num_threads(threads)


def _run(path, tokens, checkpoint, reference, reference64, names, tolerance, float64, num_new, seed, x64) -> dict:
    import jax

    from porting.load import load_weights

    config = checkpoint.config
    with x64:
        model = load_weights(path)
        if float64:
            from flax import nnx

            params = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(lambda p: p.astype(np.float64), params))
            for _, module in nnx.iter_graph(model):
                if isinstance(module, nnx.Embed):  # it computes in its own dtype, float32 by default
                    module.dtype = np.float64
        ours = jax_layers(model)(tokens)
        truth = torch_layers(reference64, tokens)
        layers = differences(ours, truth if float64 else torch_layers(reference, tokens), names)
        if not float64:
            theirs32 = torch_layers(reference, tokens)
            for row, j, t in zip(layers, differences(ours, truth, names), differences(theirs32, truth, names)):
                row["jax_vs_float64"] = {"max": j["max_abs_diff"], "mean": j["mean_abs_diff"]}
                row["torch_vs_float64"] = {"max": t["max_abs_diff"], "mean": t["mean_abs_diff"]}
        generation = _generation(model, reference64 if float64 else reference, num_new, seed, float64) if num_new else None
    worst = max(layers, key=lambda r: r["max_abs_diff"])
    return {
        "path": checkpoint.path, "variant": config.variant, "dtype": "float64" if float64 else "float32",
        "windows": list(tokens.shape), "tolerance": tolerance, "layers": layers, "generation": generation,
        "worst_layer": worst["layer"], "worst_max_abs_diff": worst["max_abs_diff"],
        "passed": all(r["max_abs_diff"] <= tolerance for r in layers),
    }
