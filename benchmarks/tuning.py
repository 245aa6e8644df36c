"""Case 5's training loop: five ways to tune one classifier, with one loop, so only the method differs.

Variants (MiniLM-L6 and SmolLM2-135M as SST-2 classifiers in the suite): ``full`` (every
parameter), ``head`` (the classification head only), ``top-fp32`` (top N blocks, final
norm and head; frozen part in fp32), ``top-int8`` (edgeft's default: the frozen part loaded
in 8-bit by bitsandbytes LLM.int8, the top N blocks, norm and head skipped and trained in
full precision), ``lora`` (peft LoRA on the attention's query/value, head trained). Same
data order, batch, steps and optimizer (AdamW) for all; run inside a worker process so its
peak memory is its own. Imports torch inside.
"""

from __future__ import annotations

import random
import time
from typing import Any

from edgeft.bench import peak_rss_mib, summarize

VARIANTS = ("full", "head", "top-fp32", "top-int8", "lora")
# model_type -> (head modules, block prefix, final norm, LoRA targets)
FAMILIES = {
    "bert": (("pooler", "classifier"), "encoder.layer.", None, ["query", "value"]),
    "llama": (("score",), "model.layers.", "model.norm", ["q_proj", "v_proj"]),
}


def _load(path: str, variant: str, top_n: int, num_labels: int, pad_token_id: int | None):  # noqa: ANN202
    import re

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(path)
    head, prefix, norm, lora_targets = FAMILIES[cfg.model_type]
    n_layers = cfg.num_hidden_layers
    trained = [*head, *([norm] if norm else []), *(f"{prefix}{i}." for i in range(n_layers - top_n, n_layers))]
    kw: dict[str, Any] = {"num_labels": num_labels, "dtype": torch.float32, "pad_token_id": pad_token_id}
    if variant == "top-int8":
        from transformers import BitsAndBytesConfig

        # transformers matches these as regexes from the start of a module's full name
        skip = [rf".*{re.escape(h)}" for h in head] + [rf".*{re.escape(prefix)}{i}"
                                                        for i in range(n_layers - top_n, n_layers)]
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kw["device_map"] = "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets,
                                                 modules_to_save=list(head), task_type="SEQ_CLS"))
        return model
    for name, p in model.named_parameters():
        if not p.is_floating_point():  # 8-bit frozen weights
            continue
        if variant == "full":
            p.requires_grad_(True)
        elif variant == "head":
            p.requires_grad_(any(h in name for h in head))
        else:
            p.requires_grad_(any(t in name for t in trained))
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
    if tok.pad_token is None:  # decoders: pad with end-of-sequence, as edgeft tune does
        tok.pad_token = tok.eos_token
    model = _load(spec["path"], spec["variant"], spec["top_n"], len(names), tok.pad_token_id)
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
