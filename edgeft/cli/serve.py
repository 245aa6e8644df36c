"""``edgeft serve``: flags (each also an ``EDGEFT_*`` environment variable) -> ``ServeConfig`` -> ``serve``."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from edgeft.cli.app import app


class LogFormat(str, enum.Enum):
    """Mirrors ``edgeft.runtime.server.LogFormat`` (kept here so --help imports nothing heavy)."""

    text = "text"
    json = "json"


@app.command()
def serve(
    artifacts: list[Path] = typer.Argument(
        ..., envvar="EDGEFT_ARTIFACTS", show_default=False,
        help="Artifact folders or packed .edgeft files (env: EDGEFT_ARTIFACTS, separated by ':', ';' on Windows)."),
    name: list[str] = typer.Option(
        [], "--name", envvar="EDGEFT_NAMES", show_default=False,
        help="Model name for each artifact, in order (default: the folder or file name). "
             "Repeat per artifact (env: space-separated)."),
    host: str = typer.Option("127.0.0.1", envvar="EDGEFT_HOST",
                             help="Address to bind. 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, envvar="EDGEFT_PORT", help="Port to listen on."),
    api_key: str = typer.Option(None, envvar="EDGEFT_API_KEY", show_default=False,
                                help="Require 'Authorization: Bearer KEY' on every /v1 route, and on /metrics "
                                     "unless --metrics-key is given (/health stays open for probes)."),
    metrics_key: str = typer.Option(None, envvar="EDGEFT_METRICS_KEY", show_default=False,
                                    help="Require 'Authorization: Bearer KEY' on /metrics (this key or the API key): "
                                         "give it to the Prometheus scraper instead of the API key."),
    threads: int = typer.Option(None, envvar="EDGEFT_THREADS", show_default=False,
                                help="onnxruntime threads per model (default: all cores). Match the CPU limit."),
    workers: int = typer.Option(1, envvar="EDGEFT_WORKERS",
                                help="Generations run at once per model (each holds its own engine)."),
    queue_size: int = typer.Option(16, envvar="EDGEFT_QUEUE_SIZE",
                                   help="Requests that may wait per model; more get 429."),
    max_tokens: int = typer.Option(1024, envvar="EDGEFT_MAX_TOKENS", help="Largest max_tokens a request may ask."),
    max_body_bytes: int = typer.Option(1 << 20, envvar="EDGEFT_MAX_BODY_BYTES",
                                       help="Largest request body; larger gets 413."),
    max_inputs: int = typer.Option(256, envvar="EDGEFT_MAX_INPUTS", help="Texts per /v1/classify request."),
    batch_size: int = typer.Option(32, envvar="EDGEFT_BATCH_SIZE", help="Most texts per classifier run."),
    batch_wait_ms: float = typer.Option(5.0, envvar="EDGEFT_BATCH_WAIT_MS",
                                        help="How long a classify request waits for others to batch with."),
    max_connections: int = typer.Option(512, envvar="EDGEFT_MAX_CONNECTIONS",
                                        help="Open connections at most; more get 503."),
    drain_timeout: float = typer.Option(30.0, envvar="EDGEFT_DRAIN_TIMEOUT",
                                        help="Seconds SIGTERM waits for in-flight requests."),
    log_format: LogFormat = typer.Option(LogFormat.text, envvar="EDGEFT_LOG_FORMAT",
                                         help="json: one JSON object per line."),
    log_level: str = typer.Option("info", envvar="EDGEFT_LOG_LEVEL", help="debug, info, warning or error."),
    trusted_key: list[Path] = typer.Option(
        [], "--trusted-key", envvar="EDGEFT_TRUSTED_KEY", show_default=False,
        help="Public key (PEM, from edgeft keygen): serve only artifacts signed by it. Repeat for several "
             "(key rotation); env: files separated by ':'."),
) -> None:
    """Serve artifacts over an OpenAI-compatible HTTP API (completions, chat, classify, /health, /metrics).

    Every artifact is checked byte by byte when it loads (digest, checksums; with --trusted-key, its signature)."""
    from edgeft.runtime import server

    config = server.ServeConfig(
        artifacts=tuple(artifacts), names=tuple(name), host=host, port=port, api_key=api_key or None,
        metrics_key=metrics_key or None, threads=threads, workers=workers, queue_size=queue_size, max_tokens=max_tokens,
        max_body_bytes=max_body_bytes, max_inputs=max_inputs, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
        max_connections=max_connections, drain_timeout=drain_timeout,
        log_format=server.LogFormat(log_format.value), log_level=log_level, trusted_keys=tuple(trusted_key),
    )
    server.serve(config)
