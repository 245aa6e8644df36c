"""Load a base model for tuning: top blocks trainable in fp32, the frozen rest in 8-bit.

``load_for_tuning`` finds the model's layout (the list of transformer blocks, the final
norm, the head) on a meta-device copy, then loads the real weights with the frozen
Linear layers in 8-bit, or in bf16/fp16/fp32 when asked. On CUDA the 8-bit layers are
bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[trainable
modules and heads])``); on CPU they are ``edgeft.tune.int8``'s int8 rows, quantized tensor by
tensor as the checkpoint is read, so no full-precision copy of the model is ever held and
bitsandbytes is not imported. The trainable modules always stay in fp32.

Trained: the top ``N`` blocks, the final norm and the head (``lm_head``; for
classification the new classifier/score layer and BERT's pooler). Frozen: the embeddings
and every lower block. A head *tied* to the input embeddings (SmolLM2, GPT-2) stays tied
and frozen by default, since training it would change the frozen embeddings; with
``untie_head`` it is copied into its own fp32 ``lm_head.weight`` and trained, and the run
records ``untied_head=True`` so export unties it too.

This module knows transformers, bitsandbytes and torch; it knows nothing of data or loops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.artifact import Task
from edgeft.errors import EdgeftError
from edgeft.tune.hf import label_kwargs, load_run, load_tokenizer, model_class, quiet_transformers
from edgeft.tune.hf import untie as _untie


@dataclass(frozen=True)
class Layout:
    """Where a model's parts are, by module name in the task model."""

    blocks: str  # the ModuleList of transformer blocks, e.g. "model.layers"
    n_blocks: int
    norms: tuple[str, ...]  # final norm(s), e.g. ("model.norm",)
    heads: tuple[str, ...]  # task head modules, e.g. ("lm_head",) or ("bert.pooler", "classifier")
    embeddings: str  # the input embedding module
    tied_head: bool  # the output head shares its weight with the input embeddings

    def trainable(self, n: int, untie_head: bool = False, train_embeddings: bool = False) -> list[str]:
        """Names of the modules trained when the top ``n`` blocks are."""
        top = [f"{self.blocks}.{i}" for i in range(self.n_blocks - n, self.n_blocks)]
        heads = [h for h in self.heads if not (self.tied_head and h == "lm_head" and not untie_head)]
        return top + list(self.norms) + heads + ([self.embeddings] if train_embeddings else [])


@dataclass
class Loaded:
    """A model ready for the loop, and what the run folder records about it."""

    model: Any
    tokenizer: Any
    layout: Layout
    trainable_modules: list[str]
    trained_names: list[str]  # parameter names (as in the task model's state_dict) that train
    untied_head: bool
    device: Any
    autocast_dtype: Any = None  # torch dtype for autocast, or None
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)
    int8_kernel: str | None = None  # "edgeft" or "bitsandbytes" when the base is int8


def _drop_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


