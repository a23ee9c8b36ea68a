"""The strongest torch baseline we know how to write for the notebook's generation.

What a strong torch user writes instead of the notebook's loop, with the same semantics
(every step after the window is full re-encodes the last `context_length` tokens at
positions 0..C-1, because the learned absolute positions shift):

- `torch.inference_mode()` (no autograd bookkeeping at all);
- the per-head query/key/value `nn.Linear`s fused into one `(3D, D)` matmul;
- `F.scaled_dot_product_attention` (fused causal attention kernel);
- a static-shape key/value cache `(B, H, C, K)` per block while the context grows: each
  new character costs one single-position forward instead of a forward over the context;
- once the window is full, one `(B, C)` forward per character whose final norm and vocabulary
  projection run on the last position only;
- a preallocated token buffer (no `torch.cat` per step);
- optionally `torch.compile` of the two step functions (both have static shapes, so each
  compiles once; whether it helps is measured by the suite, not assumed);
- the intra-op thread count that is fastest on the machine (`benchmarks.threads`: on a
  small, busy CPU one thread can beat the default for these small matmuls; measured by
  the suite, not assumed).

Weights are loaded from the same notebook state dict as the reference model
(`porting.torch_reference`), both variants, through porting's key table. `TunedGPT.forward` matches the reference's logits
to float32 rounding (the suite checks 1e-5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

class TunedBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, h = config.model_dim, config.num_heads
        self.num_heads, self.head_size = h, config.head_size
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # rows: [q heads 0..H-1, k heads, v heads]
        self.out = nn.Linear(d, d) if config.variant == "drake" else None
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, config.hidden_dim)
        self.down = nn.Linear(config.hidden_dim, d)

    def _split(self, x):  # (B, T, 3D) -> three (B, H, T, K)
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)

    def _finish(self, x, heads):  # heads (B, H, T, K)
        b, _, t, _ = heads.shape
        a = heads.transpose(1, 2).reshape(b, t, -1)
        x = x + (self.out(a) if self.out is not None else a)
        return x + self.down(F.relu(self.up(self.norm2(x))))

    def window(self, x, cache=None):
        """Causal forward over positions 0..T-1; optionally writes k, v into `cache[:, :, :T]`."""
        q, k, v = self._split(self.norm1(x))
        if cache is not None:
            cache[0][:, :, : k.shape[2]] = k
            cache[1][:, :, : v.shape[2]] = v
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x, pos, mask, cache):
        """One position `pos` (a 1-element long tensor) attending to cached positions <= pos."""
        q, k, v = self._split(self.norm1(x))  # (B, H, 1, K)
        cache[0].index_copy_(2, pos, k)
        cache[1].index_copy_(2, pos, v)
        heads = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=mask)
        return self._finish(x, heads)


class TunedGPT(nn.Module):
    """Fused-head GPT with a static KV cache. Build with `TunedGPT.from_state_dict`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.model_dim
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.pos_embedding = nn.Embedding(config.context_length, d)
        self.blocks = nn.ModuleList([TunedBlock(config) for _ in range(config.num_blocks)])
        self.final_norm = nn.LayerNorm(d)
        self.vocab_projection = nn.Linear(d, config.vocab_size)
        self.eval()

    @classmethod
    def from_state_dict(cls, state_dict, config) -> "TunedGPT":
        """Loads a notebook state dict (variant `config.variant`) into fused parameters.

        The key names and layouts are porting's (`porting.keymap.TABLE`): the state dict is
        checked against them and converted to jaxgpt's parameter layout, whose fused qkv
        kernel `(D, 3, H, K)` is the transpose of this model's `(3D, D)` projection.

        Raises:
          porting.CheckpointError: a missing or unexpected key or a wrong shape, named.
        """
        from porting import keymap

        state = {k: v.detach().float().cpu().numpy() for k, v in state_dict.items()}
        keymap.check_layout(state, config, keymap.TORCH)
        p = keymap.params_from_state_dict(state, config)
        d = config.model_dim
        model = cls(config)

        def put(module, weight, bias=None, kernel=True):
            # A Flax kernel is (in, out); a torch weight [out, in].
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(p[weight].T if kernel else p[weight])))
            if bias is not None:
                module.bias.copy_(torch.from_numpy(p[bias]))

        with torch.no_grad():
            put(model.token_embedding, "token_embedding.embedding", kernel=False)
            put(model.pos_embedding, "pos_embedding.embedding", kernel=False)
            for i, block in enumerate(model.blocks):
                b = f"blocks.{i}."
                p[b + "qkv"] = p[b + "attention.qkv"].reshape(d, 3 * d)  # columns: q heads, k heads, v heads
                put(block.qkv, b + "qkv")
                if block.out is not None:
                    p[b + "out"] = p[b + "attention.out_kernel"].reshape(d, d)
                    put(block.out, b + "out", b + "attention.out_bias")
                put(block.norm1, b + "norm1.scale", b + "norm1.bias", kernel=False)
                put(block.norm2, b + "norm2.scale", b + "norm2.bias", kernel=False)
                put(block.up, b + "mlp.up.kernel", b + "mlp.up.bias")
                put(block.down, b + "mlp.down.kernel", b + "mlp.down.bias")
            put(model.final_norm, "final_norm.scale", "final_norm.bias", kernel=False)
            put(model.vocab_projection, "vocab_projection.kernel", "vocab_projection.bias")
        return model

    def _head(self, x):
        return self.vocab_projection(self.final_norm(x))

    def forward(self, tokens):
        """Logits `(B, T, V)` of int tokens `(B, T)`, T <= context_length (no cache)."""
        x = self.token_embedding(tokens) + self.pos_embedding.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block.window(x)
        return self._head(x)

    def window_last(self, tokens, caches=None):
        """Logits `(B, V)` of the last position of `tokens` at positions 0..T-1; fills caches if given."""
        x = self.token_embedding(tokens) + self.pos_embedding.weight[: tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block.window(x, None if caches is None else caches[i])
        return self._head(x[:, -1])

    def step(self, token, pos, caches):
        """Logits `(B, V)` of `token` `(B, 1)` at position `pos` (long tensor `(1,)`), using the caches."""
        c = self.config.context_length
        mask = (torch.arange(c, device=token.device) <= pos)[None, None, None, :]  # (1, 1, 1, C)
        x = self.token_embedding(token) + self.pos_embedding(pos)[None]
        for i, block in enumerate(self.blocks):
            x = block.step(x, pos, mask, caches[i])
        return self._head(x[:, -1])

    def new_caches(self, batch, device=None):
        c = self.config
        shape = (batch, c.num_heads, c.context_length, c.head_size)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(c.num_blocks)]


