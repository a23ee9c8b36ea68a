"""Generation: the notebook's loop (torch, and ONNX Runtime) vs the tuned torch baseline vs jaxgpt.

All runs start from the notebook's seed context `[[0]] * B` with the same weights. Torch
loops record, inside one run, when each character exists (time to first character, the
growing-context mark and the moment the window fills); jaxgpt runs one compiled call per
length (`generate_tokens(num_new=1)` is its time to first character: prefill + one step +
host round trip, warm).

Both torch sides run at every intra-op thread count that a short probe finds within 2x of
the fastest for each batch size (`benchmarks.threads`; on a small busy CPU one thread can be
many times faster than torch's default for these small matmuls, on a quiet one slower), and
each ratio takes the fastest median; the probe's figures go into the rows. The notebook loop
on ONNX Runtime (the exported notebook model, `benchmarks.onnx_runtime`; with the `[onnx]`
extra) is measured alike, at the session thread counts its own probe keeps.

The notebook loop (either framework) at 5000 characters would take many minutes per repetition; its cost per
character is constant once the window is full (every step is the same (B, C) forward), so
its longer times are extrapolated from each measured run: t(N) = t(n) + (N - n) * (t(n) -
t(C)) / (n - C). Rows (and ratios) computed that way say so.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import roofline
from benchmarks.harness import interleave, loop_result, make_result, paired_ratio

NOTEBOOK, JAX_EXACT, JAX_STRIDED = "notebook loop", "jaxgpt exact", "jaxgpt strided"
ORT_LOOP = "onnxruntime notebook loop"


def _framework(impl: str) -> str:
    return "jax" if impl.startswith("jaxgpt") else "onnxruntime" if impl.startswith("onnxruntime") else "torch"


class Tuned:
    """One variant of the tuned torch baseline: eager or compiled, at an intra-op thread count."""

    def __init__(self, generator, threads: int):
        self.generator, self.threads = generator, threads

    def name(self, strided: bool = False) -> str:
        kind = "compiled" if self.generator.compiled else "eager"
        return f"torch tuned{' strided' if strided else ''} {kind}, {_threads(self.threads)}"


def _probe(models, suite, batch: int, steps: int) -> tuple[dict, dict]:
    """Thread counts worth measuring for the notebook model and the tuned model at this batch.

    Each count is scored by a representative run of `steps` characters: min(steps, C)
    growing-context steps (the notebook re-encodes about C/2 tokens for each, the tuned model
    does one cached step) and max(steps - C, 0) full-window steps. Counts within 2x of the
    best score are all measured (a one-shot probe cannot be trusted closer than that on a busy
    machine; the fastest median then decides); slower ones are dropped and only reported.

    Returns:
      ({"counts": [...], "probe": {count: figures}} for the notebook, the same for tuned).
    """
    import torch

    from benchmarks.threads import probe_threads

    c = models.config.context_length
    grow, full = min(steps, c), max(steps - c, 0)
    tokens = torch.zeros((batch, c), dtype=torch.long, device=models.torch_device)
    pos = torch.tensor([c // 2], device=models.torch_device)
    caches = models.tuned.new_caches(batch, models.torch_device)
    ref, tuned = models.reference, models.tuned
    nb = probe_threads({"window": (full, lambda: ref(tokens).cpu()),
                        "half_window": (grow, lambda: ref(tokens[:, : c // 2]).cpu())}, suite.torch_threads)
    tu = probe_threads({"window": (full, lambda: tuned.window_last(tokens).cpu()),
                        "cached_step": (grow, lambda: tuned.step(tokens[:, :1], pos, caches).cpu())},
                       suite.torch_threads)

    def viable(probe):
        best, figures = probe
        limit = 2 * figures[best]["score_s"]
        counts = [best] + [n for n, f in figures.items() if n != best and f["score_s"] <= limit]
        return {"counts": counts, "probe": {str(n): f for n, f in figures.items()}}

    return viable(nb), viable(tu)


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def _tuned_variants(suite, batch: int, counts, generators) -> list[Tuned]:
    """The tuned baseline, eager at each viable thread count; compiled at the best one where asked."""
    variants = [Tuned(generators[False], n) for n in counts]
    if batch in suite.compile_torch_batches:
        variants.append(Tuned(generators[True], counts[0]))
    return variants


def _notebook_case(models, batch: int, steps: int, marks: tuple[int, ...], threads: int):
    import torch

    from benchmarks.threads import torch_threads
    from porting.torch_reference import notebook_generate

    ref, c = models.reference, models.config.context_length
    context = torch.zeros((batch, 1), dtype=torch.long, device=models.torch_device)

    def case(warm: bool):
        n = min(steps, 2) if warm else steps  # eager: nothing to compile, a short warm-up suffices
        starts = []  # the k-th forward starts once k - 1 characters exist
        hook = ref.register_forward_pre_hook(lambda module, args: starts.append(time.perf_counter()))
        try:
            torch.manual_seed(0)
            with torch_threads(threads):
                begin = time.perf_counter()
                out = notebook_generate(ref, n, context, c)
                out.cpu()  # device sync
                end = time.perf_counter()
        finally:
            hook.remove()
        done = [s - begin for s in starts[1:]] + [end - begin]  # done[k-1]: k characters exist
        return loop_result(end - begin, done, marks, partial=warm)

    return case


def _tuned_case(models, variant: Tuned, batch: int, steps: int, marks: tuple[int, ...], keep: int | None):
    import torch

    from benchmarks.threads import torch_threads

    c = models.config.context_length
    context = torch.zeros((batch, 1), dtype=torch.long, device=models.torch_device)

    def case(warm: bool):
        # The warm-up must reach the window step (its shape compiles separately when compiled).
        n = min(steps, c + 2) if warm else steps
        done = [0.0] * n
        gen = torch.Generator(device=models.torch_device).manual_seed(0)
        with torch_threads(variant.threads):
            begin = time.perf_counter()
            out = variant.generator.generate(context, n, keep=keep, generator=gen,
                                             on_token=lambda s: done.__setitem__(s, time.perf_counter() - begin))
            out.cpu()
            end = time.perf_counter()
        return loop_result(end - begin, done, marks, partial=warm and n < steps)

    return case


def _ort_cases(models, group, batch: int, steps: int, marks: tuple[int, ...]) -> list[str]:
    """Adds the ONNX Runtime notebook loop at each viable thread count to `group`; their names."""
    if models.ort is None:
        return []
    from benchmarks import onnx_runtime

    c = models.config.context_length
    counts, figures = onnx_runtime.probe(models.ort, batch, steps, c)
    group.ort_probe = {str(n): f for n, f in figures.items()}
    names = [f"{ORT_LOOP}, {_threads(t)}" for t in counts]
    for name, t in zip(names, counts):
        group.cases[name] = onnx_runtime.loop_case(models.ort, batch, steps, marks, t, c)
    return names


def _jax_case(model, batch: int, steps: int, mode: str, stride: int | None):
    from jaxgpt.generate import Sampler, generate_tokens

    # Prepared once, as the torch models are built once: the split and the parameter placement
    # are model loading, not generation.
    model = Sampler(model)
    context = np.zeros((batch, 1), np.int32)
    seed = [0]

    def case(warm: bool):
        seed[0] += 1  # a new seed each run never recompiles; it only changes the text
        begin = time.perf_counter()
        generate_tokens(model, context, steps, seed=seed[0], mode=mode, stride=stride)  # returns numpy: synced
        return {"seconds": time.perf_counter() - begin}

    return case


def _extrapolate(runs, steps: int, window: int, target: int, key: str) -> None:
    """Adds `key` = the time of `target` characters extrapolated from the window-full regime."""
    for run in runs:
        per_step = (run["seconds"] - run[f"t{window}"]) / (steps - window)
        run[key] = run["seconds"] + (target - steps) * per_step


class _Group:
    """Collects the cases of one interleaved group and turns measurements into rows and ratios."""

    def __init__(self, models, suite, limits):
        self.models, self.suite, self.limits = models, suite, limits
        self.cases, self.measured, self.tuned_probe, self.nb_probe, self.ort_probe = {}, {}, {}, {}, {}

    def run(self, progress):
        self.measured = interleave(self.cases, self.suite.reps, self.suite.warmup, progress,
                                   lead_in_s=self.suite.lead_in_s)

    def row(self, case, impl, batch, steps, key="seconds", keep=None, **extra):
        framework = _framework(impl)
        name = f"generate b{batch} {steps}"
        r = make_result(name, framework, impl, batch, steps, self.measured[case], key, **extra)
        if key != "seconds":
            r.pop("first_run_s", None)
        ttfc = self.measured[case].runs[0].get("ttfc")
        if ttfc is not None:
            r["ttfc_s"] = float(np.median([run["ttfc"] for run in self.measured[case].runs]))
        if keep is not None:
            r["keep"] = keep
        if impl.startswith("torch tuned"):
            r["thread_probe"] = self.tuned_probe
        elif impl.startswith(NOTEBOOK):
            r["thread_probe"] = self.nb_probe
        elif impl.startswith(ORT_LOOP):
            r["thread_probe"] = self.ort_probe
        cfg = self.models.config
        flops = roofline.flops_generation(cfg, batch, 1, steps, keep)
        return roofline.annotate(r, flops, steps * roofline.weight_bytes(cfg), self.limits)

    def median(self, case, key="seconds") -> float:
        return float(np.median([run[key] for run in self.measured[case].runs]))

    def fastest(self, cases, key="seconds") -> str:
        """The case with the smallest median `key`: the strongest baseline among variants."""
        return min(cases, key=lambda case: self.median(case, key))

    def ratio(self, slow, fast, what, slow_key="seconds", fast_key="seconds"):
        out = paired_ratio(self.measured[slow].runs, self.measured[fast].runs, slow_key, fast_key)
        return {"what": what, **out}


def _batch_one(models, suite, limits, progress, generators, stride, keep) -> tuple[list[dict], dict]:
    """Batch 1: growing context (the `gen_mark` mark), exact `gen_steps`, strided `strided_steps`."""
    c = models.config.context_length
    n, mark, long = suite.gen_steps, suite.gen_mark, suite.strided_steps
    nb = suite.notebook_steps or n  # the notebook loop's measured length
    marks = tuple(sorted({mark, min(c, nb)}))
    g = _Group(models, suite, limits)
    progress and progress("probing torch thread counts (batch 1)")
    nb_probe, tu_probe = _probe(models, suite, 1, n)
    g.nb_probe, g.tuned_probe = nb_probe["probe"], tu_probe["probe"]
    notebooks = [f"{NOTEBOOK}, {_threads(t)}" for t in nb_probe["counts"]]
    for name, t in zip(notebooks, nb_probe["counts"]):
        g.cases[name] = _notebook_case(models, 1, nb, marks, t)
    orts = _ort_cases(models, g, 1, nb, marks)
    tuned = _tuned_variants(suite, 1, tu_probe["counts"], generators)
    for v in tuned:
        g.cases[v.name()] = _tuned_case(models, v, 1, n, marks, None)
        if suite.strided_twin_b1:
            g.cases[v.name(True)] = _tuned_case(models, v, 1, long, (), keep)
    g.cases["jax ttfc"] = _jax_case(models.jax, 1, 1, "exact", None)
    g.cases["jax mark"] = _jax_case(models.jax, 1, mark, "exact", None)
    g.cases[JAX_EXACT] = _jax_case(models.jax, 1, n, "exact", None)
    g.cases[JAX_STRIDED] = _jax_case(models.jax, 1, long, "strided", stride)
    g.run(progress)

    rows, ratios = [], {}
    # The notebook's longer lengths: measured, or extrapolated from the window-full regime.
    nb_key, ext = "seconds", f"t{long}_extrapolated"
    for name in notebooks + orts:
        rows.append(g.row(name, name, 1, mark, key=f"t{mark}"))
        how = dict(extrapolated=True, extrapolated_from=f"{nb} measured characters (window full after {c})")
        if nb < n:
            nb_key = f"t{n}_extrapolated"
            _extrapolate(g.measured[name].runs, nb, c, n, nb_key)
            rows.append(g.row(name, name, 1, n, key=nb_key, **how))
        else:
            rows.append(g.row(name, name, 1, n))
        if nb > c:
            _extrapolate(g.measured[name].runs, nb, c, long, ext)
            rows.append(g.row(name, name, 1, long, key=ext, **how))
    for v in tuned:
        rows.append(g.row(v.name(), v.name(), 1, mark, key=f"t{mark}"))
        rows.append(g.row(v.name(), v.name(), 1, n))
        if suite.strided_twin_b1:
            rows.append(g.row(v.name(True), v.name(True), 1, long, keep=keep, stride=stride))
    jax_ttfc = g.median("jax ttfc")
    rows.append(g.row("jax mark", JAX_EXACT, 1, mark, ttfc_s=jax_ttfc))
    rows.append(g.row(JAX_EXACT, JAX_EXACT, 1, n, ttfc_s=jax_ttfc))
    rows.append(g.row(JAX_STRIDED, JAX_STRIDED, 1, long, keep=keep, stride=stride, ttfc_s=jax_ttfc))

    extrapolated = " (extrapolated)" if nb < n else ""
    for loops, label in ((notebooks, "notebook"), (orts, "ort_loop")):  # the notebook's loop, torch or ORT
        if not loops:
            continue
        best = g.fastest(loops, nb_key)
        ratios[f"gen_b1_{mark}_exact_vs_{label}"] = g.ratio(
            best, "jax mark", f"batch 1, first {mark} chars (growing context): jaxgpt exact vs the {best}",
            f"t{mark}")
        ratios[f"gen_b1_{n}_exact_vs_{label}"] = g.ratio(
            best, JAX_EXACT, f"batch 1, {n} chars: jaxgpt exact vs the {best}{extrapolated}", nb_key)
        if nb > c:
            ratios[f"gen_b1_{long}_strided_vs_{label}"] = g.ratio(
                best, JAX_STRIDED, f"batch 1, {long} chars: jaxgpt strided vs the {best} (extrapolated)", ext)
    best = g.fastest([v.name() for v in tuned], f"t{mark}")
    ratios[f"gen_b1_{mark}_exact_vs_tuned"] = g.ratio(
        best, "jax mark", f"batch 1, first {mark} chars: jaxgpt exact vs {best}", f"t{mark}")
    best = g.fastest([v.name() for v in tuned])
    ratios[f"gen_b1_{n}_exact_vs_tuned"] = g.ratio(best, JAX_EXACT, f"batch 1, {n} chars: jaxgpt exact vs {best}")
    if suite.strided_twin_b1:
        best = g.fastest([v.name(True) for v in tuned])
        ratios[f"gen_b1_{long}_strided_vs_tuned_strided"] = g.ratio(
            best, JAX_STRIDED, f"batch 1, {long} chars: jaxgpt strided vs {best} (same algorithm)")
    best = g.fastest([v.name() for v in tuned], "ttfc")
    ratios["ttfc_b1_vs_tuned"] = g.ratio(best, "jax ttfc", f"batch 1 time to first character: jaxgpt vs {best}",
                                         "ttfc")
    return rows, ratios


def _batched(models, suite, limits, progress, generators, stride, keep, batch, steps) -> tuple[list[dict], dict]:
    """Batch > 1: `steps` characters per row, exact (and strided when the window overflows)."""
    c = models.config.context_length
    g = _Group(models, suite, limits)
    marks = (min(c, steps),)
    overflow = steps > c  # strided differs from exact only once the window overflows
    progress and progress(f"probing torch thread counts (batch {batch})")
    nb_probe, tu_probe = _probe(models, suite, batch, steps)
    g.nb_probe, g.tuned_probe = nb_probe["probe"], tu_probe["probe"]
    notebooks = [f"{NOTEBOOK}, {_threads(t)}" for t in nb_probe["counts"]]
    for name, t in zip(notebooks, nb_probe["counts"]):
        g.cases[name] = _notebook_case(models, batch, steps, marks, t)
    orts = _ort_cases(models, g, batch, steps, marks)
    tuned = _tuned_variants(suite, batch, tu_probe["counts"], generators)
    for v in tuned:
        g.cases[v.name()] = _tuned_case(models, v, batch, steps, marks, None)
        if overflow:
            g.cases[v.name(True)] = _tuned_case(models, v, batch, steps, (), keep)
    g.cases["jax ttfc"] = _jax_case(models.jax, batch, 1, "exact", None)
    g.cases[JAX_EXACT] = _jax_case(models.jax, batch, steps, "exact", None)
    if overflow:
        g.cases[JAX_STRIDED] = _jax_case(models.jax, batch, steps, "strided", stride)
    g.run(progress)

    rows, ratios = [], {}
    jax_ttfc = g.median("jax ttfc")
    rows += [g.row(name, name, batch, steps) for name in notebooks + orts]
    for v in tuned:
        rows.append(g.row(v.name(), v.name(), batch, steps))
        if overflow:
            rows.append(g.row(v.name(True), v.name(True), batch, steps, keep=keep, stride=stride))
    rows.append(g.row(JAX_EXACT, JAX_EXACT, batch, steps, ttfc_s=jax_ttfc))
    what = f"batch {batch}, {steps} chars per row"
    best_nb, best = g.fastest(notebooks), g.fastest([v.name() for v in tuned])
    ratios[f"gen_b{batch}_{steps}_exact_vs_notebook"] = g.ratio(best_nb, JAX_EXACT,
                                                                f"{what}: jaxgpt exact vs the {best_nb}")
    ratios[f"gen_b{batch}_{steps}_exact_vs_tuned"] = g.ratio(best, JAX_EXACT, f"{what}: jaxgpt exact vs {best}")
    if orts:
        best_ort = g.fastest(orts)
        ratios[f"gen_b{batch}_{steps}_exact_vs_ort_loop"] = g.ratio(best_ort, JAX_EXACT,
                                                                    f"{what}: jaxgpt exact vs the {best_ort}")
    best = g.fastest([v.name() for v in tuned], "ttfc")
    ratios[f"ttfc_b{batch}_vs_tuned"] = g.ratio(
        best, "jax ttfc", f"batch {batch} time to first character: jaxgpt vs {best}", "ttfc")
    if overflow:
        rows.append(g.row(JAX_STRIDED, JAX_STRIDED, batch, steps, keep=keep, stride=stride, ttfc_s=jax_ttfc))
        best = g.fastest([v.name(True) for v in tuned])
        ratios[f"gen_b{batch}_{steps}_strided_vs_tuned_strided"] = g.ratio(
            best, JAX_STRIDED, f"{what}: jaxgpt strided vs {best} (same algorithm)")
    return rows, ratios


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Runs the generation benchmarks.

    Args:
      models: `benchmarks.models.Models`.
      suite: `benchmarks.settings.SuiteConfig`.
      limits: measured `DeviceLimits` (adds floor fractions), or None.
      progress: callback for progress lines.

    Returns:
      (result rows, ratios). A ratio is torch time / jaxgpt time (> 1: jaxgpt is faster); its
      torch side is the fastest measured variant (thread count, eager/compiled) of that group.
    """
    from benchmarks.torch_tuned import TunedGenerator
    from jaxgpt.generate import default_stride

    c = models.config.context_length
    stride = suite.stride or default_stride(c)
    keep = c + 1 - stride
    generators = {False: TunedGenerator(models.tuned), True: None}
    if suite.compile_torch_batches:
        generators[True] = TunedGenerator(models.tuned, compile=True)
    rows, ratios = _batch_one(models, suite, limits, progress, generators, stride, keep)
    for batch, steps in suite.batch_steps:
        more_rows, more_ratios = _batched(models, suite, limits, progress, generators, stride, keep, batch, steps)
        rows += more_rows
        ratios.update(more_ratios)
    return rows, ratios
