"""``edgeft export``: flags -> ``ExportConfig`` -> ``edgeft.export.export`` (torch loads only when it runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.artifact import Task
from edgeft.export.config import Int8Mode, Quantize


def _sizes(text: str | None) -> tuple[int, ...]:
    from edgeft.errors import EdgeftError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()
    except ValueError:
        raise EdgeftError(f"--truncation-dims takes whole numbers separated by commas, not {text!r}") from None


@app.command()
def export(
    source: str = typer.Argument(..., help="Run folder from `edgeft tune`, a pulled model name, a Hugging Face folder or a hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to write (refused if it exists, see --overwrite)."),
    quantize: Quantize = typer.Option(Quantize.int8, "--quantize", "-q",
                                      help="Weights: none (fp32), int8, int4, mixed (MLP input projections of the middle blocks 4-bit, the rest 8-bit) or auto (smallest that passes the gate)."),
    task: Task = typer.Option(None, "--task", show_default=False,
                                  help="causal-lm or classification for a bare base model whose architecture does not say; embedding for an encoder (a base, or a classifier run without its head)."),
    eval_data: Path = typer.Option(None, "--eval-data", show_default=False,
                                   help="Held-out data for the gate (default: the run's eval data, else built-in texts)."),
    block_size: int = typer.Option(32, "--block-size", help="Block size of weight-only quantization: 16, 32, 64, 128 or 256."),
    int8_activations: bool = typer.Option(True, "--int8-activations/--fp32-activations",
                                          help="Decoders: quantized matmuls compute on int8 activations (faster) or fp32 (closer to PyTorch)."),
    int8_mode: Int8Mode = typer.Option(Int8Mode.best, "--int8-mode",
                                       help="Classifiers: dynamic, weight-only, or best (gate both; of those that pass, the most matmuls on int8 activations, then the smaller; the reason goes in the manifest)."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Gate (classifiers): accuracy drop budget, in points; a drop over it fails when significant (McNemar p < 0.05), over 3x it always."),
    min_label_agreement: float = typer.Option(0.97, "--min-label-agreement", help="Gate (classifiers): least share of labels equal to PyTorch's."),
    min_cosine: float = typer.Option(0.99, "--min-cosine", help="Gate (embeddings): least mean cosine similarity to PyTorch's vectors."),
    max_perplexity_increase: float = typer.Option(5.0, "--max-perplexity-increase", help="Gate (LMs): allowed perplexity rise, in percent."),
    min_token_agreement: float = typer.Option(0.80, "--min-token-agreement", help="Gate (LMs): least share of greedy tokens equal to PyTorch's."),
    max_repetition_increase: float = typer.Option(0.20, "--max-repetition-increase",
                                                  help="Gate (LMs): allowed rise in repeated 4-grams of greedy continuations (catches looping)."),
    gate_texts: int = typer.Option(None, "--gate-texts", show_default=False,
                                   help="Held-out texts the gate scores (default: 32 for LMs, 1000 for classifiers)."),
    context_length: int = typer.Option(None, "--context-length", show_default=False, help="Decoder context recorded in the manifest (default: the model's)."),
    max_length: int = typer.Option(None, "--max-length", show_default=False, help="Classifier: longest input in tokens (default: the run's, else 128)."),
    labels: str = typer.Option(None, "--labels", show_default=False, help="Classifier label names, comma-separated (default: the run's)."),
    truncation_dims: str = typer.Option(None, "--truncation-dims", show_default=False,
                                        help="Embeddings: comma-separated sizes the model was trained to be truncated to (Matryoshka); the server's `dimensions` takes only these."),
    threads: int = typer.Option(None, "--threads", show_default=False, help="Threads for PyTorch and the gate's onnxruntime sessions."),
    allow_degraded: bool = typer.Option(False, "--allow-degraded", help="Write the artifact even if the gate fails (marked degraded)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact at --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    sign: Path = typer.Option(None, "--sign", show_default=False,
                              help="Ed25519 private key (PEM, from edgeft keygen) to sign the artifact with."),
) -> None:
    """Export a tuned run or a base model to a quantized ONNX artifact, gated against PyTorch."""
    from edgeft.export import ExportConfig
    from edgeft.export import export as run_export

    config = ExportConfig(
        source=source, out=out, quantize=quantize, task=task, overwrite=overwrite, allow_degraded=allow_degraded,
        eval_data=eval_data, block_size=block_size, int8_mode=int8_mode,
        int8_activations=int8_activations, max_accuracy_drop=max_accuracy_drop,
        min_label_agreement=min_label_agreement, min_cosine=min_cosine, max_perplexity_increase=max_perplexity_increase,
        min_token_agreement=min_token_agreement, max_repetition_increase=max_repetition_increase,
        gate_texts=gate_texts, context_length=context_length, max_length=max_length,
        labels=tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else None, threads=threads,
        truncation_dims=_sizes(truncation_dims),
        progress=progress, sign_key=sign,
    )
    path = run_export(config)
    typer.echo(str(path))
