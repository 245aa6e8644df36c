"""The served models and what the routes share: ``Model``, ``load_models``, ``ServerState``.

``load_models`` opens every artifact (hashing every byte, checking signatures with
``--trusted-key``) and gives each generation model one continuous-batching ``Engine``
and each classifier or embedder a ``ClassifyBatcher``. ``ServerState`` holds the
settings, the metrics, the models once loaded and the lifecycle flags (ready, draining,
failed). This module knows the runtime's loading API and the settings; it knows nothing
of HTTP routes or of the OpenAI JSON shapes beyond the errors it raises.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeft.artifact import Task
from edgeft.runtime.batching import ClassifyBatcher
from edgeft.runtime.serve.metrics import Registry, engine_observer
from edgeft.runtime.serve.wire import ApiError, bad
from edgeft.serve_config import ServeConfig

log = logging.getLogger("edgeft.serve")

TASK_ROUTES = {Task.causal_lm: "/v1/completions or /v1/chat/completions", Task.classification: "/v1/classify",
               Task.embedding: "/v1/embeddings"}


@dataclass
class Model:
    """One served artifact: its batching engine (generation) or a batcher (classification)."""

    name: str
    task: Task
    manifest: Any
    front: Any  # the Generator or classifier: tokenizing and chat templates on the request's thread
    engine: Any = None  # edgeft.runtime.engine.Engine for causal-lm models
    batcher: ClassifyBatcher | None = None
    signature_checked: bool = False  # serve --trusted-key verified the manifest's signature at load
    speculate: str = "auto"  # serve --speculate: a request without its own "speculate" gets this
    created: int = field(default_factory=lambda: int(time.time()))

    def info(self) -> dict[str, Any]:
        d = {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgeft", "task": self.task.value}
        if self.manifest.decoder is not None:
            d["context_length"] = self.manifest.decoder.context_length
        if self.manifest.classifier is not None:
            d["labels"] = list(self.manifest.classifier.labels)
        if self.manifest.embedding is not None:
            d["dimensions"] = self.manifest.embedding.dim
        d["manifest"] = manifest_card(self.manifest, self.signature_checked)
        return d

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
        if self.batcher is not None:
            await self.batcher.close()


def manifest_card(manifest: Any, signature_checked: bool = False) -> dict[str, Any]:
    """What a user needs to trust a model: base, quantization, size, the gate's verdict and figures, signer."""
    gate = {k: v for k, v in (manifest.gate or {}).items() if k in ("passed", "degraded", "metrics", "failures")}
    signature = manifest.signature or {}
    return {
        "architecture": manifest.architecture,
        "base_model": (manifest.source or {}).get("base_model"),
        "quantization": (manifest.quantization or {}).get("scheme"),
        "size_bytes": sum(int(f.get("size", 0)) for f in (manifest.files or {}).values()),
        "gate": gate,
        "digest": manifest.digest,
        "signed_by": signature.get("key_id"),
        "signature_checked": bool(signature) and signature_checked,
    }


def _spin_reserve(config: ServeConfig) -> float:
    """Cores a model's spinning threads must leave free: every other model's threads, and with
    several slots one for the event loop (it streams every slot's chunks while the pool works)."""
    from edgeft.runtime.session import default_threads

    threads = config.threads or default_threads()
    return threads * (len(config.artifacts) - 1) + (1.0 if config.parallel > 1 else 0.0)


def _model(config: ServeConfig, metrics: Registry, name: str, first: Any) -> Model:
    """``first`` (a loaded Generator, classifier or embedder) behind its engine or batcher."""
    from edgeft.runtime.engine import Engine

    task = first.manifest.task
    if task is Task.causal_lm:
        engine = Engine(first, parallel=config.parallel, ctx_size=config.ctx_size, queue_size=config.queue_size,
                        prefix_cache=config.prefix_cache, observe=engine_observer(metrics, name))
        metrics.slots.set(config.parallel, model=name)
        return Model(name, task, first.manifest, first, engine=engine, speculate=config.speculate.value)
    method = "embed_rows" if task is Task.embedding else "classify"
    batcher = ClassifyBatcher(name, first, config.batch_size, config.batch_wait_ms / 1000, config.queue_size,
                              metrics, method)
    return Model(name, task, first.manifest, first, batcher=batcher)


def load_models(config: ServeConfig, metrics: Registry) -> dict[str, Model]:
    """Open every artifact, hashing every byte (blocking: run it off the event loop)."""
    from edgeft.runtime import load
    from edgeft.signing import load_trusted_keys

    models: dict[str, Model] = {}
    keys = load_trusted_keys(config.trusted_keys) if config.trusted_keys else []
    for name, path in zip(config.model_names(), config.artifacts):
        t0 = time.perf_counter()
        first = load(path, threads=config.threads, trusted_keys=keys, spin=config.spin,
                     reserve=_spin_reserve(config))
        m = _model(config, metrics, name, first)
        m.signature_checked = bool(keys)
        models[name] = m
        metrics.loaded.set(1, model=name)
        spin = getattr(first, "spinning", None)
        log.info("loaded %s (%s) from %s in %.1fs%s", name, m.task.value, path, time.perf_counter() - t0,
                 "" if spin is None else f"; threads {'spin' if spin else 'sleep'} ({first.spin_reason})",
                 extra={"fields": {"model": name, "task": m.task.value, "path": str(path), "spin": spin}})
    return models


class ServerState:
    """What the routes share: settings, metrics, the models once loaded, and the lifecycle flags."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Registry()
        self.models: dict[str, Model] = {}
        self.ready = False
        self.draining = False
        self.failed: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.cancels: set[threading.Event] = set()
        self.routes: list[Any] = []  # the API's starlette Routes: their paths are the metrics' route labels

    def check_serving(self) -> None:
        # While draining, requests that reached us are served: uvicorn has stopped accepting
        # connections and /health says 503, so load balancers send nothing new.
        if not self.ready:
            raise ApiError(503, "the models are still loading", type="server_error", code="loading")

    def model(self, name: str | None, task: Task) -> Model:
        served = ", ".join(self.models) or "none"
        if name is None:
            fits = [m for m in self.models.values() if m.task is task]
            if len(fits) == 1:
                return fits[0]
            raise bad(f"'model' is required (served here: {served})", "model")
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"the model '{name}' is not served here (served: {served})",
                           param="model", code="model_not_found")
        if m.task is not task:
            raise bad(f"'{name}' is a {m.task.value} model: use {TASK_ROUTES[m.task]}", "model", "wrong_model_task")
        return m

    def route_label(self, path: str) -> str:
        """The route a path belongs to (its template, e.g. ``/v1/models/{model}``), or "other"."""
        for route in self.routes:
            if route.path == path:
                return path
        for route in self.routes:
            if "{" in route.path and route.path_regex.match(path):
                return route.path_format
        return "other"