def _fresh(x):
    """A copy with standard strides. A slice of the token buffer has strides that depend on
    the buffer's width (num_new); torch.compile guards on strides and would recompile for
    every new length."""
    return x.clone(memory_format=torch.contiguous_format)


class TunedGenerator:
    """Notebook-semantics generation with `TunedGPT`, eager or `torch.compile`d.

    The loop mirrors jaxgpt's engine so that both modes have a torch twin: a cache base
    `base` (stream index of cache position 0); a step whose context would exceed C keeps the
    last `keep` tokens and re-encodes them at positions 0..keep-1 (refilling the cache when
    cached steps follow), every other step decodes one token from the cache. `keep = C` is
    the notebook's exact loop; `keep = C + 1 - stride` is jaxgpt's strided mode.

    Args:
      model: a `TunedGPT`.
      compile: compile the step and window functions with `torch.compile` (default inductor
        backend, static shapes: one compilation per batch size and window length).
    """

    def __init__(self, model: TunedGPT, compile: bool = False):
        self.model = model
        self.compiled = compile
        self._step = model.step
        self._window = model.window_last
        if compile:
            self._step = torch.compile(model.step, dynamic=False)
            self._window = torch.compile(model.window_last, dynamic=False)

    @torch.inference_mode()
    def generate(self, context, num_new, *, keep=None, generator=None, uniforms=None, on_token=None):
        """Generates `num_new` tokens per row after the int64 prompt `context` `(B, T0)`, T0 >= 1.

        Args:
          context: int64 `(B, T0)` prompt (the notebook's is `[[0]]`); T0 > C keeps the last C.
          num_new: tokens per row.
          keep: tokens kept when the window overflows (default C: exact).
          generator: `torch.Generator` for `torch.multinomial` sampling (the notebook's rule).
          uniforms: float `(B, num_new)`: inverse-CDF sampling instead (jaxgpt's rule, parity).
          on_token: called as `on_token(step)` once step's tokens exist (time to first char).

        Returns:
          int64 `(B, num_new)` tokens.
        """
        from porting.torch_reference import inverse_cdf_pick

        m, c = self.model, self.model.config.context_length
        keep = c if keep is None else keep
        context = context[:, -c:]
        b, t0 = context.shape
        buf = torch.empty((b, t0 + num_new), dtype=torch.long, device=context.device)
        buf[:, :t0] = context
        caches = m.new_caches(b, context.device)
        if t0 > 1:  # prefill the prompt's first T0-1 positions; the last one goes through a step
            self._window(_fresh(buf[:, : t0 - 1]), caches)
        base = 0
        for s in range(num_new):
            length = t0 + s
            if length - base > c:
                base = length - keep
                # Exact mode never reads the cache again, so it is not refilled there.
                logits = self._window(_fresh(buf[:, base:length]), caches if keep < c else None)
            else:
                pos = torch.tensor([length - 1 - base], device=context.device)
                logits = self._step(_fresh(buf[:, length - 1 : length]), pos, caches)
            if uniforms is None:
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            else:
                nxt = inverse_cdf_pick(logits, uniforms[:, s])
            buf[:, length] = nxt
            if on_token is not None:
                on_token(s)
        return buf[:, t0:].clone()


__all__ = ["TunedGPT", "TunedGenerator"]
