"""The benchmark suite cannot rot: harness, FLOP formulas, tuned torch twin, report, a tiny end-to-end run.

No timing is asserted (speed is shown by the suite itself); these check structure and maths.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import harness, onnx_runtime, report, roofline  # noqa: E402
from benchmarks.settings import TINY  # noqa: E402
from jaxgpt.config import PUBLISHED, GPTConfig  # noqa: E402

SMALL = GPTConfig(context_length=8, model_dim=12, num_blocks=1, num_heads=2)


# ----------------------------------------------------------------------------- harness
def test_summarize_median_and_quartiles():
    s = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert harness.summarize([2.0, 4.0]).median == 3.0
    with pytest.raises(ValueError):
        harness.summarize([])


def test_interleave_excludes_warmups_and_rotates_order():
    order = []

    def case(name):
        def run(warm):
            order.append((name, warm))
            return {"seconds": 1.0 if warm else 0.5}

        return run

    measured = harness.interleave({"a": case("a"), "b": case("b"), "c": case("c")}, reps=3, warmup=1)
    assert [len(m.runs) for m in measured.values()] == [3, 3, 3]
    assert all(r["seconds"] == 0.5 for m in measured.values() for r in m.runs)
    assert measured["a"].warmups == [{"seconds": 1.0}]
    firsts = [order[i][0] for i in range(0, 12, 3)]
    assert firsts == ["a", "b", "c", "a"]  # rotated each round
    assert [w for _, w in order[:3]] == [True] * 3 and not any(w for _, w in order[3:])


def test_interleave_waits_for_a_case_s_threads_to_stop_spinning():
    """A case whose worker thread keeps spinning after it returns (as ONNX Runtime's do) must
    not share the CPU with the next case: `settle` waits until the process's CPU clock idles."""
    import threading
    import time

    spin_s = 0.3  # longer than a full collection of this process takes
    started = []

    def spinner(warm):
        def spin(end):
            while time.perf_counter() < end:
                pass

        end = time.perf_counter() + spin_s
        threading.Thread(target=spin, args=(end,), daemon=True).start()
        started.append(end)
        return {"seconds": 0.0}

    def after(warm):
        return {"seconds": 0.0, "spin_left": started[-1] - time.perf_counter()}

    measured = harness.interleave({"spinner": spinner, "after": after}, reps=2, warmup=0)
    # Round 0 runs spinner then after; round 1 the reverse, so only round 0's "after" follows a spin.
    assert measured["after"].runs[0]["spin_left"] <= 0
    # Round 1 ended with a spinner: settle waits it out, then returns at once on an idle process.
    assert harness.settle() > 0.1
    assert harness.settle() < 0.1


def test_interleave_lead_in_runs_short_cases_untimed_first():
    calls = {"short": [], "long": []}

    def case(name, seconds):
        def run(warm):
            calls[name].append(warm)
            return {"seconds": seconds}

        return run

    harness.interleave({"short": case("short", 0.0), "long": case("long", 2.0)}, reps=2, warmup=1,
                       lead_in_s=0.02)
    # Warm-up rounds get no lead-in; each measured run of the short case follows >= 1 untimed call.
    assert calls["short"][0] is True and calls["short"].count(False) == 2
    assert calls["short"][1] is True and calls["short"][-2] is True and len(calls["short"]) > 4
    assert calls["long"] == [True, False, False]  # at least LEAD_IN_MAX_CASE_S: no lead-in


def test_cpu_description_names_the_generation_and_vector_width(tmp_path):
    info = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nmodel name\t: AMD EPYC\ncpu family\t: {fam}\nmodel\t\t: 2\nflags\t\t: fpu avx2 {extra}\n\n"
    info.write_text(block.format(n=0, fam=26, extra="avx512f avx512bw") + block.format(n=1, fam=25, extra=""))
    cores = os.cpu_count()
    assert harness.cpu_description(str(info)) == f"cpu: AMD EPYC (family 26 model 2, AVX-512), {cores} cores"
    info.write_text(block.format(n=0, fam=25, extra=""))
    assert harness.cpu_description(str(info)) == f"cpu: AMD EPYC (family 25 model 2, AVX2), {cores} cores"
    assert harness.cpu_description(str(tmp_path / "missing")).endswith(f", {cores} cores")


def test_interleave_requires_seconds():
    with pytest.raises(KeyError, match="seconds"):
        harness.interleave({"x": lambda warm: {"t": 1.0}}, reps=1, warmup=0)


def test_paired_ratio():
    slow = [{"seconds": s} for s in (4.0, 6.0, 8.0)]
    fast = [{"seconds": s} for s in (1.0, 2.0, 2.0)]
    r = harness.paired_ratio(slow, fast)
    assert r["ratio"] == pytest.approx(3.0)
    assert r["paired"]["min"] == pytest.approx(3.0) and r["paired"]["max"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------- FLOP formulas
def test_flops_of_the_published_config():
    d, L, v, c = 252, 6, 104, 128
    w = 24 * d * d
    assert roofline.flops_cached_step(PUBLISHED, 0) == L * (w + 4 * d) + 2 * d * v
    assert roofline.flops_window_step(PUBLISHED) == L * (c * w + 2 * c * (c + 1) * d) + 2 * d * v
    assert roofline.flops_window_step(PUBLISHED) == pytest.approx(1.2205e9, rel=1e-4)


def test_flops_generation_schedules_like_the_engine():
    c = SMALL.context_length
    exact = roofline.flops_generation(SMALL, 2, 1, 3 * c)
    by_hand = sum(roofline.flops_cached_step(SMALL, p) for p in range(c)) + 2 * c * roofline.flops_window_step(SMALL)
    assert exact == 2 * by_hand
    # stride 1 (keep = C) is exact mode; a larger stride is cheaper once the window is full
    assert roofline.flops_generation(SMALL, 1, 1, 3 * c, keep=c) == exact // 2
    assert roofline.flops_generation(SMALL, 1, 1, 3 * c, keep=c + 1 - 4) < exact // 2


# ----------------------------------------------------------------------------- tuned torch baseline
@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_tuned_torch_matches_the_reference(variant):
    from benchmarks.torch_tuned import TunedGenerator, TunedGPT
    from porting.torch_reference import inverse_cdf_generate, reference_from_config

    cfg = SMALL.replace(variant=variant)
    torch.manual_seed(0)
    ref = reference_from_config(cfg)
    tuned = TunedGPT.from_state_dict(ref.state_dict(), cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        assert (tuned(x) - ref(x)).abs().max() < 1e-5
    u = torch.rand(2, 3 * cfg.context_length)
    for prompt in (torch.zeros((2, 1), dtype=torch.long), x[:, :3]):
        expected = inverse_cdf_generate(ref, prompt, u, cfg.context_length)
        assert torch.equal(TunedGenerator(tuned).generate(prompt, u.shape[1], uniforms=u), expected)


def test_tuned_torch_rejects_foreign_keys():
    from benchmarks.torch_tuned import TunedGPT
    from porting import CheckpointError
    from porting.torch_reference import reference_from_config

    sd = reference_from_config(SMALL).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key: extra.weight"):
        TunedGPT.from_state_dict(sd, SMALL)


# ----------------------------------------------------------------------------- ONNX Runtime
@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_onnx_export_matches_the_reference_and_runs_the_notebook_loop(tmp_path, variant):
    pytest.importorskip("onnxruntime")
    from porting.torch_reference import inverse_cdf_generate, reference_from_config

    cfg = SMALL.replace(variant=variant)
    torch.manual_seed(0)
    ref = reference_from_config(cfg)
    model = onnx_runtime.OrtModel(onnx_runtime.export(ref, str(tmp_path / "m.onnx"), cfg), threads=[1])
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (2, 5), (3, cfg.context_length)):  # batch and length are dynamic
        x = rng.integers(0, cfg.vocab_size, (batch, length))
        with torch.no_grad():
            np.testing.assert_allclose(model.logits(x), ref(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
    num_new = 2 * cfg.context_length  # past the window: the loop crops as the notebook does
    greedy = onnx_runtime.notebook_loop(model, num_new, np.zeros((2, 1)), cfg.context_length, 1, greedy=True)
    want = inverse_cdf_generate(ref, torch.zeros((2, 1), dtype=torch.long), torch.zeros(2, num_new),
                                cfg.context_length, temperature=0)
    np.testing.assert_array_equal(greedy, want.numpy())
    sampled = [onnx_runtime.notebook_loop(model, 20, np.zeros((2, 1)), cfg.context_length, 1,
                                          rng=np.random.default_rng(s)) for s in (1, 1, 2)]
    assert np.array_equal(sampled[0], sampled[1]) and not np.array_equal(sampled[0], sampled[2])
    assert sampled[0].min() >= 0 and sampled[0].max() < cfg.vocab_size


# ----------------------------------------------------------------------------- report
def _doc():
    row = {"name": "generate b1 10", "framework": "jax", "impl": "jaxgpt exact", "batch": 1, "steps": 10,
           "chars": 10, "seconds": 0.5, "chars_per_s": 20.0, "spread": harness.summarize([0.4, 0.5, 0.6]).as_dict(),
           "ttfc_s": 0.01, "achieved_gflops": 1.0, "floor_fraction": 0.25}
    return {"device": "cpu: test", "versions": {"jax": "x"}, "mode": "tiny", "results": [row, dict(row, framework="torch")],
            "ratios": {"r": {"what": "a vs b", "ratio": 2.5, "paired": {"min": 2.0, "max": 3.0}},
                       "inf": {"what": "degenerate", "ratio": float("inf")}},
            "parity": {"weights": "w", "greedy": {"tokens": 10, "agreement": 1.0, "first_divergence": None}}}


def test_report_writes_json_markdown_and_png(tmp_path):
    doc = _doc()
    report.write_json(doc, tmp_path / "r.json")
    report.write_markdown(doc, tmp_path / "r.md")
    report.plot(doc, str(tmp_path / "r.png"))
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["ratios"]["inf"]["ratio"] is None  # JSON has no inf
    assert "| a vs b | **2.5x** | 2-3 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]  # no temporaries left


def test_report_rejects_a_malformed_document():
    doc = _doc()
    doc["results"][0]["framework"] = "tensorflow"
    with pytest.raises(ValueError, match="framework"):
        report.check_document(doc)
    del doc["parity"]
    with pytest.raises(ValueError, match="parity"):
        report.check_document(doc)


# ----------------------------------------------------------------------------- end to end (toy model)
def test_tiny_suite_end_to_end(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = tmp_path / "b.json"
    assert main(["--tiny", "--only", "limits,generation,porting,parity", "--json", str(out), "--markdown",
                 str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")]) == 0
    doc = json.loads(out.read_text())
    report.check_document(doc)
    names = {(r["name"], r["impl"]) for r in doc["results"]}
    n, mark, long = TINY.gen_steps, TINY.gen_mark, TINY.strided_steps
    for expected in [(f"generate b1 {mark}", "jaxgpt exact"), (f"generate b1 {n}", "notebook loop"),
                     (f"generate b1 {long}", "jaxgpt strided"), (f"generate b1 {long}", "notebook loop"),
                     ("port weights.pt", "jaxgpt load_weights")]:
        assert any(name == expected[0] and impl.startswith(expected[1]) for name, impl in names), expected
    for key in (f"gen_b1_{mark}_exact_vs_notebook", f"gen_b1_{n}_exact_vs_notebook",
                f"gen_b1_{long}_strided_vs_notebook", "porting_vs_torch_load"):
        assert doc["ratios"][key]["ratio"] > 0
    assert all(r["seconds"] > 0 and r["spread"]["n"] == TINY.reps for r in doc["results"])
    assert doc["parity"]["logits"]["max_abs_diff"] < 1e-4
    assert doc["parity"]["sampled"]["agreement"] == 1.0
    if onnx_runtime.available():  # the third framework: rows, ratios, parity
        assert any(r["framework"] == "onnxruntime" and r["impl"].startswith("onnxruntime notebook loop")
                   for r in doc["results"])
        assert doc["ratios"][f"gen_b1_{n}_exact_vs_ort_loop"]["ratio"] > 0
        ort = doc["parity"]["onnxruntime"]
        assert ort["max_abs_logit_diff_vs_torch"] < 1e-5 and ort["greedy_vs_jaxgpt"]["agreement"] == 1.0
    assert np.isfinite(doc["flops_per_char"]["window_step"])
    assert "## Ratios" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "nan", "11"])
def test_suite_rejects_a_nonsense_lead_in(value, capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--tiny", "--lead-in", value])
    assert e.value.code == 2 and "--lead-in" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training step
def test_matmul_floor_program_computes_every_product_of_a_step():
    from benchmarks import matmul_floor

    config = GPTConfig(vocab_size=9, context_length=8, model_dim=12, num_blocks=2, num_heads=3)
    run, operands = matmul_floor.matmuls_program(config, batch=2)
    products = run(*operands)
    rows, b, h, t, k = 16, 2, 3, 8, 4
    want = []
    for i, o in [(12, 36), (12, 12), (12, 48), (48, 12)] * 2 + [(12, 9)]:
        want += [(rows, o), (rows, i), (i, o)]  # forward, input gradient, weight gradient
    want += [(b, h, t, t), (b, h, t, k), (b, h, t, t), (b, h, t, k), (b, h, t, k), (b, h, t, k)] * 2
    assert [p.shape for p in products] == want
    x, w, g = (np.asarray(a) for a in operands[0][0])
    np.testing.assert_allclose(np.asarray(products[2]), x.T @ g, rtol=1e-5, atol=1e-4)
    linear = 3 * 2 * rows * sum(i * o for i, o in matmul_floor.projections(config))
    assert matmul_floor.flops(config, 2) == linear + 2 * 6 * 2 * b * h * t * t * k


def test_train_step_benchmark_reports_agreement_and_the_matmul_floor():
    from flax import nnx

    from benchmarks import train_step
    from jaxgpt import GPT

    result = train_step.measure(GPT(SMALL, rngs=nnx.Rngs(0)), batch=2, reps=2, check_batch=2)
    assert set(result["frameworks"]) == {"torch", "jaxgpt", "jax matmuls only"}
    assert result["agreement"]["ok"] and result["agreement"]["grad_max_abs_diff"] <= 1e-5
    floor = result["matmul_floor"]
    assert floor["seconds"] > 0 and floor["best_possible_ratio"] > 0
    assert floor["jaxgpt_step_over_floor"] == pytest.approx(
        result["frameworks"]["jaxgpt"]["seconds"]["median"] / floor["seconds"])
    report = train_step.markdown(result)
    assert "matrix products alone" in report
    for framework in result["frameworks"].values():  # counted per measured round
        assert len(framework["page_faults"]) == len(framework["system_s"]) == 2
        assert all(n >= 0 for n in framework["page_faults"])
    faults = result["frameworks"]["torch"]["page_faults"]
    assert f"| {', '.join(f'{n:,}' for n in faults)} |" in report


# ----------------------------------------------------------------------------- the GPU check
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    """Every step of benchmarks/gpu_check.py, on the CPU with tiny sizes: the real run on a GPU
    machine (no package index there, no second try) must not fail on a typo or a changed API."""
    import subprocess
    import sys

    from benchmarks import gpu_check

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", str(tmp_path)], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in check["steps"]] == ["env", "precision", "suite", "attention", "sharding", "parity"]
    assert all(s["status"] == "ok" for s in check["steps"]), [(s["name"], s["status"]) for s in check["steps"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(gpu_check.OUTPUTS)  # at most 8 files come back
    report.check_document(json.loads((tmp_path / "gpu.json").read_text()))
    assert json.loads((tmp_path / "sharding_gpu.json").read_text())["results"]
    parity = (tmp_path / "parity_gpu.txt").read_text()
    assert "highest: max |logit diff|" in parity and " passed" in parity and "failed" not in parity


def test_gpu_check_skips_what_the_budget_cannot_fit(tmp_path):
    from benchmarks import gpu_check

    assert gpu_check.main([str(tmp_path), "--dry-run", "--budget", "1"]) == 1
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps[0]["status"].startswith("skipped (needs ~5 s, 1 s of the budget left)")
    assert [s["status"] for s in steps[1:]] == ["skipped (the env step did not pass)"] * 5
    assert not (tmp_path / "gpu.json").exists()
