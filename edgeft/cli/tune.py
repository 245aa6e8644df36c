"""``edgeft tune``: ``TuneConfig``'s fields as flags -> ``edgeft.tune.tune``. Imports nothing heavy."""

from __future__ import annotations

import typer

from edgeft import runs
from edgeft.cli.app import app
from edgeft.cli.options import from_config
from edgeft.tune.config import TuneConfig


@app.command()
@from_config(TuneConfig)
def tune(config: TuneConfig) -> None:
    """Fine-tune the top blocks of a model over a frozen 8-bit base; write a run folder.

    The embeddings and lower blocks are frozen and loaded in 8-bit (bitsandbytes LLM.int8 on CUDA, int8 rows
    quantized as they are read on CPU);
    the top N blocks, the final norm and the head train in fp32. A head tied to the
    embeddings (SmolLM2, GPT-2) stays frozen unless --untie-head. The run folder holds
    only the trained parameters (trained.safetensors), run.json (base name and sha256),
    config.json, the tokenizer, labels.json, metrics.json (before and after), log.jsonl
    and loss.png. Work happens in OUT.partial, which --resume continues after a Ctrl-C.

    Causal LM data: plain text is cut into blocks; instruction/chat rows (messages,
    instruction/input/output, prompt/completion) use the chat template, loss on the answer.

    Data-parallel on several processes or machines: start it with torchrun (see the README).
    """
    from edgeft.tune import tune as run_tune
    from edgeft.tune.distributed import World, is_main, leave

    folder = run_tune(config)
    if is_main():  # under torchrun every process returns here; one summary
        typer.echo(runs.summary(folder))
    if World.from_env().size > 1:  # the run folder is complete: skip a teardown that can abort a rank
        leave(0)

