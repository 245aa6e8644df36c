"""Case ``speculative``: prompt-lookup speculative decoding on and off, side by side on one artifact.

    BENCH_WORK=/work/bench-work python -m benchmarks.run --cases speculative

SmolLM2-135M int8 (the generation case's ``smollm2-base-int8`` artifact), greedy, chat
template, up to ``new_tokens`` tokens (stopping at end-of-sequence, so every mode decodes
the same tokens). Three tasks: input-grounded prompts (repeat, number or extract lines of a
sonnet from ``../shared/data/poetry``, the answer's first line given), where drafts copied
from the prompt are often right; free generation (stories, explanations), greedy; and the
same free prompts sampled (temperature 0.8, seeded), where drafts are rarely right. One worker
process runs ``rounds`` rounds; each round times every mode (``off``, ``auto``, ``on``) on
every prompt, the modes' order rotated per round. Reported: decode tokens/s (first token
to last) per task and mode, the ratio to ``off`` (goal: grounded > 1, free >= 1 within
noise), the acceptance rate, whether the texts equal ``off``'s (and how many tokens agree
before the first difference: an int8 artifact's multi-token steps round differently from its
one-token steps), the grounded prompts decoded together by the batching engine, and the
measured cost of a verification step (k + 1 tokens with a past) in one-token steps.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

from benchmarks import prepare
from edgeft.bench import Stat, summarize

MODES = ("off", "auto", "on")
# (user message, the start of the assistant's answer): the answer is begun for the model, as a
# client does to hold a small model to a format (SmolLM2-135M comments on a sonnet otherwise)
GROUNDED = (("Repeat the following sonnet exactly, line by line, and nothing else:\n\n{s}", "{l0}\n"),
            ("Here is a sonnet:\n\n{s}\n\nWrite out its last six lines exactly as they are.", "{l8}\n"),
            ("Number each line of this sonnet, keeping the words unchanged:\n\n{s}", "1. {l0}\n2."))
FREE = (("Write a short story about a lighthouse keeper who finds a message in a bottle.", ""),
        ("Explain how rain forms, step by step, for a ten-year-old.", ""),
        ("Give me five ideas for a birthday party for a friend who loves astronomy, with a sentence on each.", ""))


def sonnets(n: int) -> list[str]:
    text = prepare.data_file("poetry", "shakespeare_sonnets.txt").read_text().replace("\r", "")
    blocks = [b.strip() for b in text.split("\n\n") if len(b.strip().splitlines()) == 14]
    return blocks[:n]


def grounded_prompts(n: int = 3) -> list[tuple[str, str]]:
    out = []
    for (user, start), s in zip(GROUNDED, sonnets(n)):
        lines = [ln.strip() for ln in s.splitlines()]
        out.append((user.format(s=s), start.format(l0=lines[0], l8=lines[8])))
    return out


def case(ctx) -> None:
    from benchmarks.cases import WorkerFailed, lm_artifact

    path = lm_artifact(ctx, "int8")
    free = [list(p) for p in FREE]
    tasks = {"grounded": {"prompts": grounded_prompts(), "temperature": 0.0},
             "free": {"prompts": free, "temperature": 0.0},
             "sampled": {"prompts": free, "temperature": 0.8}}  # seeded: seed i for prompt i
    rounds = 2 if ctx.quick else 4
    try:
        r = ctx.spawn("spec-edgeft", timeout=3600, path=str(path), tasks=tasks, rounds=rounds,
                      new_tokens=64 if ctx.quick else 128)
    except (WorkerFailed, subprocess.TimeoutExpired) as exc:
        ctx.res.skip("speculative", "edgeft int8", str(exc))
        return
    for mode, m in r["batched"].items():
        system = f"edgeft int8, speculate {mode}"
        ctx.add("speculative", system, "batched_tps grounded", Stat.from_dict(m["tps"]), "tok/s",
                parallel=m["parallel"], note=f"{m['parallel']} grounded prompts in one engine, end to end")
        if mode != "off":
            ctx.add("speculative", system, "batched_speedup grounded", Stat.from_dict(m["ratio"]), "x")
            ctx.add("speculative", system, "batched_same_text grounded", m["same"], "prompts")
    for task, modes in r["tasks"].items():
        base = Stat.from_dict(modes["off"]["tps"])
        for mode, m in modes.items():
            system = f"edgeft int8, speculate {mode}"
            ctx.add("speculative", system, f"decode_tps {task}", Stat.from_dict(m["tps"]), "tok/s",
                    task=task, rounds=rounds, prompts=len(tasks[task]["prompts"]), tokens=m["tokens"])
            if mode != "off":
                ratio = Stat.from_dict(m["ratio"])
                ctx.add("speculative", system, f"speedup {task}", ratio, "x", task=task,
                        note=f"{task}, {mode}: per-round ratio to off ({base.median:.1f} tok/s)")
                ctx.add("speculative", system, f"acceptance {task}", 100 * m["accepted"] / max(m["drafted"], 1),
                        "%", note=f"{task}, {mode}: {m['accepted']} of {m['drafted']} drafted tokens accepted "
                        f"in {m['steps']} verification steps")
                ctx.add("speculative", system, f"same_text {task}", m["same"], "prompts")
                ctx.add("speculative", system, f"first_difference {task}", statistics.median(m["first_diff"]), "tokens",
                        note=f"{task}, {mode}: tokens equal to off's before the first difference, per prompt "
                        f"({m['first_diff']} of {m['tokens'] // len(tasks[task]['prompts']) + 1})")
    ctx.add("speculative", "edgeft int8", "verify_cost", Stat.from_dict(r["verify_cost"]), "steps", higher=False,
            note=f"a step verifying {r['draft_tokens']} drafts at {r['verify_context']} tokens of context, "
                 "in one-token decode steps")


# ---------------------------------------------------------------- the worker (its own process)


def _decode(gen, ids: list[int], params, counts=None) -> tuple[list[int], float]:
    """(tokens, seconds from the first token to the last)."""
    toks, first = [], None
    for chunk in gen.stream(ids, params, counts=counts):
        if first is None:
            first = time.perf_counter()
        if chunk.token_id is not None:
            toks.append(chunk.token_id)
    return toks, time.perf_counter() - first


def verify_cost(gen, ids: list[int], k: int, repeats: int = 30) -> list[float]:
    """Seconds of a (k + 1)-token step with a past over a one-token step's, at ``len(ids)`` tokens."""
    state = gen.engine.start(len(ids) + k + 2)
    state.prefill(ids)
    n = state.length
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state.step(ids[-1])
        t1 = time.perf_counter()
        state.rewind(n)
        state.prefill(ids[-k - 1:], all_logits=True)
        t2 = time.perf_counter()
        state.rewind(n)
        ratios.append((t2 - t1) / (t1 - t0))
    return ratios


