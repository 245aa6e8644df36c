"""``tune(config)``: the training loop and the run folder it writes.

Setup resolves the model, reads and tokenizes the data, and loads the base with only
the top blocks trainable (``edgeft.tune.model``); every user error is raised before
anything is written. The loop is edgeft's own (transformers' Trainer refuses an 8-bit
model without adapters): AdamW or bitsandbytes' 8-bit AdamW, warmup then cosine/linear
decay, gradient accumulation, clipping, bf16 autocast on CUDA, optional gradient
checkpointing, evaluation every N steps keeping the best, early stopping, class weights.
With the frozen cache (``edgeft.tune.frozen``) every forward pass after an example's first
starts at the first trained block.

Work happens in ``OUT.partial/`` (config, checkpoints, live log). A checkpoint is a
complete ``ckpt-STEP/`` folder made under a temporary name, then named in
``checkpoint.json``; ``--resume`` restores parameters, optimizer, RNG and counters from
it, and the data order is a function of (seed, step), so a resumed run ends where an
uninterrupted one would. The finished run folder is written under a temporary name and
renamed to OUT; only then is ``OUT.partial`` removed.

Under ``torchrun`` (``edgeft.tune.distributed``) every process loads the base and runs its
part of each global micro-batch; the summed gradients make each optimizer step the
single-process one, so ``--batch-size`` is the global micro-batch whatever the process count,
and a checkpoint (the global step, parameters, optimizer, every rank's RNG) resumes with any
count. Only rank 0 writes: checkpoints, logs, progress bars, notes and the run folder; the
others wait for it. Evaluation is split the same way and its figures gathered.

This module knows torch and the run folder contract; model loading, data and metrics
live in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.fsutil import (atomic_dir, atomic_write_json, check_writable, out_of_space,
                           refuse_overlap, sha256_file)
from edgeft import runs
from edgeft.runs import RunInfo, read_run_config
from edgeft.tune import dataset as DS
from edgeft.tune import distributed, frozen
from edgeft.tune import metrics as M
from edgeft.artifact import Task
from edgeft.tune.config import ClassWeights, Optim, Schedule, TuneConfig, task_defaults
from edgeft.tune.distributed import World

CHECKPOINT = "checkpoint.json"
# A disk that filled up or turned read-only mid-run: one line, not a traceback.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass
class State:
    """Counters and history a checkpoint carries besides tensors."""

    step: int = 0
    best_step: int | None = None
    best_score: float = -math.inf
    best_metrics: dict[str, Any] | None = None
    last_metrics: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    select_metric: str = "accuracy"  # what best_score measures (resolved from --select-metric)
    tokens: int = 0
    examples: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


# ---- setup ----------------------------------------------------------------------------------

def resolve_task(cfg: TuneConfig, model_path: Path | str | None = None) -> Task:
    """--task, else classification for labelled data; an encoder never defaults to causal-lm."""
    from edgeft import data as D
    from edgeft.tune.model import check_task

    if cfg.task is not None:
        task = cfg.task
    else:
        D.check_file(cfg.data)
        labelled = cfg.label_column is not None or D.has_label_column(cfg.data, text_column=cfg.text_column)
        task = Task.classification if labelled and not D.is_chat_file(cfg.data) else Task.causal_lm
    if model_path is not None:
        check_task(model_path, cfg.model, cfg.data, task, asked=cfg.task is not None)
    return task


def preflight(cfg: TuneConfig) -> None:
    """Refuse a finished OUT (without --overwrite) and check what --resume would continue."""
    model = Path(cfg.model).expanduser()
    inputs = (("--data", cfg.data), ("--eval-data", cfg.eval_data), ("--model", model if model.exists() else None))
    for name, path in inputs:
        if path is not None:  # OUT and OUT.partial are deleted (--overwrite) or written: neither may hold an input
            refuse_overlap(cfg.out, path, "--out", name, inside_ok=True)
            refuse_overlap(cfg.partial, path, "the work folder", name, inside_ok=True)
    if cfg.out.exists() and not cfg.overwrite:
        raise EdgeftError(f"{cfg.out} already exists (use --overwrite to replace it)")
    check_writable(cfg.out.parent, "the run folder")  # a read-only or full disk, before loading the model
    partial = cfg.partial
    if cfg.resume:
        if not (partial / CHECKPOINT).is_file():
            raise EdgeftError(f"nothing to resume: {partial} holds no checkpoint")
        changed = cfg.same_run(read_run_config(partial))
        if changed:
            raise EdgeftError(f"--resume needs the interrupted run's settings; these differ: {', '.join(changed)}")
    elif partial.exists() and not cfg.overwrite:
        if (partial / CHECKPOINT).is_file():
            raise EdgeftError(f"an interrupted run is in {partial}: continue it with --resume or restart with "
                              "--overwrite")
        raise EdgeftError(f"an interrupted run is in {partial}, stopped before its first checkpoint: "
                          "restart it with --overwrite")


def resolve_max_length(cfg: TuneConfig, task: Task, positions: int | None) -> int:
    length = cfg.max_length or task_defaults(task)["max_length"]
    if positions and length > positions:
        if cfg.max_length:
            raise EdgeftError(f"--max-length {length} exceeds the model's context of {positions} tokens")
        length = positions
    return length


def prepare_data(cfg: TuneConfig, task: Task, tokenizer: Any, max_length: int, quiet: bool = False) -> DS.Prepared:
    if task is Task.classification:
        prep = DS.prepare_classification(tokenizer, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                         max_length, cfg.text_column, cfg.label_column, cfg.pair_column)
    else:
        prep = DS.prepare_causal(tokenizer, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                 max_length, cfg.text_column)
    if cfg.max_eval_examples and len(prep.eval) > cfg.max_eval_examples:
        prep.eval = prep.eval[: cfg.max_eval_examples]
    if not quiet:
        DS.warn_truncation(prep, max_length)
    return prep


# ---- one step -------------------------------------------------------------------------------

def _autocast(loaded: Any) -> Any:
    import torch

    if loaded.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(loaded.device.type, dtype=loaded.autocast_dtype)


def _forward(model: Any, batch: dict[str, Any]) -> Any:
    pair = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch and _takes_types(model) else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **pair).logits.float()


def _takes_types(model: Any) -> bool:
    """Whether the model reads token type ids (BERT does; a pair's second text is type 1)."""
    import inspect

    return "token_type_ids" in inspect.signature(model.forward).parameters


def _summed_loss(logits: Any, labels: Any, task: Task, weights: Any = None) -> Any:
    """Summed cross-entropy: per example (classification) or per next token, ignoring ``IGNORE``."""
    import torch.nn.functional as F

    if task is Task.classification:
        return F.cross_entropy(logits, labels, weight=weights, reduction="sum")
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, labels, ignore_index=DS.IGNORE, reduction="sum")


