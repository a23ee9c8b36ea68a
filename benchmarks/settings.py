"""What the suite measures and how long: one frozen dataclass, three presets (full, quick, tiny).

Every size below is a choice of how much work to time, not a result; the results are all
measured. `quick` must finish in under 10 minutes on the project's 2-core CPU, `full` in
under 30; `tiny` (a toy model) exists so that tests can run the whole suite in seconds.
"""

from __future__ import annotations

import dataclasses

from jaxgpt.config import PUBLISHED, GPTConfig

GROUPS = ("limits", "generation", "forward", "train", "porting", "compile", "parity", "beam_score", "requests")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Sizes and repetitions of every benchmark group.

    Attributes:
      model: the model configuration benchmarked (the published one except in tests).
      reps: measured rounds per group (median and spread are over these).
      warmup: discarded rounds first (compilation, caches); their times are reported apart.
      lead_in_s: the generation and forward groups run each short case untimed for this long
        right before its timed run (`benchmarks.harness.interleave`); 0 times calls that
        follow an idle pause.
      gen_steps: characters per row of the batch-1 exact generation (the 400-char ratio).
      gen_mark: the growing-context mark inside it (the 127-char ratio).
      strided_steps: characters of the batch-1 strided generation (the 5000-char ratio).
      stride: strided mode's stride (None: the engine's default, C // 2).
      strided_twin_b1: also run the tuned torch twin of strided mode at batch 1 over
        strided_steps characters (the same-algorithm comparison; it costs a minute a round).
      batch_steps: (batch, characters per row) of the batched generations.
      compile_torch_batches: batches at which the torch.compile'd tuned baseline is also run
        (each new shape costs a compilation of a minute or more on a small CPU).
      torch_threads: intra-op thread counts, besides torch's default, that a short probe tries
        for the tuned baseline (per batch size); the tuned baseline runs at the fastest one
        and the probe's figures are reported. The notebook loop keeps torch's default.
      notebook_steps: characters the batch-1 notebook loop really runs (None: gen_steps); fewer
        means its longer times are extrapolated (constant cost per step once the window is
        full) and marked so.
      forward_shapes: (B, T) of the forward-logits benchmark.
      compile_forward: also time the torch.compile'd tuned forward.
      onnx: also time and check the notebook model exported to ONNX on ONNX Runtime (the notebook
        loop in every generation group, the forward, parity), on a CPU with the `[onnx]` extra.
      train_batches: rows per training step (each of C tokens) timed by `benchmarks.train_step.run`.
      limits_matmul: n of the n x n matmul peak; limits_mbytes: array size of the bandwidth test.
      parity_inputs: random (B, T) inputs for the max |logit difference|.
      greedy_tokens: greedy-agreement length; sampled_tokens, sampled_rows: sampled-text agreement.
      porting_reps: load_weights repetitions (cheap, so more of them).
      compile_reps: cold/warm-cache process pairs of the compile benchmark.
      beam_beams, beam_steps: beams and characters of the batch-1 beam search (benchmarks.beam_score).
      score_chars: characters scored by the `score` benchmark (exact windows).
      groups: which groups run (subset of GROUPS).
    """

    model: GPTConfig = PUBLISHED
    reps: int = 3
    warmup: int = 1
    lead_in_s: float = 0.2
    gen_steps: int = 400
    gen_mark: int = 127
    strided_steps: int = 5000
    stride: int | None = None
    strided_twin_b1: bool = True
    batch_steps: tuple[tuple[int, int], ...] = ((8, 200), (64, 48))
    compile_torch_batches: tuple[int, ...] = (1, 8, 64)
    torch_threads: tuple[int, ...] = (1,)
    notebook_steps: int | None = None
    forward_shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 128), (64, 128))
    compile_forward: bool = True
    onnx: bool = True
    train_batches: tuple[int, ...] = (16, 64)
    limits_matmul: int = 2048
    limits_mbytes: int = 256
    parity_inputs: int = 64
    greedy_tokens: int = 1000
    sampled_tokens: int = 1000
    sampled_rows: int = 2
    porting_reps: int = 20
    compile_reps: int = 3
    beam_beams: int = 4
    beam_steps: int = 200
    score_chars: int = 10_000
    groups: tuple[str, ...] = GROUPS

    def __post_init__(self):
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown benchmark groups {sorted(unknown)}; choose from {GROUPS}")
        if not 1 <= self.gen_mark <= self.gen_steps:
            raise ValueError(f"gen_mark ({self.gen_mark}) must be in 1..gen_steps ({self.gen_steps})")
        if self.notebook_steps is not None and not self.model.context_length < self.notebook_steps <= self.gen_steps:
            raise ValueError("notebook_steps must exceed context_length (to measure full-window steps) "
                             "and be at most gen_steps")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")

    def replace(self, **changes) -> "SuiteConfig":
        return dataclasses.replace(self, **changes)


FULL = SuiteConfig()

QUICK = SuiteConfig(
    reps=3,
    notebook_steps=160,
    strided_twin_b1=False,
    batch_steps=((8, 64), (64, 16)),
    compile_torch_batches=(),
    compile_forward=False,
    limits_matmul=1024,
    limits_mbytes=128,
    parity_inputs=16,
    sampled_tokens=400,
    sampled_rows=1,
    porting_reps=5,
    compile_reps=2,
    score_chars=2_000,
)

TINY = SuiteConfig(
    model=GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3),
    reps=2,
    warmup=1,
    lead_in_s=0.01,
    gen_steps=40,
    gen_mark=15,
    strided_steps=60,
    stride=8,
    batch_steps=((2, 20),),  # batch 2 and num_new <= 64 share compiled programs with parity
    compile_torch_batches=(),
    forward_shapes=((2, 16),),
    compile_forward=False,
    train_batches=(2,),
    limits_matmul=64,
    limits_mbytes=1,
    parity_inputs=3,
    greedy_tokens=40,
    sampled_tokens=40,
    sampled_rows=2,
    porting_reps=2,
    compile_reps=1,
    beam_steps=24,
    score_chars=40,
    groups=("limits", "generation", "forward", "porting", "parity"),
)
