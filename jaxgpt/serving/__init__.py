"""`jaxgpt serve`: an OpenAI-compatible completion server over the continuous-batching engine.

    protocol.py   request schema, validation into engine options, response and chunk bodies
    scheduler.py  the thread that drives one `jaxgpt.batching.Batcher` (design in its docstring)
    metrics.py    counters and histograms in the Prometheus text format
    app.py        the FastAPI application: routes, auth, body limit, errors, streaming
    static/       the web page (issue 15), served at / when present
"""

from jaxgpt.serving.app import create_app

__all__ = ["create_app"]