def loss_sum(model: Any, batch: dict[str, Any], task: Task, weights: Any = None) -> Any:
    """The summed loss of a micro-batch; a group's mean is sum(losses) / sum(loss_weight)."""
    return _summed_loss(_forward(model, batch), batch["labels"], task, weights)


def loss_weight(batch: dict[str, Any], task: Task, weights: Any = None) -> float:
    labels = batch["labels"]
    if task is Task.classification:
        return float(weights[labels].sum()) if weights is not None else float(len(labels))
    return float((labels[:, 1:] != DS.IGNORE).sum())


def lr_at(cfg: TuneConfig, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule is Schedule.constant:
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule is Schedule.cosine:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


def make_optimizer(cfg: TuneConfig, model: Any) -> Any:
    """AdamW (or bitsandbytes' 8-bit AdamW) with no weight decay on biases and norms."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    if cfg.optimizer is Optim.adamw8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr)
    # fused: one kernel over all tensors (on CPU far cheaper than the per-tensor loop)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def enable_checkpointing(model: Any) -> None:
    """Recompute the trained blocks' activations in backward (transformers 5 name, older fallback)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_modes(model: Any, trainable: list[str], training: bool) -> None:
    """Frozen modules always in eval mode (no dropout); trainable ones follow ``training``."""
    model.eval()
    if training:
        for name, module in model.named_modules():
            if name in trainable:
                module.train()


def class_weights(cfg: TuneConfig, prep: DS.Prepared, device: Any) -> Any:
    import torch

    if prep.task is not Task.classification or cfg.class_weights is ClassWeights.none:
        return None
    counts = Counter(y for _, y in prep.train)
    n, c = len(prep.train), len(prep.labels or [])
    return torch.tensor([n / (c * counts[i]) if counts[i] else 0.0 for i in range(c)], device=device)


# ---- evaluation -----------------------------------------------------------------------------

def _cached(cache: Any, index: Any, batch: dict[str, Any], device: Any) -> Any:
    """The frozen cache around one forward pass (a no-op without a cache)."""
    if cache is None:
        return contextlib.nullcontext()
    return cache.around(index, batch["input_ids"].shape[1], device)


def evaluate(loaded: Any, examples: list[DS.Example], task: Task, labels: list[str] | None,
             batch_size: int, cache: Any = None, first: int = 0, progress: bool = False,
             world: World = World()) -> dict[str, Any]:
    """Eval loss/perplexity (causal LM) or accuracy, macro P/R/F1 and confusion matrix (classification).

    ``cache``: the frozen cache, where these examples are numbered from ``first``. With several
    processes each evaluates its share (``batch_size`` split among them) and all get the figures.
    """
    import torch
    from tqdm import tqdm

    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    order = sorted(range(len(examples)), key=lambda j: len(examples[j][0]))  # less padding; same figures
    order = [i - first for i in world.part([first + j for j in order], by_owner=cache is not None)]
    batch_size = math.ceil(batch_size / world.size)
    was = [m.training for m in model.modules()]
    model.eval()
    total, count, preds, truth = 0.0, 0, [], []
    bar = tqdm(total=len(order), disable=not progress, unit="ex", desc="eval", leave=False,
               dynamic_ncols=True, file=sys.stderr)
    with torch.no_grad(), _autocast(loaded), bar:
        for i in range(0, len(order), batch_size):
            index = order[i:i + batch_size]
            batch = {k: v.to(loaded.device) for k, v in DS.collate([examples[j] for j in index], pad, task).items()}
            with _cached(cache, [first + j for j in index], batch, loaded.device):
                logits = _forward(model, batch)
            bar.update(len(index))
            total += float(_summed_loss(logits, batch["labels"], task))
            count += int(loss_weight(batch, task))
            if task is Task.classification:
                preds += logits.argmax(-1).tolist()
                truth += batch["labels"].tolist()
    for m, t in zip(model.modules(), was, strict=True):
        m.training = t
    if world.size > 1:
        shares = distributed.gather(world, (total, count, preds, truth))
        total, count = sum(x[0] for x in shares), sum(x[1] for x in shares)
        preds, truth = [p for x in shares for p in x[2]], [t for x in shares for t in x[3]]
    if task is Task.classification:
        return M.classification_metrics(truth, preds, labels or [], loss=total / max(count, 1))
    return M.lm_metrics(total, count)


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


# ---- checkpoints ----------------------------------------------------------------------------

def trainable_tensors(model: Any, names: list[str]) -> dict[str, Any]:
    """Detached CPU fp32 copies of the trained parameters, named as in the state_dict."""
    import torch

    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).contiguous().clone() for n in names}


