"""Prometheus metrics for the server, written in the text exposition format by hand.

Counters, gauges and histograms with labels, safe to update from the event loop and
from worker threads, rendered by ``Registry.render()`` for ``GET /metrics``. Standard
library only (the runtime must stay small); this module knows nothing of HTTP or of
models, only names, labels and numbers.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _fmt(v: float) -> str:
    v = float(v)
    if v == math.inf:
        return "+Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A number that only goes up (requests, tokens)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(Counter):
    """A number that goes up and down (queue depth, requests in flight)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    """Observations counted into cumulative buckets (latencies, batch sizes)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            s = self._series.get(self._key(labels))
            return int(s[-1]) if s else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, s in items:
            running = 0
            for bound, n in [*zip(self.buckets, s), (math.inf, 0)]:
                running += n
                le = 'le="' + _fmt(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(s[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return lines


class Registry:
    """The server's metrics, one instance per app."""

    def __init__(self) -> None:
        self.requests = Counter("edgeft_requests_total", "HTTP requests by route and status code.",
                                ("route", "method", "status"))
        self.latency = Histogram("edgeft_request_duration_seconds",
                                 "Time from request to the last byte of the response, by route.", ("route",))
        self.prompt_tokens = Counter("edgeft_prompt_tokens_total", "Prompt tokens processed.", ("model",))
        self.generated_tokens = Counter("edgeft_generated_tokens_total", "Tokens generated.", ("model",))
        self.first_token = Histogram("edgeft_time_to_first_token_seconds",
                                     "Time from admission to the first generated token.", ("model",))
        self.queue_depth = Gauge("edgeft_queue_depth", "Sequences admitted and waiting for a KV slot.", ("model",))
        self.in_flight = Gauge("edgeft_inference_in_flight", "Sequences holding a KV slot now (slots in use).",
                               ("model",))
        self.slots = Gauge("edgeft_kv_slots", "KV slots per model (--parallel).", ("model",))
        self.decode_batch = Histogram("edgeft_decode_batch_size", "Sequences advanced per batched decode step.",
                                      ("model",), buckets=BATCH_BUCKETS)
        self.queue_wait = Histogram("edgeft_queue_wait_seconds", "Time a sequence waited for a free KV slot.",
                                    ("model",))
        self.tokens_per_second = Gauge("edgeft_generated_tokens_per_second",
                                       "Tokens generated per second over the last few seconds, all sequences.",
                                       ("model",))
        self.drafted_tokens = Counter("edgeft_speculative_drafted_tokens_total",
                                      "Prompt-lookup draft tokens verified by speculative decode steps.", ("model",))
        self.accepted_tokens = Counter("edgeft_speculative_accepted_tokens_total",
                                       "Draft tokens the model agreed with (accepted / drafted: the acceptance rate).",
                                       ("model",))
        self.rejected = Counter("edgeft_rejected_total", "Requests refused because the queue was full.",
                                ("model",))
        self.cancelled = Counter("edgeft_stream_cancelled_total",
                                 "Streamed generations stopped early: the client left or the server stopped.",
                                 ("model",))
        self.disconnects = Counter("edgeft_client_disconnects_total",
                                   "Requests whose client hung up before its body was read (status 499).",
                                   ("route",))
        self.classified = Counter("edgeft_classified_texts_total", "Texts classified.", ("model",))
        self.batch_size = Histogram("edgeft_classify_batch_size",
                                    "Texts per classifier run (micro-batches of concurrent requests).",
                                    ("model",), buckets=BATCH_BUCKETS)
        self.loaded = Gauge("edgeft_model_loaded", "1 once a model is loaded and serving.", ("model",))

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        return "\n".join(line for m in self.all() for line in m.render()) + "\n"


def engine_observer(metrics: Registry, name: str) -> Callable[[Any, float], None]:
    """An ``Engine``'s ``observe`` callback: each ``EngineEvent`` updates its metric for model ``name``."""
    from edgeft.runtime.engine import EngineEvent

    update = {EngineEvent.batch: metrics.decode_batch.observe, EngineEvent.queue_wait: metrics.queue_wait.observe,
              EngineEvent.slots: metrics.in_flight.set, EngineEvent.waiting: metrics.queue_depth.set,
              EngineEvent.tokens_per_second: metrics.tokens_per_second.set,
              EngineEvent.drafted: metrics.drafted_tokens.inc, EngineEvent.accepted: metrics.accepted_tokens.inc}

    def observe(event: EngineEvent, value: float) -> None:
        update[event](value, model=name)
    return observe
