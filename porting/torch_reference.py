"""An independent torch implementation in the notebooks' exact structure (per-head modules).

This is the yardstick: the parity tests, `jaxgpt eval --compare-torch` and the benchmarks
compare jaxgpt against it, and `porting.save_weights` output must load into it with
`load_state_dict(strict=True)`. It shares no code with jaxgpt. Importing it needs torch.
`DrakeGPT` has the published checkpoint's key names; `LearningGPT` the step-by-step
notebook's (no attention output projection, no attention dropout).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _causal_attention(k, q, v):
    scores = q @ torch.transpose(k, 1, 2)  # (B, T, T)
    t, head_size = k.shape[1], k.shape[2]
    scores = scores / (head_size**0.5)
    mask = torch.tril(torch.ones(t, t, device=k.device)) == 0
    scores = scores.masked_fill(mask, float("-inf"))
    return F.softmax(scores, dim=2) @ v  # (B, T, K)


# ----------------------------------------------------------------------------- "drake"
class SingleHeadAttention(nn.Module):
    def __init__(self, model_dim, head_size):
        super().__init__()
        self.key_layer = nn.Linear(model_dim, head_size, bias=False)
        self.query_layer = nn.Linear(model_dim, head_size, bias=False)
        self.value_layer = nn.Linear(model_dim, head_size, bias=False)

    def forward(self, embedded):
        return _causal_attention(self.key_layer(embedded), self.query_layer(embedded), self.value_layer(embedded))


class MultiHeadedSelfAttention(nn.Module):
    def __init__(self, model_dim, num_heads, dropout=0.2):
        super().__init__()
        self.attention_heads = nn.ModuleList(
            [SingleHeadAttention(model_dim, model_dim // num_heads) for _ in range(num_heads)]
        )
        self.compute = nn.Linear(model_dim, model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embedded):
        heads = [head(embedded) for head in self.attention_heads]
        return self.dropout(self.compute(torch.cat(heads, dim=2)))


class VanillaNeuralNetwork(nn.Module):
    def __init__(self, model_dim, dropout=0.2):
        super().__init__()
        self.first_linear_layer = nn.Linear(model_dim, model_dim * 4)
        self.relu = nn.ReLU()
        self.second_linear_layer = nn.Linear(model_dim * 4, model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.second_linear_layer(self.relu(self.first_linear_layer(x))))


class TransformerBlock(nn.Module):
    def __init__(self, model_dim, num_heads, dropout=0.2):
        super().__init__()
        self.mhsa = MultiHeadedSelfAttention(model_dim, num_heads, dropout)
        self.vanilla_nn = VanillaNeuralNetwork(model_dim, dropout)
        self.layer_norm_one = nn.LayerNorm(model_dim)
        self.layer_norm_two = nn.LayerNorm(model_dim)

    def forward(self, embedded):
        embedded = embedded + self.mhsa(self.layer_norm_one(embedded))
        return embedded + self.vanilla_nn(self.layer_norm_two(embedded))


class DrakeGPT(nn.Module):
    def __init__(self, vocab_size=104, context_length=128, model_dim=252, num_blocks=6, num_heads=6, dropout=0.2):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, model_dim)
        self.pos_embedding = nn.Embedding(context_length, model_dim)
        self.transformer_blocks = nn.Sequential(
            *[TransformerBlock(model_dim, num_heads, dropout) for _ in range(num_blocks)]
        )
        self.layer_norm_three = nn.LayerNorm(model_dim)
        self.vocab_projection = nn.Linear(model_dim, vocab_size)

    def forward(self, context):
        embedded = self.token_embedding(context)
        positions = torch.arange(context.shape[1], device=context.device)
        embedded = embedded + self.pos_embedding(positions)
        return self.vocab_projection(self.layer_norm_three(self.transformer_blocks(embedded)))


# ----------------------------------------------------------------------------- "learning"
class LearningHead(nn.Module):
    def __init__(self, model_dim, head_size):
        super().__init__()
        self.key_gen = nn.Linear(model_dim, head_size, bias=False)
        self.query_gen = nn.Linear(model_dim, head_size, bias=False)
        self.value_gen = nn.Linear(model_dim, head_size, bias=False)

    def forward(self, embedded):
        return _causal_attention(self.key_gen(embedded), self.query_gen(embedded), self.value_gen(embedded))


class LearningAttention(nn.Module):
    def __init__(self, model_dim, num_heads):
        super().__init__()
        self.att_heads = nn.ModuleList([LearningHead(model_dim, model_dim // num_heads) for _ in range(num_heads)])

    def forward(self, embedded):
        return torch.cat([head(embedded) for head in self.att_heads], dim=2)


class LearningFeedForward(nn.Module):
    def __init__(self, model_dim, dropout=0.2):
        super().__init__()
        self.up_projection = nn.Linear(model_dim, model_dim * 4)
        self.relu = nn.ReLU()
        self.down_projection = nn.Linear(model_dim * 4, model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.down_projection(self.relu(self.up_projection(x))))


class LearningBlock(nn.Module):
    def __init__(self, model_dim, num_heads, dropout=0.2):
        super().__init__()
        self.attention = LearningAttention(model_dim, num_heads)
        self.linear_network = LearningFeedForward(model_dim, dropout)
        self.first_norm = nn.LayerNorm(model_dim)
        self.second_norm = nn.LayerNorm(model_dim)

    def forward(self, embedded):
        embedded = embedded + self.attention(self.first_norm(embedded))
        return embedded + self.linear_network(self.second_norm(embedded))


class LearningGPT(nn.Module):
    def __init__(self, vocab_size=104, context_length=128, model_dim=252, num_blocks=6, num_heads=6, dropout=0.2):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, model_dim)
        self.pos_embeddings = nn.Embedding(context_length, model_dim)
        self.blocks = nn.Sequential(*[LearningBlock(model_dim, num_heads, dropout) for _ in range(num_blocks)])
        self.final_ln = nn.LayerNorm(model_dim)
        self.vocab_projection = nn.Linear(model_dim, vocab_size)

    def forward(self, context):
        embedded = self.token_embeddings(context)
        positions = torch.arange(context.shape[1], device=context.device)
        embedded = embedded + self.pos_embeddings(positions)
        return self.vocab_projection(self.final_ln(self.blocks(embedded)))


def make_reference(variant="drake", **config):
    """A torch reference model of the given variant, in eval mode."""
    cls = {"drake": DrakeGPT, "learning": LearningGPT}[variant]
    return cls(**config).eval()


def reference_from_config(config):
    """A torch reference model matching a `jaxgpt.GPTConfig`, in eval mode."""
    return make_reference(
        config.variant,
        vocab_size=config.vocab_size,
        context_length=config.context_length,
        model_dim=config.model_dim,
        num_blocks=config.num_blocks,
        num_heads=config.num_heads,
        dropout=config.dropout,
    )


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def notebook_generate(model, new_chars, context, context_length, int_to_char=None):
    """The notebook's loop, verbatim in substance: multinomial draws from torch's global RNG."""
    res = []
    for _ in range(new_chars):
        if context.shape[1] > context_length:
            context = context[:, -context_length:]
        logits = model(context)[:, -1, :]
        probabilities = F.softmax(logits, dim=-1)
        next_char = torch.multinomial(probabilities, 1)
        context = torch.cat((context, next_char), dim=-1)
        res.append(next_char)
    tokens = torch.cat(res, dim=1)
    if int_to_char is not None:
        return "".join(int_to_char[int(i)] for i in tokens[0])
    return tokens


def adjust_logits(logits, logit_bias=None, repetition_penalty=None, windows=None):
    """Bias, then the CTRL repetition penalty, as jaxgpt.sampling defines them (steps 1-2).

    Args:
      logits: `(B, V)`.
      logit_bias: None or `(V,)` / `(B, V)` additive bias (-inf bans).
      repetition_penalty: None or a float > 0: for each character present in the row's window,
        a positive logit is divided by it, a negative one multiplied.
      windows: per row, the int tensor of the current context's tokens (needed with a penalty).
    """
    logits = logits.float()
    if logit_bias is not None:
        logits = logits + logit_bias
    if repetition_penalty is not None and repetition_penalty != 1:
        logits = logits.clone()
        for r, window in enumerate(windows):
            present = torch.unique(window.long())
            row = logits[r, present]
            logits[r, present] = torch.where(row > 0, row / repetition_penalty, row * repetition_penalty)
    return logits


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Temperature, then top-k, then top-p (nucleus), then min-p, as jaxgpt.sampling defines them.

    top-k keeps every logit >= the k-th largest (ties kept); top-p keeps, in descending
    probability order, each token whose preceding cumulative mass is < p (so the top token
    is always kept); min-p keeps the tokens with probability >= min_p x the top probability.
    Temperature 0 (or top_k=1) is greedy and handled by the caller.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        remove_sorted = before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = F.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def inverse_cdf_pick(logits, u):
    """First index whose cumulative probability exceeds u * total, per row. logits (B, V), u (B,)."""
    probs = F.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    threshold = u[:, None].to(cdf.dtype) * cdf[:, -1:]
    index = (cdf <= threshold).sum(dim=-1)
    return index.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def inverse_cdf_generate(model, context, uniforms, context_length, temperature=1.0, top_k=None, top_p=None,
                         min_p=None, repetition_penalty=None, logit_bias=None, logprobs=False):
    """The notebook's loop with the multinomial replaced by inverse-CDF sampling.

    Args:
      model: a reference model in eval mode.
      context: int64 `(B, T)` prompt.
      uniforms: float `(B, N)` one uniform in [0, 1) per row and step (ignored when greedy).
      temperature, top_k, top_p, min_p: as in `filter_logits`; temperature 0 or top_k=1 is greedy.
      repetition_penalty, logit_bias: as in `adjust_logits` (the window is the cropped context).
      logprobs: also return log_softmax of the raw logits at each step.

    Returns:
      int64 `(B, N)` generated tokens (and float `(B, N, V)` log-probabilities with logprobs).
    """
    out, lps = [], []
    for step in range(uniforms.shape[1]):
        if context.shape[1] > context_length:
            context = context[:, -context_length:]
        logits = model(context)[:, -1, :]
        lps.append(F.log_softmax(logits.float(), dim=-1))
        adjusted = adjust_logits(logits, logit_bias, repetition_penalty, list(context))
        if temperature == 0 or top_k == 1:
            nxt = torch.argmax(adjusted, dim=-1)
        else:
            nxt = inverse_cdf_pick(filter_logits(adjusted, temperature, top_k, top_p, min_p), uniforms[:, step])
        context = torch.cat((context, nxt[:, None]), dim=-1)
        out.append(nxt)
    tokens = torch.stack(out, dim=1)
    return (tokens, torch.stack(lps, dim=1)) if logprobs else tokens


# ----------------------------------------------------------------------------- scoring and beam search
# The definitions of jaxgpt.score and jaxgpt.beam_search, written as the notebook's loop
# (re-encode the cropped context at every step, no KV cache).
@torch.no_grad()
def reference_score(model, tokens, context_length, keep=None):
    """Teacher-forced notebook loop: log p(token i | seed token 0 and tokens[:i]) for every i.

    The context starts as [0]; before each prediction it is cut to its last `keep` tokens when
    longer than `context_length` (keep = context_length, the default, is the notebook's crop;
    context_length + 1 - stride is strided generation). Returns float32 `(n,)`.
    """
    keep = context_length if keep is None else keep
    context, out = [0], []
    for token in [int(t) for t in tokens]:
        if len(context) > context_length:
            context = context[-keep:]
        logits = model(torch.tensor([context]))[0, -1]
        out.append(F.log_softmax(logits.float(), dim=-1)[token])
        context.append(token)
    return torch.stack(out)


@torch.no_grad()
def reference_beam_search(model, context, num_new, beams, context_length, stop=()):
    """Beam search by the definition of `jaxgpt.beam_search`, with the notebook's window.

    A hypothesis' score is the sum of log_softmax(logits) of its generated tokens. Step 0
    expands the context into its `beams` likeliest tokens; each later step ranks all beams x V
    continuations (a frozen hypothesis, one that ended with a stop sequence, offers only
    itself, at flat index beam x V, with its score unchanged) by score, ties to the lower flat
    index beam x V + token, and keeps the best `beams`. Logits come from the last position of
    the context cropped to its last `context_length` tokens.

    Args:
      model: a reference model in eval mode.
      context: int64 `(B, T)`, T >= 1.
      num_new: tokens to generate.
      beams: hypotheses kept, 1..vocab_size.
      stop: token-id sequences; a hypothesis whose generated tokens end with one is frozen.

    Returns:
      tokens int64 `(B, beams, num_new)` (-1 after a stop) and float32 scores `(B, beams)`,
      best first.
    """
    batch = context.shape[0]
    seqs = context[:, None, :]  # (B, K, T): K = 1 before step 0
    scores = torch.zeros(batch, 1)
    frozen = torch.zeros(batch, 1, dtype=torch.bool)
    out = torch.full((batch, 1, 0), -1, dtype=torch.long)
    stops = [list(s) for s in stop]
    for _ in range(num_new):
        k = seqs.shape[1]
        window = seqs.reshape(batch * k, -1)[:, -context_length:]
        logp = F.log_softmax(model(window)[:, -1].float(), dim=-1).reshape(batch, k, -1)  # (B, K, V)
        vocab = logp.shape[-1]
        candidates = scores[:, :, None] + logp
        stay = torch.full_like(candidates, float("-inf"))
        stay[:, :, 0] = scores
        candidates = torch.where(frozen[:, :, None], stay, candidates).reshape(batch, k * vocab)
        # stable descending sort: equal scores keep the lower flat index first
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :beams]  # (B, beams)
        parent, token = order // vocab, order % vocab
        pick = lambda t: torch.gather(t, 1, parent.reshape(batch, beams, *([1] * (t.dim() - 2))).expand(
            batch, beams, *t.shape[2:]))
        was_frozen = pick(frozen[:, :, None])[:, :, 0]
        scores = torch.gather(candidates, 1, order)
        new = torch.where(was_frozen, torch.full_like(token, -1), token)
        out = torch.cat([pick(out), new[:, :, None]], dim=2)
        seqs = torch.cat([pick(seqs), torch.where(was_frozen, 0, token)[:, :, None]], dim=2)
        frozen = was_frozen.clone()
        for b in range(batch):
            for h in range(beams):
                generated = out[b, h].tolist()
                if not frozen[b, h] and any(len(generated) >= len(s) and generated[-len(s):] == s for s in stops):
                    frozen[b, h] = True
    return out, scores


# ----------------------------------------------------------------------------- attention probabilities
@torch.no_grad()
def attention_probabilities(model, context):
    """Every head's softmax attention probabilities, read from the per-head modules.

    A forward hook on each head (`SingleHeadAttention` / `LearningHead`) takes the normalised
    input it was given and recomputes its causal softmax from its own key and query layers,
    the same operations as `_causal_attention`; the model's forward itself is unchanged.

    Args:
      model: a reference model (either variant) in eval mode.
      context: int64 `(B, T)` tokens.

    Returns:
      float32 `(num_blocks, B, H, T, T)`: [i, b, j, t, s] is how much position t attends to
      position s <= t in head j of block i (zero above the diagonal; each row sums to 1).
    """
    heads = [m for m in model.modules() if isinstance(m, (SingleHeadAttention, LearningHead))]
    probs = {}

    def hook(head, inputs, _output):
        (embedded,) = inputs
        key = head.key_layer if isinstance(head, SingleHeadAttention) else head.key_gen
        query = head.query_layer if isinstance(head, SingleHeadAttention) else head.query_gen
        k, q = key(embedded), query(embedded)  # (B, T, K) each
        scores = q @ torch.transpose(k, 1, 2) / (k.shape[2] ** 0.5)  # (B, T, T)
        t = k.shape[1]
        mask = torch.tril(torch.ones(t, t, device=k.device)) == 0
        probs[head] = F.softmax(scores.masked_fill(mask, float("-inf")), dim=2)

    handles = [head.register_forward_hook(hook) for head in heads]
    try:
        model(context)
    finally:
        for handle in handles:
            handle.remove()
    per_head = torch.stack([probs[head] for head in heads])  # (num_blocks * H, B, T, T), module order
    num_blocks = len(model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks)
    return per_head.reshape(num_blocks, -1, *per_head.shape[1:]).transpose(1, 2)  # (N, B, H, T, T)


# ----------------------------------------------------------------------------- jaxgpt models, in torch
def reference_from_model(model):
    """The notebook's torch model holding a `jaxgpt.GPT`'s weights, in eval mode (strict load)."""
    from porting.export import state_dict_from_model

    reference = reference_from_config(model.config)
    state = {k: torch.from_numpy(v) for k, v in state_dict_from_model(model).items()}
    reference.load_state_dict(state, strict=True)
    return reference.eval()


def evaluate_torch(torch_model, tokens, context_length, *, batch_size=32, progress=False):
    """`jaxgpt.evaluate.evaluate` with a torch model: the same windows, an `EvalResult` (CPU).

    Args:
      torch_model: maps int64 `(B, T)` to logits `(B, T, V)` (e.g. `reference_from_model`);
        put in eval mode.
      tokens: int ids `(N,)`, N >= 2.
      context_length: window length (the model's).
      batch_size, progress: as in `jaxgpt.evaluate.evaluate`.
    """
    from jaxgpt.evaluate import EvalResult, window_batches, windows

    torch_model.eval()
    x, y, mask = windows(tokens, context_length)
    total = 0.0
    with torch.no_grad():
        for bx, by, bm in window_batches(x, y, mask, batch_size, progress):
            logits = torch_model(torch.from_numpy(bx).long()).float()  # (B, T, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(by).long().reshape(-1),
                                  reduction="none")
            total += float((nll * torch.from_numpy(bm).reshape(-1)).sum())
    count = int(mask.sum())
    return EvalResult(total / count, count, len(x))
