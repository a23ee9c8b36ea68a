"""`jaxgpt serve` as a process: the ready line, and Ctrl-C / SIGTERM end running streams and exit 0."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import httpx
import pytest

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from porting import save_flax
    from tests.serve_helpers import small_model

    path = tmp_path_factory.mktemp("serve") / "small.safetensors"
    save_flax(small_model(), path)
    return str(path)


@pytest.fixture(scope="module")
def compile_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-cache"))


def read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no line from the server in time"
    return stream.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_running_streams_and_exits_0(weights, compile_cache_dir, sig):
    # A private compilation cache: the second process loads what the first compiled.
    env = {**os.environ, "JAXGPT_CACHE_DIR": compile_cache_dir, "JAXGPT_API_KEY": "k"}
    env.pop("JAXGPT_NO_COMPILE_CACHE", None)
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.cli", "serve", "--weights", weights, "--port", "0",
                             "--max-batch", "2", "--max-tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = read_line(proc.stdout, 120)
        assert line.startswith("jaxgpt: serving http://127.0.0.1:") and line.endswith("(2 slots; Ctrl-C stops)\n")
        url = line.split()[2]
        events = []
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                          json={"prompt": "a", "max_tokens": 1000000, "stream": True}) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            proc.send_signal(sig)
            stopped = time.monotonic()
            events += [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - stopped
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["message"] == "the server is shutting down"
    assert 2.5 < ended < 8  # the grace period (3 s), then the final error event
    assert "Traceback" not in proc.stderr.read()
