"""Scaling out: sharded generation, data-parallel training, multi-host start-up.

Multi-device behaviour runs in subprocesses with simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is imported):
  - tests/sharding_worker.py on 8 devices: generation on 1/2/8 devices, 20 data-parallel
    training steps on 8 vs 1 device, the compiled step's all-reduce, CLI divisibility errors;
  - `jaxgpt train` as 2 processes x 2 devices joined by jax.distributed (the multi-host path,
    on one machine), against the single-device run of the same command.
Everything else (argument checks, CLI flag combinations) runs here, single-device.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt import engine, sharding
from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.generate import generate_tokens, stream_tokens
from jaxgpt.model import GPT
from tests.sharding_worker import CLI_TRAIN
from tests.test_train import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")


def simulated(devices: int) -> dict:
    """Environment of a subprocess that sees `devices` CPU devices (and no compilation cache)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAXGPT_NO_COMPILE_CACHE": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(corpus(6000), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def worker(text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("worker"))
    done = subprocess.run([sys.executable, WORKER, text_file, out], env=simulated(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------- generation
def test_the_worker_saw_eight_devices(worker):
    assert worker["device_count"] == 8 and worker["default_mesh_size"] == 8
    assert worker["threefry_partitionable"]  # dropout bits drawn shard-locally (JAX's default)


@pytest.mark.parametrize("setting", ["greedy", "multinomial", "filtered"])
@pytest.mark.parametrize("batch", [5, 7, 13])
def test_generation_is_independent_of_the_device_count(worker, setting, batch):
    """B=13 pads to 14 rows on 2 devices and 16 on 8; B=5 pads to 6 on 2 and uses 5 of the 8;
    B=7 pads to 8 on 2 devices, where the decode attention reads the cache in blocks
    (`jaxgpt.model.decodes_in_blocks`), against 7 rows that read it whole on one device."""
    tokens = worker["generation"]["tokens"]
    single = np.array(tokens[f"{batch}/{setting}/1"])
    assert single.shape == (batch, 48)
    for devices in (2, 8):
        np.testing.assert_array_equal(np.array(tokens[f"{batch}/{setting}/{devices}"]), single,
                                      err_msg=f"{devices} devices")
    if setting != "greedy":
        assert len({tuple(row) for row in single.tolist()}) == batch  # rows are independent draws


def test_default_devices_and_chunking_give_the_same_tokens(worker):
    tokens = worker["generation"]["tokens"]
    assert tokens["13/filtered/default-chunked"] == tokens["13/filtered/1"]


def test_the_generation_loop_really_ran_split_over_eight_devices(worker):
    carry = worker["generation"]["sharded_carry"]
    for name in ("stream", "cache_k"):
        facts = carry[name]
        assert facts["spec"] == "P('data',)" and facts["num_devices"] == 8, name
        assert [shape[0] for shape in facts["shard_shapes"]] == [2] * 8, name  # 13 rows padded to 16


def test_a_batch_padding_to_the_same_size_does_not_recompile(worker):
    assert worker["generation"]["retraced_for_14_rows"] is False  # 13 and 14 rows both run as 16
    # 7 chunks, one program (the prefill runs at batch 1 whatever the slots: compiled already)
    assert worker["generation"]["chunked_traces"] == {"prefill": 0, "insert": 1, "generate": 1}


# ----------------------------------------------------------------------------- training
def test_data_parallel_training_matches_one_device(worker):
    """20 steps, dropout on, same global batch and seed: 8 devices vs 1 within 1e-5."""
    training = worker["training"]
    one, eight = np.array(training["losses"]["1"]), np.array(training["losses"]["8"])
    assert len(one) == len(eight) == 20
    np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(training["val_losses"]["8"], training["val_losses"]["1"], rtol=0, atol=1e-5)
    assert one[-1] < one[0] - 0.5  # it learned something: the comparison is not between two flat lines


def test_data_parallel_params_are_replicated_and_the_compiler_averages_gradients(worker):
    training = worker["training"]
    assert training["params_sharding"]["8"] == {"spec": "P()", "num_devices": 8}
    assert training["params_sharding"]["1"] == {"spec": "P()", "num_devices": 1}
    assert training["all_reduce_in_step"]


def test_evaluation_is_independent_of_the_device_count(worker):
    results = worker["evaluation"]
    one = results["1"]
    assert one["num_chars"] == 2999 and 1.0 < one["nats_per_char"] < 10.0
    for devices in ("3", "8", "default"):
        assert results[devices]["num_chars"] == one["num_chars"], devices
        assert abs(results[devices]["nats_per_char"] - one["nats_per_char"]) < 1e-6, devices
    cli = worker["cli"]["eval_too_many_devices"]
    assert cli["code"] == 1 and cli["stderr"] == "jaxgpt: error: --devices 9: must be between 1 and the 8 available devices\n"


def test_a_batch_that_does_not_split_is_refused(worker):
    assert worker["training"]["indivisible_batch_error"].startswith(
        "DataParallelError: batch_size 12 does not divide by the 8 devices")
    cli = worker["cli"]["indivisible"]
    assert cli["code"] == 1 and cli["stderr"].count("\n") == 1
    assert cli["stderr"].startswith("jaxgpt: error: --batch-size 12 does not divide by the 8 devices")
    assert not worker["cli"]["indivisible_out_exists"]


# The words of gloo's connection message ("[Gloo] Rank 1 is connected to 3 peer ranks. Expected
# number of connected peer ranks is : 3"); gloo writes it piece by piece from its own threads, so
# its pieces can land on lines of their own, or run into another rank's message with no space
# between ("... is : 3[Gloo] Rank 3 ..."). Numbers and "[Gloo]" are therefore split out of the
# words first; a line of only these words and numbers is gloo's.
GLOO_WORDS = {"[Gloo]", "Rank", "is", "connected", "to", "peer", "ranks", "ranks.", "Expected", "number", "of", ":"}
GLOO_PIECES = re.compile(r"\[Gloo\]|\d+|[^\s\d\[]+|\S")


def is_gloo_log(line: str) -> bool:
    return all(word in GLOO_WORDS or word.isdigit() for word in GLOO_PIECES.findall(line))


def test_gloo_messages_are_told_from_reports():
    message = "[Gloo] Rank {} is connected to 3 peer ranks. Expected number of connected peer ranks is : 3"
    assert is_gloo_log(message.format(1))
    assert is_gloo_log(message.format(2) + message.format(3))  # two ranks' messages run together
    assert is_gloo_log("[Gloo] Rank [Gloo] Rank 23 is connected to  is connected to 3")  # interleaved pieces
    assert not is_gloo_log("wrote /tmp/out/weights.pt, /tmp/out/history.json")
    assert not is_gloo_log(message.format(2) + "step 3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(worker, text_file, tmp_path):
    """The multi-host path on one machine: 2 processes x 2 CPU devices, jax.distributed over
    localhost (gloo collectives). Same history as the single-device run of the same command;
    process 0 alone reports and writes the run's files; orbax checkpoints from both."""
    assert worker["cli"]["reference"] == {"code": 0, "stderr": ""}
    out = str(tmp_path / "two")
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "jaxgpt.cli", "train", "--text", text_file, "--out", out, *CLI_TRAIN,
               "--coordinator-address", address, "--num-processes", "2"]
    processes = [subprocess.Popen([*command, "--process-id", str(i)], env=simulated(2), cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for p, (stdout, stderr) in zip(processes, results):
        assert p.returncode == 0, stderr[-3000:]
    # (gloo, the CPU collectives library, logs its connections on stdout itself: `is_gloo_log`)
    reports = [[line for line in stdout.splitlines() if not is_gloo_log(line)] for stdout, _ in results]
    assert reports[0][-1].startswith("wrote ") and reports[1] == []
    with open(worker["cli"]["reference_history"]) as f:
        reference = json.load(f)
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    assert [r["step"] for r in history] == [r["step"] for r in reference] == list(range(1, 7))
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([r.get(key, 0.0) for r in history], [r.get(key, 0.0) for r in reference],
                                   rtol=0, atol=1e-5, err_msg=key)
    assert sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.isdigit()) == ["3", "6"]
    assert {"weights.pt", "vocab.json", "loss_curve.png"} <= set(os.listdir(out))


# ----------------------------------------------------------------------------- single-device checks
@pytest.mark.parametrize("devices, message", [
    (0, "devices=0: must be between 1 and the 1 available device"),
    (2, "devices=2: must be between 1"),
    (True, "pass devices=1"),
    (False, "pass devices=1"),
    ("all", "devices must be None"),
    ([], "devices must be None"),
    ([0], "devices must be None"),
    (1.0, "devices must be None"),
])
def test_a_bad_devices_value_raises_before_anything_runs(devices, message):
    model = GPT(GPTConfig(vocab_size=12, context_length=8, model_dim=8, num_blocks=1, num_heads=2))
    before = dict(engine.TRACE_COUNTS)
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, [[1, 2]], 3, devices=devices)
    with pytest.raises(ValueError, match=message):
        stream_tokens(model, [[1, 2]], 3, chunk_size=1, devices=devices)
    assert dict(engine.TRACE_COUNTS) == before


def test_device_lists():
    device = jax.local_devices()[0]
    assert sharding.resolve_devices([device]) == [device] == sharding.resolve_devices(None)
    with pytest.raises(ValueError, match="listed twice"):
        sharding.resolve_devices([device, device])
    with pytest.raises(ValueError, match="not one of the available devices"):
        sharding.resolve_devices([device], pool=[])
    model = GPT(GPTConfig(vocab_size=12, context_length=8, model_dim=8, num_blocks=1, num_heads=2))
    np.testing.assert_array_equal(generate_tokens(model, [[1, 2]], 5, seed=3, devices=[device]),
                                  generate_tokens(model, [[1, 2]], 5, seed=3, devices=None))


def test_padding_helpers():
    assert [sharding.padded_size(b, 8) for b in (1, 8, 9, 16)] == [8, 8, 16, 16]
    rows = np.arange(10).reshape(5, 2)
    padded = sharding.pad_rows(rows, 4)
    assert padded.shape == (8, 2) and padded.dtype == rows.dtype
    np.testing.assert_array_equal(padded[:5], rows)
    assert not padded[5:].any()
    assert sharding.pad_rows(rows, 5) is rows


@pytest.mark.parametrize("kw, message", [
    (dict(num_processes=2), "num_processes given without coordinator_address and process_id"),
    (dict(coordinator_address="h:1", process_id=0), "given without num_processes"),
    (dict(coordinator_address="host", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="host:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="host:80", num_processes=0, process_id=0), "num_processes must be a positive"),
    (dict(coordinator_address="host:80", num_processes=2, process_id=2), r"process_id must be an integer in 0\.\.1"),
    (dict(coordinator_address="host:80", num_processes=2, process_id=-1), "process_id"),
    (dict(local_device_ids=[0, 0]), "twice"),
    (dict(local_device_ids=[-1]), "non-negative"),
])
def test_inconsistent_distributed_settings_are_refused(kw, message):
    with pytest.raises(sharding.DistributedError, match=message):
        sharding.initialize_distributed(**kw)
    assert not jax.distributed.is_initialized()


def test_good_distributed_settings_pass_the_check():
    sharding.check_distributed("10.0.0.1:1234", 2, 1, [0, 1])
    sharding.check_distributed("[::1]:8476", 1, 0)
    sharding.check_distributed()  # auto-detection


@pytest.fixture
def no_compile_cache(monkeypatch):
    monkeypatch.setenv("JAXGPT_NO_COMPILE_CACHE", "1")


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2"], "--num-processes given without --coordinator-address and --process-id"),
    (["--coordinator-address", "localhost:1234"], "--coordinator-address given without --num-processes and "
                                                  "--process-id"),
    (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"], "--coordinator-address "
                                                                                          "must be HOST:PORT"),
    (["--coordinator-address", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be an integer in 0..1"),
    (["--local-device-ids", "0,1"], "--local-device-ids applies to multi-process runs"),
    (["--distributed", "--local-device-ids", "0,x"], "--local-device-ids must be comma-separated integers"),
    (["--devices", "2"], "--devices 2: must be between 1 and the 1 available device"),
])
def test_train_cli_refuses_bad_device_flags_in_one_line(flags, message, text_file, tmp_path, capsys,
                                                        no_compile_cache):
    out = tmp_path / "out"
    code = main(["train", "--text", text_file, "--out", str(out), *CLI_TRAIN, *flags])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.startswith("jaxgpt: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert not out.exists() and not jax.distributed.is_initialized()


def test_generate_cli_refuses_more_devices_than_visible(capsys, no_compile_cache):
    code = main(["generate", "--num-chars", "5", "--devices", "3", "-q"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err == "jaxgpt: error: --devices 3: must be between 1 and the 1 available device\n"


def test_the_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/sharding.py on a toy model: both child processes, the table, the JSON (no timing asserted)."""
    out = tmp_path / "sharding.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.sharding", "--tiny", "--reps", "1", "--batches", "8",
                           "--num-chars", "4", "--json", str(out), "--markdown", str(tmp_path / "sharding.md")],
                          cwd=ROOT, env=simulated(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["process"], r["devices"]): r for r in doc["results"]}
    assert set(rows) == {("8 simulated devices", 1), ("8 simulated devices", 8), ("plain (1 device)", 1)}
    assert all(r["chars"] == 32 and r["chars_per_s"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())
    assert [(q["batch"], q["devices"]) for q in doc["ratios"]] == [(8, 8)]
    assert "| 8 | 8 | 8 simulated devices |" in (tmp_path / "sharding.md").read_text()
