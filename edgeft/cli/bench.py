"""``edgeft bench ARTIFACT``: flags -> ``BenchConfig`` -> ``bench_artifact``; prints a summary or JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeft.cli.app import app


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="Artifact folder or packed .edgeft file."),
    threads: int = typer.Option(None, help="onnxruntime threads (default: every core).", show_default=False),
    repeats: int = typer.Option(5, help="Measured runs per figure (each figure is their median)."),
    warmup: int = typer.Option(1, help="Unmeasured runs first."),
    new_tokens: int = typer.Option(64, help="Tokens generated per decode run (generation artifacts)."),
    prompt_length: list[int] = typer.Option([32, 512], "--prompt-length",
                                            help="Prompt lengths at which prefill is timed; repeat the flag."),
    batch_size: list[int] = typer.Option([1, 8, 32], "--batch-size",
                                         help="Batch sizes for a classifier; repeat the flag."),
    bandwidth: bool = typer.Option(True, help="Also measure the machine's read bandwidth (about 5 s) and report "
                                              "decode tokens/s as a share of the limit it sets."),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Measure one artifact alone: decode/prefill tokens/s and time to first token, or classification
    throughput and latency per batch size; peak memory. Compare systems with `make bench`."""
    import json

    from edgeft.bench import BenchConfig, bench_artifact, format_report

    config = BenchConfig(artifact=artifact, threads=threads, repeats=repeats, warmup=warmup,
                         new_tokens=new_tokens, prompt_lengths=tuple(prompt_length), batch_sizes=tuple(batch_size),
                         bandwidth=bandwidth)
    result = bench_artifact(config)
    typer.echo(json.dumps(result, indent=2) if json_out else format_report(result))
