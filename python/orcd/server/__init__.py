"""`orcd serve`: an HTTP server over orcd's batch engine (pip install "orcd[server]").

    app.py          routes, authentication, /health, /metrics, lifecycle (load, drain)
    openai_api.py   /v1/chat/completions, /v1/completions, /v1/models
    openai_params.py  OpenAI request parsing and validation -> SamplingParams
    worker_api.py   /execute (SSE), /cancel: the original worker's contract
    engine.py       tokenizer + chat template + BatchRunner -> text pieces for asyncio
    metrics.py      the Prometheus registry of one server
    state.py        what the handlers share; errors.py: error bodies
"""
from .app import create_app, run, serve  # noqa: F401
