"""``edgeft serve``: ``ServeConfig``'s fields as flags (each also an ``EDGEFT_*`` variable) -> ``serve``."""

from __future__ import annotations

from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.serve_config import ServeConfig


@app.command()
@from_config(ServeConfig)
def serve(config: ServeConfig) -> None:
    """Serve artifacts over an OpenAI-compatible HTTP API (completions, chat, classify, /health, /metrics).

    Every artifact is checked byte by byte when it loads (digest, checksums; with --trusted-key, its signature).
    Classifiers tuned from one base share one trunk session (the log names them); with --api-key and
    --model-dir, POST /v1/models/load and /v1/models/unload change the served models while it runs."""
    from edgeft.runtime.serve import serve as run

    run(config)
