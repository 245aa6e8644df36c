"""Hugging Face loading on the torch side: tokenizers, ``AutoModelFor...`` classes, run folders.

``load_run`` is the one loader of a run folder (``edgeft.runs`` describes the folder): it
rebuilds the tuned model by merging ``trained.safetensors`` into the base's original
full-precision weights, after checking the base's hash and every trained name and shape.
Tune's checks, export and the benchmarks' PyTorch reference all call it. torch and
transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.runs import TRAINED, RunInfo, read_run

@dataclass
class LoadedRun:
    """A run rebuilt as a PyTorch model: the base's weights with the trained ones merged in."""

    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    info: RunInfo
    base: Path | str  # the base weights it was rebuilt from (checked against ``info.base_sha256``)
    tokenizer_dir: Path | str  # the run folder when it holds the tokenizer files, else the base


def model_class(task: Task) -> Any:
    """The ``AutoModelFor...`` class a task's models load as."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {Task.classification: AutoModelForSequenceClassification, Task.embedding: AutoModel}.get(
        task, AutoModelForCausalLM)


def label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    """The Hugging Face config fields that name a classifier's labels (index = class id)."""
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def load_tokenizer(where: Path | str, fill_pad: bool = True) -> Any:
    """The Hugging Face tokenizer in ``where``; ``fill_pad``: pad with EOS (or UNK) when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise EdgeftError(f"cannot load the tokenizer of {where}: {str(e).splitlines()[0]}") from None
    if fill_pad and tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (new head weights, unused pooler) for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb_logger = logging.getLogger("bitsandbytes")
    bnb_level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        bnb_logger.setLevel(bnb_level)


def untie(model: Any) -> None:
    """Give a head tied to the input embeddings its own copy of the weights, and say so in the config.

    The config's ``tie_word_embeddings=False`` is what makes ``save_pretrained`` (export) write
    the head as its own ``lm_head.weight``.
    """
    import torch

    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


def run_base(run_dir: Path, info: RunInfo) -> Path | str:
    """The run's base weights, checked against the hash the run recorded."""
    from edgeft.models import model_identity, resolve_model

    base: Path | str = Path(info.base_path)
    if not Path(info.base_path).is_dir():
        try:
            base = resolve_model(info.base_model)
        except EdgeftError:
            raise EdgeftError(f"{run_dir}: its base model {info.base_model} ({info.base_path}) "
                              "is not on this machine") from None
    if info.base_sha256 and isinstance(base, Path) and model_identity(base) != info.base_sha256:
        raise EdgeftError(f"{run_dir}: the base model at {base} is not the one this run was trained on "
                          "(weights hash differs)")
    return base


def load_run(run_dir: Path | str, labels: list[str] | None = None, dtype: Any = None,
             fill_pad: bool = True) -> LoadedRun:
    """Rebuild a run folder's tuned model: the base's original weights with ``trained.safetensors`` merged in.

    Checks that the base is the one the run was trained on (weights hash) and that every
    trained parameter exists in the base with the same shape. A run that trained its tied
    head untied loads untied (``untie``). ``labels`` overrides the run's label names;
    ``dtype`` defaults to fp32; ``fill_pad`` is passed to ``load_tokenizer``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    run_dir = Path(run_dir)
    info = read_run(run_dir)
    base = run_base(run_dir, info)
    tokenizer_dir: Path | str = run_dir if (run_dir / "tokenizer.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_dir, fill_pad=fill_pad)
    try:
        hf_config = AutoConfig.from_pretrained(str(base))
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{run_dir}: cannot read its base model's config: {str(e).splitlines()[0]}") from None
    for k, v in label_kwargs(list(labels) if labels else info.labels).items():
        setattr(hf_config, k, v)
    if getattr(hf_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        hf_config.pad_token_id = tokenizer.pad_token_id
    dtype = dtype or torch.float32
    try:
        with quiet_transformers():
            model = model_class(info.task).from_pretrained(str(base), config=hf_config, dtype=dtype)
    except ValueError as exc:  # transformers: "Unrecognized configuration class ..."
        raise EdgeftError(f"cannot load {base} as a {info.task.value} model: {str(exc).splitlines()[0]}") from None
    if info.untied_head:
        untie(model)
    trained = load_file(str(run_dir / TRAINED))
    state = model.state_dict()
    unknown = sorted(set(trained) - set(state))
    if unknown:
        raise EdgeftError(f"{run_dir / TRAINED} holds parameters the base model lacks: {', '.join(unknown[:3])}")
    for name, tensor in trained.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise EdgeftError(f"{run_dir / TRAINED}: {name} has shape {tuple(tensor.shape)}, "
                              f"the base expects {tuple(state[name].shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(dtype) for k, v in trained.items()}, strict=False)
    return LoadedRun(model=model.eval(), tokenizer=tokenizer, info=info, base=base, tokenizer_dir=tokenizer_dir)
