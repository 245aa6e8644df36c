"""Case 5's training loop: five ways to tune one classifier, with one loop, so only the method differs.

Variants (MiniLM-L6 on SST-2 in the suite): ``full`` (every parameter), ``head`` (pooler
and classifier only), ``top-fp32`` (top N blocks + head, frozen part in fp32),
``top-int8`` (edgeft's default: the frozen part loaded in 8-bit by bitsandbytes LLM.int8,
the top N blocks and head skipped and trained in full precision), ``lora`` (peft LoRA on
query/value, head trained). Same data order, batch, steps and optimizer (AdamW) for all;
run inside a worker process so its peak memory is its own. Imports torch inside.
"""

from __future__ import annotations

import random
import time
from typing import Any

from edgeft.bench import peak_rss_mib, summarize

VARIANTS = ("full", "head", "top-fp32", "top-int8", "lora")
HEAD = ("pooler", "classifier")


def _load(path: str, variant: str, top_n: int, num_labels: int):  # noqa: ANN202
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    n_layers = AutoConfig.from_pretrained(path).num_hidden_layers
    top = [f"encoder.layer.{i}." for i in range(n_layers - top_n, n_layers)]
    kw: dict[str, Any] = {"num_labels": num_labels, "dtype": torch.float32}
    if variant == "top-int8":
        from transformers import BitsAndBytesConfig

        # transformers matches these as regexes from the start of a module's full name
        skip = [rf".*{h}" for h in HEAD] + [rf".*encoder\.layer\.{i}" for i in range(n_layers - top_n, n_layers)]
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kw["device_map"] = "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=list(HEAD), task_type="SEQ_CLS"))
        return model
    for name, p in model.named_parameters():
        if not p.is_floating_point():  # 8-bit frozen weights
            continue
        if variant == "full":
            p.requires_grad_(True)
        elif variant == "head":
            p.requires_grad_(any(h in name for h in HEAD))
        else:
            p.requires_grad_(any(h in name for h in HEAD) or any(t in name for t in top))
    return model


def train_variant(spec: dict) -> dict:
    """Train one variant for ``spec['steps']`` steps; time per step, peak memory, dev accuracy."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from benchmarks.data import read_tsv_classification

    torch.manual_seed(0)
    base_rss = peak_rss_mib()  # after importing torch and transformers
    texts, labels = read_tsv_classification(spec["data"])
    names = sorted(set(labels))
    y = [names.index(v) for v in labels]
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    tok = AutoTokenizer.from_pretrained(spec["path"])
    model = _load(spec["path"], spec["variant"], spec["top_n"], len(names))
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
