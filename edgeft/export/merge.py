"""Turn what the user named into one full-precision PyTorch model plus where it came from.

A run folder holds only the trained parameters (``trained.safetensors``); they are
merged into the base's *original* full-precision weights (never the 8-bit copies used
while training), untying the head first when the run trained it untied. A pulled name,
a Hugging Face folder or a hub id is loaded as it is. The result, ``Source``, also
carries what the manifest records about origin (base name and hash, run folder, data
hashes) and the tokenizer, loaded once.

A run folder is rebuilt by ``edgeft.tune.hf.load_run`` (the one loader, with its hash and
shape checks). This module knows transformers and the run folder contract; it knows
nothing of ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.artifact import Provenance, Task
from edgeft.export.config import ExportConfig
from edgeft.runs import RUN_INFO, RunInfo, is_run_folder, read_run, read_run_config
from edgeft.tune.hf import label_kwargs, load_run, load_tokenizer, model_class, quiet_transformers, run_base

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass
class Source:
    """A merged fp32 model ready to export, and its provenance."""

    model: Any  # a transformers PreTrainedModel in eval mode, fp32
    task: Task
    architecture: str  # model_type
    tokenizer: Any  # the Hugging Face tokenizer, loaded once (the artifact ships its files)
    tokenizer_dir: Path | str  # folder (or hub id) holding the tokenizer files
    labels: list[str] | None = None
    max_length: int | None = None
    run: RunInfo | None = None
    run_dir: Path | None = None
    base_name: str = ""
    base_sha256: str = ""
    data_sha256: dict[str, str] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | str | None = None  # the base model's folder (sentence-transformers' pooling files)

    def provenance(self) -> Provenance:
        """The manifest's ``source`` section."""
        return Provenance(base_model=self.base_name, base_sha256=self.base_sha256,
                          run_folder=str(self.run_dir.resolve()) if self.run_dir else None,
                          data_sha256=dict(self.data_sha256),
                          trainable_layers=self.run.trainable_layers if self.run else 0)


def load_source(config: ExportConfig) -> Source:
    """Resolve ``config.source`` (run folder or model) into a merged fp32 ``Source``."""
    path = Path(str(config.source)).expanduser()
    if path.is_dir() and is_run_folder(path):
        return _load_run(path, config)
    if path.is_dir() and (path / RUN_INFO).exists():
        read_run(path)  # raises the run folder's own one-line error
    return _load_base(config)


def _task_of(hf_config: Any, asked: Task | None, where: Path | str | None = None) -> Task:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if asked is not None:
        return asked
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return Task.causal_lm
    if any(a.endswith(CLASSIFIER_SUFFIX) for a in archs):
        return Task.classification
    if isinstance(where, Path) and (where / "modules.json").is_file():
        return Task.embedding  # a sentence-transformers folder
    raise EdgeftError(
        f"cannot tell the task of a {getattr(hf_config, 'model_type', '?')} model "
        f"({', '.join(archs) or 'no architectures'}): pass --task causal-lm, classification or embedding"
    )


def _load_model(where: Path | str, hf_config: Any, task: Task, labels: list[str] | None) -> Any:
    """A base model as it is (no run): fp32, in eval mode."""
    import torch

    for k, v in label_kwargs(labels).items():
        setattr(hf_config, k, v)
    try:
        with quiet_transformers():
            model = model_class(task).from_pretrained(where, config=hf_config, dtype=torch.float32)
    except ValueError as exc:  # transformers: "Unrecognized configuration class ..."
        raise EdgeftError(f"cannot load {where} as a {task.value} model: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _load_base(config: ExportConfig) -> Source:
    from transformers import AutoConfig

    from edgeft.models import model_identity, resolve_model

    where = resolve_model(str(config.source))
    try:
        hf_config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"cannot load {config.source}: {str(exc).splitlines()[0]}") from None
    task = _task_of(hf_config, config.task, where)
    labels = list(config.labels) if config.labels else _config_labels(hf_config, task)
    model = _load_model(where, hf_config, task, labels)
    return Source(model=model, task=task, architecture=hf_config.model_type,
                  tokenizer=load_tokenizer(where, fill_pad=False), tokenizer_dir=where,
                  labels=labels, max_length=config.max_length, base_name=str(config.source),
                  base_sha256=model_identity(where), base_dir=where)


def _config_labels(hf_config: Any, task: Task) -> list[str] | None:
    if task is not Task.classification:
        return None
    id2label = getattr(hf_config, "id2label", None) or {}
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a.endswith(CLASSIFIER_SUFFIX) for a in archs):
        raise EdgeftError("a base encoder has no classification head: tune it first, or pass --labels")
    return [id2label[i] for i in sorted(id2label, key=int)] if id2label else None


def _load_run(run_dir: Path, config: ExportConfig) -> Source:
    # The run's own tokenizer files as they are (no pad filled in): they are what the artifact ships.
    loaded = load_run(run_dir, labels=list(config.labels) if config.labels else None, fill_pad=False)
    info = loaded.info
    task, model, labels = info.task, loaded.model, list(config.labels) if config.labels else info.labels
    if config.task is Task.embedding and task is Task.classification:
        # the tuned encoder without its head: BertForSequenceClassification.bert is a BertModel
        task, labels, model = Task.embedding, None, getattr(model, model.base_model_prefix).eval()
    elif config.task is not None and config.task is not task:
        raise EdgeftError(f"{run_dir} is a {task.value} run: it exports as {task.value}"
                          + (" (or embedding)" if task is Task.classification else ""))
    return Source(model=model, task=task, architecture=info.architecture, tokenizer=loaded.tokenizer,
                  tokenizer_dir=loaded.tokenizer_dir, labels=labels,
                  max_length=config.max_length or info.max_length, run=info, run_dir=run_dir,
                  base_name=info.base_model, base_sha256=info.base_sha256, data_sha256=dict(info.data_sha256),
                  run_config=read_run_config(run_dir), base_dir=run_base(run_dir, info))


def save_hf_configs(source: Source, folder: Path) -> Path:
    """Write the model's ``config.json`` (and ``generation_config.json``) and the tokenizer files into
    ``folder``, as ``save_pretrained`` writes them, but no weights: the genai builder reads its weights from
    ``source.model`` (``edgeft.export.genai``), and the artifact ships these files."""
    model = source.model
    folder.mkdir(parents=True, exist_ok=True)
    model.config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained records
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    return folder


def remap(source: Source, config: ExportConfig) -> None:
    """Replace ``source.model`` by the same model loaded afresh (the base's weights mapped from their files,
    the run's trained tensors merged in), dropping every page of it a pass read: the gate's PyTorch pass reads
    all of it, and the graph export after it should not run beside it."""
    source.model = None
    give_back_memory()
    source.model = load_source(config).model


def release(source: Source) -> None:
    """Let the torch model go once the graph is exported (a decoder's candidates, calibration and gate read the
    graph): its mapped weights leave the process, its merged tensors return to the system. A step that needs it
    again (the sensitivity pass) loads it again (``load_source``)."""
    source.model = None
    give_back_memory()


def give_back_memory() -> None:
    """Collect garbage and hand the heap memory it frees back to the system: glibc keeps freed blocks under
    its mapping threshold (up to 32 MB once larger ones were freed) for reuse, resident, until trimmed."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (every arena's: the torch threads' too), without a
    garbage collection: cheap enough to run between two forward passes."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's; absent elsewhere
    except (OSError, AttributeError):
        pass
