"""``edgeft bench ARTIFACT``: ``BenchConfig``'s fields as flags -> ``bench_artifact``; prints a summary or JSON."""

from __future__ import annotations

import typer

from edgeft.bench_config import BenchConfig
from edgeft.cli.app import app
from edgeft.cli.options import from_config


@app.command()
@from_config(BenchConfig)
def bench(
    config: BenchConfig,
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Measure one artifact alone: decode/prefill tokens/s and time to first token, or classification
    throughput and latency per batch size; peak memory. Compare systems with `make bench`."""
    import json

    from edgeft.bench import bench_artifact, format_report

    result = bench_artifact(config)
    typer.echo(json.dumps(result, indent=2) if json_out else format_report(result))