def rng_state() -> dict[str, Any]:
    import torch

    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(partial: Path, loaded: Any, optimizer: Any, state: State, best: dict[str, Any] | None,
                    ranks: list[dict[str, Any]] | None = None) -> None:
    """A complete ``ckpt-STEP/`` (``ranks``: every process's RNG state, in a multi-process run)."""
    import torch
    from safetensors.torch import save_file

    name = f"ckpt-{state.step:07d}"
    tmp = partial / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(trainable_tensors(loaded.model, loaded.trained_names), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), "ranks": ranks or []},
                   tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", dataclasses.asdict(state))
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial / name, ignore_errors=True)
    os.replace(tmp, partial / name)
    atomic_write_json(partial / CHECKPOINT, {"step": state.step, "dir": name})
    for old in partial.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(partial: Path, loaded: Any, optimizer: Any
                    ) -> tuple[State, dict[str, Any] | None, list[dict[str, Any]]]:
    """Restore parameters, optimizer and RNG; return the state, the best parameters and the per-rank RNGs."""
    import torch
    from safetensors.torch import load_file

    folder = partial / json.loads((partial / CHECKPOINT).read_text())["dir"]
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(folder / "trainable.safetensors")).items():
            params[n].copy_(t.to(params[n].device))
    blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    state = State(**json.loads((folder / "state.json").read_text()))
    best_file = folder / "best.safetensors"
    return state, (load_file(str(best_file)) if best_file.is_file() else None), blob.get("ranks", [])


