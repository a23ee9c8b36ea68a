"""The suite's outputs: the JSON document, a Markdown report and a PNG bar chart of the ratios.

Every writer goes through a temporary file in the destination's directory and `os.replace`,
so an interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import os

from jaxgpt.atomic import atomic_file

REQUIRED_RESULT_KEYS = ("name", "framework", "batch", "chars", "seconds", "chars_per_s")
TOP_LEVEL_KEYS = ("device", "versions", "results", "ratios", "parity")
FRAMEWORKS = ("jax", "torch", "onnxruntime")


def check_document(doc: dict) -> None:
    """Raises ValueError if `doc` lacks the documented shape (see benchmarks/__main__.py)."""
    missing = [k for k in TOP_LEVEL_KEYS if k not in doc]
    if missing:
        raise ValueError(f"benchmark document lacks {missing}")
    for i, row in enumerate(doc["results"]):
        lacking = [k for k in REQUIRED_RESULT_KEYS if k not in row]
        if lacking:
            raise ValueError(f"result {i} ({row.get('name')!r}) lacks {lacking}")
        if row["framework"] not in FRAMEWORKS:
            raise ValueError(f"result {i} has framework {row['framework']!r}, expected one of {FRAMEWORKS}")
    for key, ratio in doc["ratios"].items():
        if "ratio" not in ratio or "what" not in ratio:
            raise ValueError(f"ratio {key!r} lacks 'ratio' or 'what'")


def _finite(x):
    """JSON has no inf/NaN: they become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(doc: dict, path: str) -> None:
    check_document(doc)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_finite(doc), f, indent=2)
            f.write("\n")


