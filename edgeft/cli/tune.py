"""``edgeft tune``: flags -> ``TuneConfig`` -> ``edgeft.tune.tune``. Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeft.cli.app import app
from edgeft.artifact import Task
from edgeft.tune.config import ClassWeights, Device, FrozenCache, Optim, Precision, Schedule, SelectMetric

_DATA = "Data"
_TRAIN = "Training"
_MODEL = "Model"


@app.command()
def tune(
    model: str = typer.Option(..., "--model", "-m", rich_help_panel=_MODEL,
                              help="Base model: a pulled name (smollm2-135m-instruct, minilm-l6), a Hugging Face folder or a hub id."),
    data: Path = typer.Option(..., "--data", "-d", rich_help_panel=_DATA,
                              help="Training data: .csv/.tsv/.jsonl/.json with columns, or plain .txt."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (refused if it exists, unless --overwrite)."),
    task: Task = typer.Option(None, show_default=False,
                              help="causal-lm or classification [default: classification when the data has a label column, else causal-lm]."),
    eval_data: Path = typer.Option(None, "--eval-data", rich_help_panel=_DATA,
                                   help="Evaluation data; without it a seeded held-out split of --data."),
    eval_fraction: float = typer.Option(0.1, rich_help_panel=_DATA, help="Held-out fraction when there is no --eval-data."),
    text_col: str = typer.Option(None, "--text-col", rich_help_panel=_DATA, help="Text column (default: detected by name)."),
    label_col: str = typer.Option(None, "--label-col", rich_help_panel=_DATA, help="Label column (default: detected by name)."),
    max_length: int = typer.Option(None, rich_help_panel=_DATA,
                                   help="Tokens per example or text block (default 128 classification, 256 causal-lm); longer text is truncated with one warning."),
    max_eval_examples: int = typer.Option(None, rich_help_panel=_DATA, help="Evaluate on at most this many examples/blocks."),
    trainable_layers: int = typer.Option(2, "--trainable-layers", "-n", rich_help_panel=_MODEL,
                                         help="Top transformer blocks to train, with the final norm and the head."),
    base_precision: Precision = typer.Option(Precision.int8, rich_help_panel=_MODEL,
                                             help="Precision of the frozen part: int8 is bitsandbytes LLM.int8."),
    untie_head: bool = typer.Option(False, "--untie-head", rich_help_panel=_MODEL,
                                    help="Train a tied LM head as its own copy (default: a tied head stays frozen with the embeddings)."),
    train_embeddings: bool = typer.Option(False, "--train-embeddings", rich_help_panel=_MODEL,
                                          help="Also train the embeddings (full fine-tuning with -n = all blocks and fp32)."),
    epochs: float = typer.Option(1.0, rich_help_panel=_TRAIN, help="Passes over the training data (fractions allowed)."),
    max_steps: int = typer.Option(None, rich_help_panel=_TRAIN, help="Optimizer steps; overrides --epochs."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", rich_help_panel=_TRAIN, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(1, rich_help_panel=_TRAIN, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, rich_help_panel=_TRAIN, help="Peak learning rate."),
    weight_decay: float = typer.Option(0.01, rich_help_panel=_TRAIN, help="AdamW weight decay (not on biases and norms)."),
    warmup: float = typer.Option(0.06, rich_help_panel=_TRAIN, help="Warmup: fraction of steps if < 1, else steps."),
    schedule: Schedule = typer.Option(Schedule.cosine, rich_help_panel=_TRAIN, help="Decay after warmup."),
    optimizer: Optim = typer.Option(Optim.adamw, rich_help_panel=_TRAIN, help="adamw or bitsandbytes' 8-bit adamw8bit."),
    max_grad_norm: float = typer.Option(1.0, rich_help_panel=_TRAIN, help="Gradient clipping norm (0: off)."),
    class_weights: ClassWeights = typer.Option(ClassWeights.none, rich_help_panel=_TRAIN,
                                               help="balanced: weigh rare labels up in the loss."),
    eval_every: int = typer.Option(0, rich_help_panel=_TRAIN, help="Evaluate every N steps and keep the best (0: each epoch)."),
    checkpoint_every: int = typer.Option(0, rich_help_panel=_TRAIN, help="Checkpoint every N steps (0: at each evaluation)."),
    patience: int = typer.Option(0, rich_help_panel=_TRAIN, help="Stop after N evaluations without improvement (0: off)."),
    select_metric: SelectMetric = typer.Option(SelectMetric.auto, rich_help_panel=_TRAIN,
                                               help="What picks the best evaluation. auto: macro_f1 when the labels are imbalanced "
                                                    "(the most common over 1.5x the rarest), else accuracy; loss for causal-lm."),
    group_by_length: bool = typer.Option(True, "--group-by-length/--no-group-by-length", rich_help_panel=_TRAIN,
                                         help="Batch examples of similar length together (less padding, seeded order)."),
    eval_batch_size: int = typer.Option(32, rich_help_panel=_TRAIN, help="Examples per evaluation batch."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", rich_help_panel=_TRAIN,
                                                help="Recompute activations of trained blocks in backward (less memory)."),
    frozen_cache: FrozenCache = typer.Option(
        FrozenCache.auto, rich_help_panel=_TRAIN,
        help="Run the frozen blocks once per example: their output is cached on disk in OUT.partial and fed to the "
             "top blocks from the second pass on (and to every evaluation after the first). auto: on when training "
             "makes more than one pass and the disk has room; always off when something below the top blocks trains."),
    keep_cache: bool = typer.Option(False, "--keep-cache", rich_help_panel=_TRAIN,
                                    help="Keep the frozen cache after the run (OUT.frozen-cache; a later run of OUT reuses it when nothing it depends on changed)."),
    seed: int = typer.Option(0, rich_help_panel=_TRAIN, help="Seed for the split, the data order, the new head and dropout."),
    device: Device = typer.Option(Device.auto, help="auto: CUDA when visible (bf16 autocast), else CPU."),
    threads: int = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.partial's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (and discard OUT.partial)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Fine-tune the top blocks of a model over a frozen 8-bit base; write a run folder.

    The embeddings and lower blocks are frozen and loaded in 8-bit (bitsandbytes LLM.int8);
    the top N blocks, the final norm and the head train in fp32. A head tied to the
    embeddings (SmolLM2, GPT-2) stays frozen unless --untie-head. The run folder holds
    only the trained parameters (trained.safetensors), run.json (base name and sha256),
    config.json, the tokenizer, labels.json, metrics.json (before and after), log.jsonl
    and loss.png. Work happens in OUT.partial, which --resume continues after a Ctrl-C.

    Causal LM data: plain text is cut into blocks; instruction/chat rows (messages,
    instruction/input/output, prompt/completion) use the chat template, loss on the answer.
    """
    from edgeft.tune import TuneConfig
    from edgeft.tune import tune as run_tune

    config = TuneConfig(
        model=model, data=data, out=out, task=task, eval_data=eval_data, eval_fraction=eval_fraction,
        text_col=text_col, label_col=label_col, trainable_layers=trainable_layers, base_precision=base_precision,
        train_embeddings=train_embeddings, untie_head=untie_head, max_length=max_length, batch_size=batch_size,
        grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
        schedule=schedule, optimizer=optimizer, max_grad_norm=max_grad_norm, class_weights=class_weights,
        group_by_length=group_by_length, eval_every=eval_every, checkpoint_every=checkpoint_every, patience=patience,
        select_metric=select_metric, eval_batch_size=eval_batch_size,
        max_eval_examples=max_eval_examples, gradient_checkpointing=gradient_checkpointing,
        frozen_cache=frozen_cache, keep_cache=keep_cache, seed=seed, device=device,
        threads=threads, resume=resume, overwrite=overwrite, progress=progress,
    )
    folder = run_tune(config)
    typer.echo(_summary(folder))


def _summary(folder: Path) -> str:
    import json

    m = json.loads((folder / "metrics.json").read_text())
    before, after = m.get("before") or {}, m.get("after") or {}
    if Task(m["task"]) is Task.classification:
        figures = (f"accuracy {before.get('accuracy', 0):.4f} -> {after.get('accuracy', 0):.4f}, "
                   f"macro F1 {before.get('macro_f1', 0):.4f} -> {after.get('macro_f1', 0):.4f}")
    else:
        figures = f"perplexity {before.get('perplexity', 0):.2f} -> {after.get('perplexity', 0):.2f}"
    line = (f"{folder}: {figures} (best step {m['best_step']} of {m['steps']} by {m.get('select_metric', 'accuracy')}, "
            f"{m['train_seconds']:.0f}s)")
    warnings = m.get("warnings") or []
    return line + "".join(f"; WARNING: {w}" for w in warnings)