def seed_rank(cfg: TuneConfig, world: World, step: int) -> None:
    """A fresh RNG stream per rank (dropout in the trained blocks) when none was saved for it."""
    import torch

    torch.manual_seed(cfg.seed * 1_000_003 + 7919 * world.rank + 104_729 * step)


def share_checkpoint(cfg: TuneConfig, world: World, loaded: Any, optimizer: Any, got: tuple | None
                     ) -> tuple[State, dict[str, Any] | None]:
    """Rank 0's checkpoint (``got``, read by it alone) on every rank; each rank's RNG where one was saved."""
    state, best, ranks = distributed.broadcast(world, got if world.main else None)
    if not world.main:
        optimizer.load_state_dict(distributed.broadcast(world, None))
    elif world.size > 1:
        distributed.broadcast(world, optimizer.state_dict())
    distributed.broadcast_params(world, [p for p in loaded.model.parameters() if p.requires_grad])
    if world.size > 1:
        if len(ranks) == world.size:
            set_rng_state(ranks[world.rank])
        else:  # saved by another process count: the data order carries over, dropout draws do not
            seed_rank(cfg, world, state.step)
    return state, best


# ---- the loop -------------------------------------------------------------------------------

@dataclass
class Plan:
    total_steps: int
    steps_per_epoch: int
    micro_per_epoch: int