# ----------------------------------------------------------------------------- markdown
def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else (f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%")


def _bound(r) -> str:
    if r.get("roofline_fraction") is None:
        return "-"
    kind = "memory" if r["memory_floor_s"] > r["flop_floor_s"] else "FLOPs"
    return f"{_pct(r['roofline_fraction'])} ({kind})"


def _results_table(rows) -> list[str]:
    lines = [
        "| benchmark | implementation | batch | chars | median s | IQR s | chars/s | TTFC ms | GFLOP/s | FLOP floor "
        "| roofline (bound) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spread = r.get("spread", {})
        iqr = spread.get("q3", 0) - spread.get("q1", 0) if spread else None
        ttfc = r.get("ttfc_s")
        impl = r.get("impl", r["framework"])
        if "threads" in r and "thread" not in impl:
            impl += f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
        impl += " (extrapolated)" if r.get("extrapolated") else ""
        lines.append(
            f"| {r['name']} | {impl} | {r['batch']} | {r['chars']} | {_fmt(r['seconds'])} | {_fmt(iqr, 2)} "
            f"| {_fmt(r.get('chars_per_s'))} | {_fmt(None if ttfc is None else 1000 * ttfc)} "
            f"| {_fmt(r.get('achieved_gflops'))} | {_pct(r.get('floor_fraction'))} | {_bound(r)} |"
        )
    return lines


def markdown(doc: dict) -> str:
    """The report as Markdown: context, headline ratios, all results, limits, parity, notes."""
    v = doc["versions"]
    lines = [
        f"# jaxgpt benchmarks ({doc.get('mode', '?')})",
        "",
        f"- device: {doc['device']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- model: {doc.get('model', {}).get('description', '-')}; weights: {doc['parity'].get('weights', '-')}",
        f"- date: {doc.get('date', '-')}; wall time of the suite: {_fmt(doc.get('elapsed_s'))} s",
        "",
        "## Ratios (torch or onnxruntime time / jaxgpt time: above 1, jaxgpt is faster)",
        "",
        "| comparison | ratio | per-round min-max |",
        "| --- | ---: | ---: |",
    ]
    for key, r in doc["ratios"].items():
        paired = r.get("paired") or {}
        span = f"{_fmt(paired.get('min'))}-{_fmt(paired.get('max'))}" if paired else "-"
        lines.append(f"| {r['what']} | **{_fmt(r['ratio'])}x** | {span} |")
    lines += ["", "## Results", "", *_results_table(doc["results"]), ""]
    lines += ["Median over the measured rounds (warm-ups excluded); IQR = interquartile range; TTFC = time to "
              "first character; FLOP floor = FLOPs / measured matmul peak, as a fraction of the median time; roofline = "
              "the larger of the FLOP floor and the memory floor (weights read once per step / measured bandwidth) as "
              "a fraction of the median time, and which of the two binds.", ""]
    compiles = [r for r in doc["results"] if "compile_s" in r]
    if compiles:
        lines += ["## Compilation (fresh process per measurement)", "",
                  "| case | first call s | of which compile s | steady call s |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['name']} | {_fmt(r['seconds'])} | {_fmt(r['compile_s'])} | {_fmt(r.get('steady_call_s'))} |"
                  for r in compiles]
        lines.append("")
    limits = doc.get("limits")
    if limits:
        lines += ["## Device limits (measured)", ""]
        lines.append("- matmul float32 GFLOP/s: " + ", ".join(f"{k} {_fmt(x)}" for k, x in limits["matmul_gflops"].items())
                     + f" (n = {limits['matmul_size']})")
        lines.append("- read bandwidth GB/s: " + ", ".join(f"{k} {_fmt(x)}" for k, x in limits["bandwidth_gbs"].items())
                     + f" ({limits['bandwidth_mbytes']} MB)")
    flops = doc.get("flops_per_char")
    if flops:
        lines += [f"- FLOPs per character: {flops['formula']}", f"  - {flops['summary']}"]
    p = doc["parity"]
    if set(p) - {"weights"} or any("agreement" in r for r in doc["results"]):
        lines += ["", "## Parity (jaxgpt vs the notebook's torch model, same weights)", ""]
    if "logits" in p:
        lg = p["logits"]
        scale = f", largest |logit| {lg['max_abs_logit']:.3g}" if lg.get("max_abs_logit") else ""
        lines.append(f"- logits: max |difference| {lg['max_abs_diff']:.2e} (mean {lg['mean_abs_diff']:.2e}{scale}) over "
                     f"{lg['inputs']} random {tuple(lg['shape'])} inputs (all prefix lengths)")
    for key, label in (("greedy", "greedy tokens"), ("sampled", "sampled tokens (shared uniforms)"),
                       ("strided_vs_tuned_twin", "strided tokens vs the torch strided twin")):
        if key in p:
            a = p[key]
            div = "never diverged" if a["first_divergence"] is None else f"first divergence at {a['first_divergence']}"
            lines.append(f"- {label}: {100 * a['agreement']:.2f}% of {a['tokens']} agree ({div})")
    shown = []  # the training rows of one run share one agreement check: print it once
    for r in doc["results"]:
        a = r.get("agreement")
        if isinstance(a, dict) and "grad_max_abs_diff" in a and a not in shown:
            shown.append(a)
            lines.append(f"- training step from identical weights, dropout off (batch {a.get('batch')}): loss |difference| "
                         f"{a['loss_abs_diff']:.1e}, gradients max |difference| {a['grad_max_abs_diff']:.1e} "
                         f"({'within' if a.get('ok') else 'OUTSIDE'} {a.get('grad_tolerance')}), weights after one "
                         f"AdamW step {a.get('params_after_step_max_abs_diff_grad_ge_1e-6', float('nan')):.1e} "
                         "(where |gradient| >= 1e-6)")
    if "onnxruntime" in p:
        o = p["onnxruntime"]
        g = o["greedy_vs_jaxgpt"]
        div = "never diverged" if g["first_divergence"] is None else f"first divergence at {g['first_divergence']}"
        lines.append(f"- onnxruntime (the notebook model exported to ONNX): max |logit difference| "
                     f"{o['max_abs_logit_diff_vs_jaxgpt']:.2e} vs jaxgpt, {o['max_abs_logit_diff_vs_torch']:.2e} vs "
                     f"torch over {o['inputs']} random {tuple(o['shape'])} inputs; greedy tokens vs jaxgpt "
                     f"{100 * g['agreement']:.2f}% of {g['tokens']} agree ({div})")
    if "tuned_vs_reference_max_abs_logit_diff" in p:
        lines.append(f"- tuned torch baseline vs the notebook model: max |logit difference| "
                     f"{p['tuned_vs_reference_max_abs_logit_diff']:.2e}")
    if doc.get("notes"):
        lines += ["", "## How it was measured", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: str) -> None:
    check_document(doc)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(markdown(doc))


# ----------------------------------------------------------------------------- chart
def plot(doc: dict, path: str) -> None:
    """A horizontal bar chart of every ratio (log scale; the line at 1 is parity of speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_document(doc)
    items = [(r["what"], r["ratio"], r.get("paired") or {}) for r in doc["ratios"].values()
             if r.get("ratio") and math.isfinite(r["ratio"]) and r["ratio"] > 0]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(items) + 1.6))
    ys = range(len(items))
    values = [x for _, x, _ in items]
    colors = ["#2a9d8f" if x >= 1 else "#e76f51" for x in values]
    lows = [max(x - p.get("min", x), 0) for _, x, p in items]
    highs = [max(p.get("max", x) - x, 0) for _, x, p in items]
    ax.barh(list(ys), values, color=colors, xerr=[lows, highs], capsize=3)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([w if len(w) < 90 else w[:87] + "..." for w, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    for y, x, hi in zip(ys, values, highs):
        ax.text((x + hi) * 1.08, y, f"{x:.3g}x", va="center", fontsize=8)  # right of the whisker
    right = max((x + hi) for x, hi in zip(values, highs)) if values else 1.0
    ax.set_xlim(right=right * 2.2)
    ax.set_xlabel("baseline (torch or onnxruntime) time / jaxgpt time (log scale; > 1: jaxgpt faster); "
                  "whiskers: per-round min-max")
    others = "torch and onnxruntime" if any(r["framework"] == "onnxruntime" for r in doc["results"]) else "torch"
    ax.set_title(f"jaxgpt vs {others} on {doc['device']}", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