def batched(gen, ids_list: list[list[int]], new: int, rounds: int) -> dict[str, Any]:
    """The grounded prompts decoded together by the batching engine: end-to-end tokens/s per mode."""
    from edgeft.runtime import SamplingParams

    tps = {m: [] for m in MODES}
    same = {m: 0 for m in MODES}
    ref = None
    for r in range(rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            t0 = time.perf_counter()
            outs = gen.generate_batch(ids_list, SamplingParams(max_new_tokens=new, speculate=mode),
                                      parallel=len(ids_list))
            tps[mode].append(sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0))
            toks = [o.token_ids for o in outs]
            if mode == "off" and ref is None:
                ref = toks
            if r == rounds - 1:
                same[mode] = toks
    ratio = {m: [a / b for a, b in zip(tps[m], tps["off"])] for m in MODES}
    return {m: {"tps": summarize(tps[m]).to_dict(), "ratio": summarize(ratio[m]).to_dict(),
                "same": sum(a == b for a, b in zip(same[m], ref)), "parallel": len(ids_list)} for m in MODES}


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def spec_worker(spec: dict) -> dict[str, Any]:
    from edgeft.runtime import Generator, SamplingParams
    from edgeft.runtime.speculate import DRAFT_MAX, SpecCounts

    gen = Generator.open(spec["path"], threads=spec["threads"])
    prompts = {task: [gen.encode(gen.render_chat([{"role": "user", "content": user}]) + start)
                      for user, start in t["prompts"]] for task, t in spec["tasks"].items()}
    new = spec["new_tokens"]
    out: dict[str, Any] = {}
    for task, ids_list in prompts.items():
        _decode(gen, ids_list[0], SamplingParams(max_new_tokens=8, speculate="off"))  # warm up
        tps = {m: [] for m in MODES}
        ratio = {m: [] for m in MODES}
        counts = {m: SpecCounts() for m in MODES}
        texts: dict[str, list] = {m: [None] * len(ids_list) for m in MODES}
        tokens = {m: 0 for m in MODES}
        for r in range(spec["rounds"]):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            round_tps = {}
            for mode in order:
                n_tok, secs = 0, 0.0
                for i, ids in enumerate(ids_list):
                    params = SamplingParams(max_new_tokens=new, speculate=mode, seed=i,
                                            temperature=spec["tasks"][task]["temperature"])
                    toks, took = _decode(gen, ids, params, counts[mode])
                    secs += took
                    n_tok += len(toks) - 1
                    texts[mode][i] = toks
                tokens[mode] = n_tok
                round_tps[mode] = n_tok / secs
                tps[mode].append(round_tps[mode])
            for mode in MODES:
                ratio[mode].append(round_tps[mode] / round_tps["off"])
        out[task] = {m: {"tps": summarize(tps[m]).to_dict(), "ratio": summarize(ratio[m]).to_dict(),
                         "drafted": counts[m].drafted, "accepted": counts[m].accepted, "steps": counts[m].steps,
                         "same": sum(a == b for a, b in zip(texts[m], texts["off"])), "tokens": tokens[m],
                         "first_diff": [_first_difference(a, b) for a, b in zip(texts[m], texts["off"])]}
                     for m in MODES}
    ctx_ids = prompts["grounded"][0]
    cost = verify_cost(gen, ctx_ids, DRAFT_MAX)
    return {"tasks": out, "batched": batched(gen, prompts["grounded"], new, spec["rounds"]),
            "verify_cost": summarize(cost).to_dict(), "draft_tokens": DRAFT_MAX,
            "verify_context": len(ctx_ids), "median_cost": statistics.median(cost)}
