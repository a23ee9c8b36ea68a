"""`jaxgpt serve` refuses unsafe or impossible settings with one line, before loading anything."""

from __future__ import annotations

import socket

import pytest

from jaxgpt.cli import main


def run(argv, capsys):
    code = main(["serve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_a_non_loopback_bind_without_a_key_is_refused(host, capsys, monkeypatch):
    monkeypatch.delenv("JAXGPT_API_KEY", raising=False)
    code, out, err = run(["--host", host], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"jaxgpt: error: --host {host} is not a loopback address") and "--insecure" in err
    assert err.count("\n") == 1


def test_an_empty_key_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("JAXGPT_API_KEY", " ")
    code, _, err = run([], capsys)
    assert code == 1 and err == "jaxgpt: error: --api-key: the key is empty\n"


def test_a_taken_port_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(["--port", str(port)], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"jaxgpt: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1



def test_serve_freezes_the_start_up_objects_out_of_the_collector(tmp_path_factory, capsys, monkeypatch):
    """A full collection would walk every start-up object and stall all requests meanwhile."""
    import gc
    import logging

    from jaxgpt.serving import server
    from tests.cli_helpers import small_checkpoint

    weights = small_checkpoint(tmp_path_factory, "serve", 5)
    frozen = []

    class Recorder:  # instead of uvicorn (whose logging set-up would replace pytest's): what run() would see
        def __init__(self, app, sock, **kwargs):
            sock.close()

        def run(self):
            frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(server, "Server", Recorder)
    log = logging.getLogger("jaxgpt.serve")
    monkeypatch.setattr(log, "handlers", [])  # the command's handler (on the captured stderr) goes afterwards
    monkeypatch.setattr(log, "propagate", True)
    try:
        code, _, _ = run(["--weights", weights, "--port", "0", "--max-batch", "2", "-q"], capsys)
    finally:
        gc.unfreeze()
    assert code == 0 and frozen and frozen[0] > 10_000
