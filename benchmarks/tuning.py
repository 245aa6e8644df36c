"""Case 5's training loop: five ways to tune one classifier, with one loop, so only the method differs.

Variants (MiniLM-L6 and SmolLM2-135M as SST-2 classifiers in the suite): ``full`` (every
parameter), ``head`` (the head and final norm only), ``top-fp32`` (top N blocks, final
norm and head; frozen part in fp32), ``top-int8`` (edgeft's default: the frozen part loaded
in 8-bit by bitsandbytes LLM.int8, the top N blocks, norm and head skipped and trained in
full precision), ``lora`` (peft LoRA on the attention's query/value, head trained). Same
data order, batch, steps and optimizer (AdamW) for all; run inside a worker process so its
peak memory is its own. Imports torch inside.
"""

from __future__ import annotations

import random
import time

from edgeft.artifact import Task
from edgeft.bench import peak_rss_mib, summarize

VARIANTS = ("full", "head", "top-fp32", "top-int8", "lora")


def _load(path: str, variant: str, top_n: int, labels: list[str]):
    """(model, tokenizer) through edgeft tune's own loader: the same layout finding, freezing and
    8-bit loading as ``edgeft tune``; full, head-only and LoRA are settings of it."""
    from transformers import AutoConfig

    from edgeft.tune.model import load_for_tuning

    n_blocks = AutoConfig.from_pretrained(path).num_hidden_layers
    layers, precision = {"full": (n_blocks, "fp32"), "head": (0, "fp32"), "top-fp32": (top_n, "fp32"),
                         "top-int8": (top_n, "int8"), "lora": (0, "fp32")}[variant]
    loaded = load_for_tuning(path, Task.classification, labels, layers, precision, "cpu")
    if variant == "full":  # every parameter, position embeddings and embedding norm included
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    if variant != "lora":
        return loaded.model, loaded.tokenizer
    from peft import LoraConfig, get_peft_model

    # peft's default targets for the architecture (query/value, q_proj/v_proj); the head trains
    return get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, modules_to_save=list(loaded.layout.heads),
                                                   task_type="SEQ_CLS")), loaded.tokenizer


def train_variant(spec: dict) -> dict:
    """Train one variant for ``spec['steps']`` steps; time per step, peak memory, dev accuracy."""
    import numpy as np
    import torch

    from benchmarks.data import read_tsv_classification

    torch.manual_seed(0)
    base_rss = peak_rss_mib()  # after importing torch and transformers
    texts, labels = read_tsv_classification(spec["data"])
    names = sorted(set(labels))
    y = [names.index(v) for v in labels]
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    model, tok = _load(spec["path"], spec["variant"], spec["top_n"], names)
    weights_mib = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    loaded_rss = peak_rss_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    model.train()
    b, steps, step_s = spec["batch"], spec["steps"], []
    for step in range(steps):
        idx = [order[(step * b + i) % len(order)] for i in range(b)]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=spec["max_length"],
                  return_tensors="pt")
        t0 = time.perf_counter()
        loss = model(**enc, labels=torch.tensor([y[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    peak = peak_rss_mib()  # before evaluation, so only training counts
    model.eval()
    dev_x, dev_y = read_tsv_classification(spec["eval"])
    if spec.get("eval_limit"):
        dev_x, dev_y = dev_x[:spec["eval_limit"]], dev_y[:spec["eval_limit"]]
    preds = []
    with torch.inference_mode():
        for i in range(0, len(dev_x), 64):
            enc = tok(dev_x[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    acc = 100.0 * float(np.mean([names[p] == g for p, g in zip(preds, dev_y)]))
    return {"step_s": summarize(step_s[min(5, steps - 1):]).to_dict(), "accuracy": acc,
            "weights_mib": weights_mib, "growth_mib": peak - loaded_rss,
            "train_mib": weights_mib + peak - loaded_rss, "process_mib": peak - base_rss, "trainable": sum(p.numel() for p in params),
            "final_loss": float(loss.detach()), "train_peak_rss_mib": peak}