def silence_int8_cast_notice() -> None:
    """bitsandbytes logs on every int8 matmul that fp32 inputs are cast to fp16: expected, once is plenty."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_cast_notice not in logger.filters:
        logger.addFilter(_drop_cast_notice)


def hf_config(path: Path | str, task: Task, labels: list[str] | None, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise EdgeftError(f"unknown model {path}: {str(e).splitlines()[0]}") from None
    if task is Task.classification:
        for k, v in label_kwargs(labels).items():
            setattr(cfg, k, v)
    if getattr(cfg, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


# Heads only an encoder has: a config naming one is no model to tune as a causal LM.
ENCODER_HEADS = ("ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice",
                 "ForPreTraining", "ForNextSentencePrediction")


def is_encoder(cfg: Any) -> bool:
    """Whether a config is an encoder (BERT, RoBERTa, a sentence-transformers folder): one of the
    encoder types edgeft exports, or a config naming an encoder's head. transformers maps BERT's
    config to BertLMHeadModel too, but a BERT encoder tuned as a causal LM is of no use."""
    from edgeft.export.architectures import of_task

    decoders = {a.name for a in of_task("causal-lm")}
    encoders = {a.name for a in of_task("classification")} - decoders
    archs = list(getattr(cfg, "architectures", None) or [])
    return cfg.model_type in encoders or any(a.endswith(ENCODER_HEADS) for a in archs)


def check_task(path: Path | str, model: str, data: Path, task: Task, asked: bool) -> None:
    """Refuse, in one line and before anything loads, a run whose result is of no use: an encoder or
    a classifier tuned as a causal LM, a decoder tuned as a classifier edgeft cannot export.

    ``asked``: the user gave ``--task``; else it was the default for the data.
    """
    from transformers import AutoConfig

    from edgeft.export.architectures import names, of_task

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return  # the loader says what is wrong with the folder
    if task is Task.classification:
        decoder = not is_encoder(cfg) and cfg.model_type in {a.name for a in of_task("causal-lm")}
        if decoder and cfg.model_type not in {a.name for a in of_task("classification")}:
            raise EdgeftError(f"cannot export a {cfg.model_type} classifier, so it does not tune as one; "
                              f"supported classifiers: {names('classification')}")
        return
    classifier = any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
    if not (is_encoder(cfg) or classifier):
        return
    kind = f"{model} is a classifier" if classifier else f"{model} is an encoder ({cfg.model_type})"
    if asked:
        raise EdgeftError(f"{kind}: it does not tune as a causal LM (--task classification, with labelled data)")
    from edgeft import data as D

    columns = list(D.read_rows(data)[0].keys()) if Path(data).suffix.lower() != ".txt" else []
    where = f"columns: {', '.join(columns)}" if columns else "plain text"
    raise EdgeftError(f"{kind}: it tunes as a classifier, and {data} has no label column ({where}): "
                      "name it with --label-column")


def find_layout(model: Any) -> Layout:
    """The blocks, final norm(s), heads and embeddings of a task model (any device, meta included)."""
    import torch.nn as nn

    base = model.base_model
    names = {id(m): n for n, m in model.named_modules()}
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [m for _, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    fitting = [m for m in lists if len(m) == n_layers] or lists
    if not fitting:
        raise EdgeftError(f"cannot find the transformer blocks of a {model.config.model_type} model")
    blocks = max(fitting, key=lambda m: sum(p.numel() for p in m.parameters()))
    has_params = lambda m: m is not None and any(True for _ in m.parameters())  # noqa: E731
    norms = tuple(names[id(c)] for _, c in base.named_children()
                  if "norm" in type(c).__name__.lower() or "layernorm" in type(c).__name__.lower())
    heads = [n for n, c in model.named_children() if c is not base and has_params(c)]
    heads += [names[id(c)] for n, c in base.named_children() if n == "pooler" and has_params(c)]
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(out is not None and getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return Layout(blocks=names[id(blocks)], n_blocks=len(blocks), norms=norms, heads=tuple(heads),
                  embeddings=names[id(inp)], tied_head=tied)


def meta_layout(path: Path | str, task: Task, cfg: Any) -> Layout:
    """The layout from a weightless (meta-device) copy of the model: no memory, no load."""
    import torch

    try:
        with torch.device("meta"), quiet_transformers():
            model = model_class(task).from_config(cfg)
    except ValueError as e:
        raise EdgeftError(f"a {cfg.model_type} model cannot do {task.value}: {str(e).splitlines()[0]}") from None
    return find_layout(model)


def pick_device(device: str, local_rank: int = 0) -> Any:
    """The torch device for ``--device``; with several processes on one machine, GPU ``local_rank``."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EdgeftError("--device cuda asked but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise EdgeftError(f"process {local_rank} on this machine but only {torch.cuda.device_count()} GPU(s): "
                              "start at most one process per GPU (torchrun --nproc-per-node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(device: Any, precision: str) -> Any:
    """bf16 autocast on CUDA; on CPU only when the frozen base itself is bf16/fp16."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _load_int8_cpu(path: Path | str, task: Task, cfg: Any, skip: list[str], heads: list[str]) -> Any:
    from edgeft.tune import int8

    try:
        with quiet_transformers():
            return int8.load(path, model_class(task), cfg, keep=skip, heads=heads)
    except EdgeftError as e:
        raise EdgeftError(f"cannot load model {path}: {e}") from None


def int8_kernel_for(path: Path | str, device: Any, kernel: str = "auto") -> str:
    """The 8-bit layers an int8 base gets: ``kernel`` when named, else edgeft's rows on CPU, bitsandbytes on CUDA.

    edgeft's rows need a safetensors checkpoint; a folder without one gets bitsandbytes.
    """
    from edgeft.tune.int8 import checkpoint_files

    kernel = getattr(kernel, "value", kernel)
    if kernel == "auto":
        kernel = "edgeft" if device.type == "cpu" else "bitsandbytes"
    if kernel == "edgeft" and not checkpoint_files(path):
        return "bitsandbytes"
    return str(kernel)


def _load_weights(path: Path | str, task: Task, cfg: Any, precision: str, skip: list[str], device: Any,
                  heads: list[str] = (), int8_kernel: str = "bitsandbytes") -> Any:
    """The task model on ``device``; ``skip``: modules kept out of 8-bit, ``heads``: ones the checkpoint may lack."""
    import torch

    if precision == "int8" and int8_kernel == "edgeft":
        model = _load_int8_cpu(path, task, cfg, skip, list(heads))
        return model.to(device) if device.type != "cpu" else model
    kwargs: dict[str, Any] = {"config": cfg}
    if precision == "int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    try:
        with quiet_transformers():
            model = model_class(task).from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise EdgeftError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    return model if precision == "int8" else model.to(device)


def _inside(name: str, modules: list[str]) -> bool:
    """Whether a module or parameter name is one of ``modules`` or lies within one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _freeze(model: Any, modules: list[str]) -> list[str]:
    """Only parameters inside ``modules`` train (kept in fp32); return their names."""
    import torch

    for name, module in model.named_modules():
        if name in modules:
            module.to(torch.float32)
    trained = []
    for name, p in model.named_parameters():
        train = _inside(name, modules)
        p.requires_grad_(train)
        if train:
            trained.append(name)
    return trained


def max_positions(cfg: Any) -> int | None:
    text = cfg.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def load_for_tuning(path: Path | str, task: Task, labels: list[str] | None, trainable_layers: int,
                    precision: str = "int8", device: str = "auto", untie_head: bool = False,
                    train_embeddings: bool = False, seed: int = 0, tokenizer: Any = None,
                    local_rank: int = 0, int8_kernel: str = "auto") -> Loaded:
    """Load ``path`` for ``task`` with only the top ``trainable_layers`` blocks (+ norm, head) trainable.

    ``tokenizer``: the one ``load_tokenizer(path)`` already gave, if the caller has it.
    ``local_rank``: this process's GPU among several on one machine.
    ``int8_kernel``: auto (edgeft's int8 rows on CPU, bitsandbytes LLM.int8 on CUDA), edgeft or bitsandbytes.
    """
    import torch

    tokenizer = tokenizer or load_tokenizer(path)
    cfg = hf_config(path, task, labels, tokenizer)
    layout = meta_layout(path, task, cfg)
    if trainable_layers > layout.n_blocks:
        raise EdgeftError(f"--trainable-layers {trainable_layers} but the model has {layout.n_blocks} blocks")
    untie = untie_head and layout.tied_head
    modules = layout.trainable(trainable_layers, untie_head=untie, train_embeddings=train_embeddings)
    dev = pick_device(device, local_rank)
    silence_int8_cast_notice()
    torch.manual_seed(seed)  # a new head (classifier) starts from the same weights every time
    kernel = int8_kernel_for(path, dev, int8_kernel) if precision == "int8" else None
    model = _load_weights(path, task, cfg, precision, skip=sorted(set(modules) | set(layout.heads)), device=dev,
                          heads=list(layout.heads), int8_kernel=kernel or "")
    if untie:
        _untie(model)
    trained = _freeze(model, modules)
    if task is Task.causal_lm:
        model.config.use_cache = False
    return Loaded(model=model, tokenizer=tokenizer, layout=layout, trainable_modules=modules,
                  trained_names=trained, untied_head=untie, device=dev,
                  autocast_dtype=autocast_dtype(dev, precision), max_positions=max_positions(cfg),
                  int8_kernel=kernel)


def frozen_linear_kinds(loaded: Loaded) -> dict[str, str]:
    """{module name: class name} of every Linear-like layer outside the trainable modules."""
    out = {}
    for name, module in loaded.model.named_modules():
        if not _inside(name, loaded.trainable_modules) and "Linear" in type(module).__name__:
            out[name] = type(module).__name__
    return out


def load_tuned(run_dir: Path, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run, rebuilt by ``edgeft.tune.hf.load_run`` (checks and benchmarks)."""
    loaded = load_run(run_dir, dtype=dtype)
    return loaded.model, loaded.tokenizer