def make_plan(cfg: TuneConfig, n_train: int) -> Plan:
    micro = DS.micro_batches_per_epoch(n_train, cfg.batch_size)
    per_epoch = max(1, math.ceil(micro / cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return Plan(total, per_epoch, micro)


def is_eval_step(cfg: TuneConfig, plan: Plan, step: int) -> bool:
    every = cfg.eval_every or plan.steps_per_epoch
    return step == plan.total_steps or step % every == 0


def is_checkpoint_step(cfg: TuneConfig, plan: Plan, step: int) -> bool:
    if cfg.checkpoint_every:
        return step == plan.total_steps or step % cfg.checkpoint_every == 0
    return is_eval_step(cfg, plan, step)


def train_step(cfg: TuneConfig, loaded: Any, prep: DS.Prepared, optimizer: Any, step: int,
               plan: Plan, weights: Any, cache: Any = None, world: World = World()) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches (this rank's part of each); returns its log entry."""
    import torch

    model, task, pad = loaded.model, prep.task, loaded.tokenizer.pad_token_id
    lr = lr_at(cfg, step, plan.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    everyone = [DS.micro_batch_index(prep.train_lengths, cfg.batch_size, cfg.seed, step * cfg.grad_accum + k,
                                     by_length=cfg.group_by_length) for k in range(cfg.grad_accum)]
    indices = [part for part in (world.part(ix, by_owner=cache is not None) for ix in everyone) if part]
    batches = [DS.collate([prep.train[j] for j in index], pad, task) for index in indices]
    batches = [{k: v.to(loaded.device) for k, v in b.items()} for b in batches]
    mine = sum(loss_weight(b, task, weights) for b in batches)
    denom = (mine or 1.0) if world.size == 1 else 1.0  # several ranks: divided by the global weight below
    total = 0.0
    for index, b in zip(indices, batches, strict=True):
        with _autocast(loaded), _cached(cache, index, b, loaded.device):
            loss = loss_sum(model, b, task, weights)
        (loss / denom).backward()
        total += float(loss.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    if world.size > 1:
        total, denom = distributed.sum_grads(world, params, [total, mine])
        denom = denom or 1.0
        for p in params:
            p.grad.div_(denom)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
                                          foreach=True)
    if not (math.isfinite(total) and math.isfinite(float(norm))):  # before the step: the weights stay good
        optimizer.zero_grad(set_to_none=True)
        raise (Diverged(step + 1, "training loss", total / denom) if not math.isfinite(total)
               else Diverged(step + 1, "gradient norm", float(norm)))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(prep.train_lengths[j] for ix in everyone for j in ix)
    examples = sum(len(ix) for ix in everyone)
    return {"step": step + 1, "epoch": round((step + 1) / plan.steps_per_epoch, 4), "loss": total / denom,
            "lr": lr, "grad_norm": float(norm), "tokens": tokens, "examples": examples}


def _after_eval(cfg: TuneConfig, state: State, metrics: dict[str, Any], task: Task, loaded: Any,
                best: dict[str, Any] | None) -> dict[str, Any] | None:
    state.last_metrics = metrics
    state.log.append({"step": state.step, "eval": _brief(metrics)})
    s = M.score(metrics, task, state.select_metric)
    if s > state.best_score:
        state.best_score, state.best_step, state.best_metrics, state.bad_evals = s, state.step, metrics, 0
        return trainable_tensors(loaded.model, loaded.trained_names)
    state.bad_evals += 1
    if cfg.patience and state.bad_evals >= cfg.patience:
        state.stopped_early = True
    return best


def _bar(cfg: TuneConfig, plan: Plan, state: State) -> Any:
    from tqdm import tqdm

    return tqdm(total=plan.total_steps, initial=state.step, disable=not cfg.progress, unit="step",
                desc="tune", dynamic_ncols=True, file=sys.stderr)


def _checkpoint(partial: Path, loaded: Any, optimizer: Any, state: State, best: dict[str, Any] | None,
                ranks: list[dict[str, Any]] | None) -> None:
    try:
        save_checkpoint(partial, loaded, optimizer, state, best, ranks)
        runs.write_log(partial, state.log)
    except Exception as exc:
        full = out_of_space(exc, partial, "a checkpoint", checkpoint_bytes(loaded, best))
        if full is not None:
            raise EdgeftError(f"{full}; {_kept(partial)}") from None
        if not isinstance(exc, OSError) or exc.errno not in DISK_ERRORS:
            raise
        raise EdgeftError(f"cannot write checkpoints in {partial}: {exc.strerror}; {_kept(partial)}") from None


def checkpoint_bytes(loaded: Any, best: dict[str, Any] | None) -> int:
    """About what one checkpoint takes: the trained tensors, AdamW's two moments, the best copy."""
    trained = sum(p.numel() * p.element_size() for p in loaded.model.parameters() if p.requires_grad)
    return trained * (4 if best is not None else 3)


def last_checkpoint(partial: Path) -> int | None:
    """The step of ``partial``'s last complete checkpoint (None: there is none)."""
    try:
        return int(json.loads((partial / CHECKPOINT).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kept(partial: Path) -> str:
    """What a stopped run leaves, and the next step that works with it."""
    step = last_checkpoint(partial)
    if step is None:
        return "no checkpoint was written yet: free space and run it again with --overwrite"
    return f"the last checkpoint (step {step}) is kept in {partial}: free space, then continue with --resume"


class Diverged(EdgeftError):
    """The training loss (or the gradient's norm) became NaN or infinite at ``step``."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"the {what} became {value} at step {step}")
        self.step = step


def _resume(cfg: TuneConfig, world: World, loaded: Any, optimizer: Any, partial: Path) -> tuple[State, Any]:
    """(state, best) of the last checkpoint, read by rank 0 and shared with the others."""
    got = load_checkpoint(partial, loaded, optimizer) if world.main else None
    return share_checkpoint(cfg, world, loaded, optimizer, got)


def _fresh(cfg: TuneConfig, world: World, loaded: Any) -> None:
    """Every rank starts from rank 0's trainable parameters, with its own dropout stream."""
    if world.size > 1:
        distributed.broadcast_params(world, [p for p in loaded.model.parameters() if p.requires_grad])
        seed_rank(cfg, world, 0)


def run_loop(cfg: TuneConfig, loaded: Any, prep: DS.Prepared, partial: Path, plan: Plan,
             callback: Callable[[int], None] | None = None, cache: Any = None,
             world: World = World()) -> tuple[State, dict[str, Any] | None]:
    """Train from the start or the last checkpoint to the end; return the state and the best parameters."""
    def run_eval() -> dict[str, Any]:
        return evaluate(loaded, prep.eval, prep.task, prep.labels, cfg.eval_batch_size, cache=cache,
                        first=len(prep.train), progress=cfg.progress, world=world)

    optimizer = make_optimizer(cfg, loaded.model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(loaded.model)
    best: dict[str, Any] | None = None
    if cfg.resume:
        state, best = _resume(cfg, world, loaded, optimizer, partial)
    else:
        _fresh(cfg, world, loaded)
        state = State(select_metric=M.select_metric(cfg.select_metric.value, prep.task, [y for _, y in prep.train]))
        state.before = run_eval()
        state.log.append({"step": 0, "eval": _brief(state.before)})
        if cfg.progress:
            print(_eval_line(0, state.before) + " (before tuning)", file=sys.stderr)
    weights = class_weights(cfg, prep, loaded.device)
    unit = "tok/s" if prep.task is Task.causal_lm else "ex/s"
    with _bar(cfg, plan, state) as bar:
        while state.step < plan.total_steps and not state.stopped_early:
            set_modes(loaded.model, loaded.trainable_modules, training=True)
            t0, c0 = time.perf_counter(), time.process_time()
            entry = train_step(cfg, loaded, prep, optimizer, state.step, plan, weights, cache, world)
            entry["seconds"] = round(time.perf_counter() - t0, 4)
            entry["cpu_seconds"] = round(time.process_time() - c0, 4)  # all threads: steadier on a shared machine
            state.train_seconds += entry["seconds"]
            state.step += 1
            state.tokens += entry.pop("tokens")
            state.examples += entry.pop("examples")
            state.log.append(entry)
            rate = (state.tokens if unit == "tok/s" else state.examples) / max(state.train_seconds, 1e-9)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", **{unit.replace("/", "_"): f"{rate:.0f}"})
            bar.update(1)
            if is_eval_step(cfg, plan, state.step):
                metrics = run_eval()
                best = _after_eval(cfg, state, metrics, prep.task, loaded, best)
                if cfg.progress:
                    bar.write(_eval_line(state.step, metrics), file=sys.stderr)
            if is_checkpoint_step(cfg, plan, state.step) or state.stopped_early:
                ranks = distributed.gather(world, rng_state()) if world.size > 1 else None
                distributed.on_main(world, functools.partial(_checkpoint, partial, loaded, optimizer, state, best, ranks))
                if cache is not None:
                    cache.save()
            if callback is not None:
                callback(state.step)
    return state, best


def _eval_line(step: int, m: dict[str, Any]) -> str:
    if "accuracy" in m:
        return f"step {step}: eval accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, loss {m['eval_loss']:.4f}"
    return f"step {step}: eval loss {m['eval_loss']:.4f}, perplexity {m['perplexity']:.2f}"


# ---- the run folder -------------------------------------------------------------------------

def plot_loss(log: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and eval loss at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    evals = [(e["step"], e["eval"]["eval_loss"]) for e in log if "eval" in e and "eval_loss" in e["eval"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_metrics(cfg: TuneConfig, loaded: Any, prep: DS.Prepared, state: State, plan: Plan) -> dict[str, Any]:
    n_trained = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in loaded.model.parameters())
    rate_key, count = ("tokens_per_s", state.tokens) if prep.task is Task.causal_lm else ("examples_per_s", state.examples)
    return {
        "task": prep.task.value, "base_model": cfg.model, "base_precision": cfg.base_precision.value,
        "int8_kernel": loaded.int8_kernel, "trainable_layers": cfg.trainable_layers, "before": state.before, "after": state.best_metrics,
        "last": state.last_metrics, "best_step": state.best_step, "steps": state.step,
        "select_metric": state.select_metric, "warnings": M.learning_warnings(state.before, state.best_metrics),
        "planned_steps": plan.total_steps, "stopped_early": state.stopped_early,
        "train_examples": len(prep.train), "eval_examples": len(prep.eval),
        "train_seconds": round(state.train_seconds, 2), rate_key: round(count / max(state.train_seconds, 1e-9), 2),
        "peak_memory_mb": round(peak_memory_mb(loaded.device), 1),
        "trainable_parameters": n_trained, "total_parameters": n_total,
    }


def write_run(cfg: TuneConfig, loaded: Any, prep: DS.Prepared, state: State, plan: Plan,
              best: dict[str, Any] | None, resolved: Path | str, max_length: int, cached: bool = False,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the finished run folder atomically: trained params, run.json, config, tokenizer, metrics, log, plot."""
    from safetensors.torch import save_file

    from edgeft.models import model_identity

    tensors = best if best is not None else trainable_tensors(loaded.model, loaded.trained_names)
    data_hash = {"train": sha256_file(cfg.data)} | ({"eval": sha256_file(cfg.eval_data)} if cfg.eval_data else {})
    info = RunInfo(task=prep.task, base_model=cfg.model, base_path=str(resolved), base_sha256=model_identity(resolved),
                   architecture=loaded.model.config.model_type, trainable_layers=cfg.trainable_layers,
                   trained_parameters=list(loaded.trained_names), labels=prep.labels, untied_head=loaded.untied_head,
                   data_sha256=data_hash, max_length=max_length)
    resolved_cfg = cfg.to_dict() | {"task": prep.task.value, "max_length": max_length, "data_kind": prep.kind,
                                    "total_steps": plan.total_steps, "trainable_modules": loaded.trainable_modules,
                                    "resume": False, "overwrite": False}
    metrics = build_metrics(cfg, loaded, prep, state, plan) | {"frozen_cache": cached} | (extra or {})
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        save_file(tensors, str(tmp / runs.TRAINED), metadata={"format": "pt"})
        runs.write_run(tmp, info, resolved_cfg, metrics, state.log)
        loaded.tokenizer.save_pretrained(str(tmp))
        plot_loss(state.log, tmp / runs.LOSS_PLOT)
    shutil.rmtree(cfg.partial, ignore_errors=True)
    return cfg.out


def open_cache(cfg: TuneConfig, loaded: Any, prep: DS.Prepared, plan: Plan, partial: Path,
               resolved: Path | str, max_length: int, world: World = World()) -> frozen.StateCache | None:
    """This rank's frozen cache, or None (``--frozen-cache``, whether it can apply; all ranks agree)."""
    from edgeft.models import model_identity

    passes = plan.total_steps * cfg.grad_accum / plan.micro_per_epoch
    config_file = Path(resolved) / "config.json" if isinstance(resolved, Path) else None
    config_sha = sha256_file(config_file) if config_file is not None and config_file.is_file() else str(resolved)
    cache = frozen.for_run(cfg, loaded, prep, passes, partial, model_identity(resolved), config_sha, max_length,
                           world.rank, world.size)
    if world.size > 1 and not all(distributed.gather(world, cache is not None)):
        if world.main:
            frozen.note("frozen cache: off (not every rank could have its shard)")
        if cache is not None:
            cache.close()
            shutil.rmtree(cache.folder, ignore_errors=True)
        return None
    return cache


def _open_partial(cfg: TuneConfig, world: World) -> Path:
    """Rank 0 checks OUT and makes (or keeps, with --resume) ``OUT.partial``; the others wait for it."""
    def make() -> None:
        partial = cfg.partial
        if not cfg.resume:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            atomic_write_json(partial / runs.CONFIG, cfg.to_dict())
        frozen.drop_other_shards(partial, world.size)

    distributed.on_main(world, make)
    return cfg.partial


def _finish_cache(cfg: TuneConfig, world: World, cache: frozen.StateCache | None) -> None:
    """Keep this rank's cache beside OUT (``--keep-cache``), or delete it on a rank other than 0
    (rank 0's goes with ``OUT.partial``; another machine's copy of that folder is left empty)."""
    if cache is None:
        return
    if cfg.keep_cache:
        frozen.keep(cache, frozen.kept_path(cfg, world.rank, world.size), quiet=not world.main)
    elif not world.main:
        shutil.rmtree(cache.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            cache.folder.parent.rmdir()  # only when empty: OUT.partial on a machine that holds nothing else


def _interrupted(partial: Path) -> str:
    step = last_checkpoint(partial)
    if step is None:
        return f"interrupted before the first checkpoint: nothing to resume; run it again with --overwrite ({partial})"
    return f"interrupted: continue from the last checkpoint (step {step}) with --resume ({partial})"


def _diverged_advice(partial: Path) -> str:
    step = last_checkpoint(partial)
    kept = (f"the last good checkpoint (step {step}) is kept in {partial}" if step is not None
            else "no checkpoint had been written")
    return f"{kept}; lower --lr (or check the data) and start again with --overwrite"


def _write_run(cfg: TuneConfig, world: World, finish: Callable[[], Path]) -> Path:
    def write() -> Path:
        try:
            return finish()
        except Exception as exc:
            full = out_of_space(exc, cfg.out.parent, "the run folder")
            if full is not None:
                raise EdgeftError(f"{full}; {_kept(cfg.partial)}") from None
            if not isinstance(exc, OSError) or exc.errno not in DISK_ERRORS:
                raise
            raise EdgeftError(f"cannot write the run folder {cfg.out}: {exc.strerror}; {_kept(cfg.partial)}") from None

    distributed.on_main(world, write)
    return cfg.out


def tune(config: TuneConfig, callback: Callable[[int], None] | None = None) -> Path:
    """Tune ``config.model`` on ``config.data``; return the finished run folder.

    ``callback(step)`` is called after every optimizer step (and its checkpoint, if any). Under
    ``torchrun`` each process runs this; only rank 0 writes, and all return once OUT is complete.
    """
    from edgeft.tune.model import pick_device

    world = World.from_env()
    with distributed.session(world, pick_device(config.device.value, world.local_rank)):
        return _tune(config if world.main else dataclasses.replace(config, progress=False), world, callback)


def _tune(cfg: TuneConfig, world: World, callback: Callable[[int], None] | None) -> Path:
    import torch

    from edgeft.models import resolve_model
    from edgeft.tune.model import hf_config, load_for_tuning, load_tokenizer, max_positions

    distributed.on_main(world, lambda: preflight(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resolved = resolve_model(cfg.model)
    task = resolve_task(cfg, resolved)
    tokenizer = load_tokenizer(resolved)
    max_length = resolve_max_length(cfg, task, max_positions(hf_config(resolved, Task.causal_lm, None, tokenizer)))
    given, cfg = cfg, dataclasses.replace(cfg.for_task(task), max_length=max_length)  # task defaults where unset
    prep = prepare_data(cfg, task, tokenizer, max_length, quiet=not world.main)
    loaded = load_for_tuning(resolved, task, prep.labels, cfg.trainable_layers, cfg.base_precision.value,
                             cfg.device.value, cfg.untie_head, cfg.train_embeddings, cfg.seed, tokenizer,
                             local_rank=world.local_rank, int8_kernel=cfg.int8_kernel.value)
    plan = make_plan(cfg, len(prep.train))
    partial = _open_partial(given, world)  # the config as given: --resume compares against it
    cache = open_cache(cfg, loaded, prep, plan, partial, resolved, max_length, world)
    try:
        state, best = run_loop(cfg, loaded, prep, partial, plan, callback, cache, world)
    except KeyboardInterrupt:
        if world.main:
            print(_interrupted(partial), file=sys.stderr)
        raise
    except Diverged as exc:
        raise EdgeftError(f"{exc}: stopped before the step was applied; {_diverged_advice(partial)}") from None
    except OSError as exc:
        full = out_of_space(exc, partial, "the run's work files")
        if full is not None:
            raise EdgeftError(f"{full}; {_kept(partial)}") from None
        if exc.errno not in DISK_ERRORS:
            raise
        raise EdgeftError(f"cannot write checkpoints in {partial}: {exc.strerror}; {_kept(partial)}") from None
    finally:
        if cache is not None:
            cache.close()
    _finish_cache(cfg, world, cache)
    peaks = distributed.gather(world, round(peak_memory_mb(loaded.device), 1))
    extra = {"processes": world.size} | ({"peak_memory_mb": max(peaks), "peak_memory_mb_per_process": peaks}
                                         if world.size > 1 else {})
    return _write_run(cfg, world, lambda: write_run(cfg, loaded, prep, state, plan, best, resolved, max_length,
                                                    cache is not None, extra))
