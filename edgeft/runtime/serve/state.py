"""The served models and what the routes share: ``Model``, ``load_models``, ``ServerState``.

``load_models`` opens every artifact (hashing every byte, checking signatures with
``--trusted-key``) and gives each generation model one continuous-batching ``Engine`` of
``--parallel`` slots (split models on one trunk are stepped together, their trunk's KV cache one
pool of ``--parallel`` rows for all of them: ``edgeft.runtime.trunk_group``) and each classifier or
embedder a ``ClassifyBatcher``. ``ServerState`` holds the
settings, the metrics, the models once loaded and the lifecycle flags (ready, draining,
failed); ``add_model`` and ``remove_model`` change the served models while it serves (the
dict is replaced, never changed in place, so a request that already looked a model up keeps
it), and ``hold`` counts each model's requests in flight so removing one waits for them.
This module knows the runtime's loading API and the settings; it knows nothing
of HTTP routes or of the OpenAI JSON shapes beyond the errors it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgeft.artifact import Task
from edgeft.runtime.batching import ClassifyBatcher, Overloaded
from edgeft.runtime.serve.metrics import Registry, engine_observer
from edgeft.runtime.serve.wire import ApiError, bad
from edgeft.serve_config import ServeConfig

log = logging.getLogger("edgeft.serve")

_HELD: contextvars.ContextVar[list[Model] | None] = contextvars.ContextVar("edgeft_held", default=None)

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
    in_flight: int = 0  # requests that looked this model up and have not finished (``ServerState.hold``)
    idle: asyncio.Event | None = None  # set while ``in_flight`` is 0, once something waits for it

    @property
    def trunk(self) -> Any:
        """The shared trunk this model runs on (``edgeft.runtime.trunks.SharedTrunk``), or None."""
        return getattr(self.front, "trunk", None)

    def info(self, shared_with: list[str] | None = None) -> dict[str, Any]:
        d = {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgeft", "task": self.task.value}
        if self.manifest.decoder is not None:
            d["context_length"] = self.manifest.decoder.context_length
        if self.manifest.classifier is not None:
            d["labels"] = list(self.manifest.classifier.labels)
            d["pairs"] = self.manifest.classifier.pairs is not None  # a pair classifier: /v1/rerank serves it
        if self.manifest.embedding is not None:
            d["dimensions"] = self.manifest.embedding.dim
        d["manifest"] = manifest_card(self.manifest, self.signature_checked)
        spec = self.manifest.trunk
        if spec is not None:
            d["trunk"] = {"sha256": spec.sha256, "blocks": spec.blocks, "file": spec.file,
                          "shared_with": sorted(shared_with or [])}
        return d

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.idle is not None:
            self.idle.set()

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
        if self.batcher is not None:
            await self.batcher.close()


def manifest_card(manifest: Any, signature_checked: bool = False) -> dict[str, Any]:
    """What a user needs to trust a model: base, quantization, size, the gate's verdict and figures, signer."""
    g = manifest.gate
    gate = {} if g is None else {"passed": g.passed, "degraded": g.degraded, "metrics": g.metrics,
                                 "failures": g.failures}
    signature = manifest.signature or {}
    return {
        "architecture": manifest.architecture,
        "base_model": manifest.source.base_model if manifest.source is not None else None,
        "quantization": manifest.quantization.scheme,
        "size_bytes": sum(int(f.get("size", 0)) for f in (manifest.files or {}).values()),
        "gate": gate,
        "digest": manifest.digest,
        "signed_by": signature.get("key_id"),
        "signature_checked": bool(signature) and signature_checked,
    }


# The event loop's share of a core while it streams every slot's chunks beside the pool: it used
# 0.035 of one at 8 streaming clients and 165 tokens/s (benchmarks/results/2026-12-07-vm-icelake-serving.md);
# a whole core kept for it made a 2-core machine's threads sleep, 27% slower for one client, 24% for 8.
EVENT_LOOP_CORES = 0.1


def _spin_reserve(config: ServeConfig, others: int) -> float:
    """Cores a model's spinning threads must leave free: the ``others`` models' threads, and with
    several slots a tenth of one for the event loop (it streams every slot's chunks while the pool works)."""
    from edgeft.runtime.session import default_threads

    threads = config.threads or default_threads()
    return threads * others + (EVENT_LOOP_CORES if config.parallel > 1 else 0.0)


def _model(config: ServeConfig, metrics: Registry, name: str, first: Any) -> Model:
    """``first`` (a loaded Generator, classifier or embedder) behind its engine or batcher."""
    from edgeft.runtime.engine import Engine

    task = first.manifest.task
    if task is Task.causal_lm:
        engine = Engine(first, parallel=config.parallel, ctx_size=config.ctx_size, queue_size=config.queue_size,
                        prefix_cache=config.prefix_cache, observe=engine_observer(metrics, name), batch_trunk=True)
        metrics.slots.set(config.parallel, model=name)
        return Model(name, task, first.manifest, first, engine=engine, speculate=config.speculate.value)
    method = "embed_rows" if task is Task.embedding else "classify"
    batcher = ClassifyBatcher(name, first, config.batch_size, config.batch_wait_ms / 1000, config.queue_size,
                              metrics, method)
    return Model(name, task, first.manifest, first, batcher=batcher)


def load_model(config: ServeConfig, metrics: Registry, name: str, path: Any, others: int) -> Model:
    """Open one artifact, hashing every byte and checking its signature with ``--trusted-key``
    (blocking: run it off the event loop); a trunk already loaded is reused (``edgeft.runtime.trunks``).
    ``others``: how many models are served beside it. A classifier's batcher is not started yet."""
    from edgeft.runtime import load
    from edgeft.signing import load_trusted_keys

    keys = load_trusted_keys(config.trusted_keys) if config.trusted_keys else []
    t0 = time.perf_counter()
    first = load(path, threads=config.threads, trusted_keys=keys, spin=config.spin,
                 reserve=_spin_reserve(config, others))
    m = _model(config, metrics, name, first)
    m.signature_checked = bool(keys)
    metrics.loaded.set(1, model=name)
    spin = getattr(first, "spinning", None)
    log.info("loaded %s (%s) from %s in %.1fs%s", name, m.task.value, path, time.perf_counter() - t0,
             "" if spin is None else f"; threads {'spin' if spin else 'sleep'} ({first.spin_reason})",
             extra={"fields": {"model": name, "task": m.task.value, "path": str(path), "spin": spin}})
    return m


def load_models(config: ServeConfig, metrics: Registry) -> dict[str, Model]:
    """Open every artifact, hashing every byte (blocking: run it off the event loop)."""
    models: dict[str, Model] = {}
    for name, path in zip(config.model_names(), config.artifacts):
        models[name] = load_model(config, metrics, name, path, len(config.artifacts) - 1)
    log_trunks(models)
    return models


def trunk_groups(models: dict[str, Model]) -> dict[str, list[str]]:
    """The served models by the trunk they run on (its sha256), split models only."""
    groups: dict[str, list[str]] = {}
    for name, m in models.items():
        if m.manifest.trunk is not None:
            groups.setdefault(m.manifest.trunk.sha256, []).append(name)
    return groups


def log_trunks(models: dict[str, Model]) -> None:
    """One line per loaded trunk: its digest, its boundary and the models that share its session."""
    for sha, names in trunk_groups(models).items():
        blocks = models[names[0]].manifest.trunk.blocks
        log.info("trunk %s (embeddings and %d blocks): %s %s", sha[:16], blocks, ", ".join(names),
                 "share one session" if len(names) > 1 else "(not shared)",
                 extra={"fields": {"trunk": sha, "blocks": blocks, "models": names}})


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
        self.admin = asyncio.Lock()  # one load or unload at a time (``admin``)
        self._many: ThreadPoolExecutor | None = None  # runs requests over several models (``run_many``)
        self._many_waiting = 0

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
        held = _HELD.get()
        if held is not None:  # within ``hold``: the model counts this request until it ends
            m.in_flight += 1
            held.append(m)
        return m

    @staticmethod
    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        """Around one request: every model it looks up (``model``) counts it in flight until it ends."""
        held: list[Model] = []
        token = _HELD.set(held)
        try:
            yield
        finally:
            _HELD.reset(token)
            for m in held:
                m.release()

    async def run_many(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the one thread that runs requests over several models, in turn (each such
        request is one batch of its own); 429 past ``--queue-size`` waiting."""
        if self._many_waiting > self.config.queue_size:
            raise Overloaded(f"{self._many_waiting} requests over several models are waiting")
        if self._many is None:
            self._many = ThreadPoolExecutor(1, thread_name_prefix="edgeft-many")
        self._many_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._many, fn, *args)
        finally:
            self._many_waiting -= 1

    def shared_with(self, m: Model) -> list[str]:
        """The other served models that run on ``m``'s trunk."""
        if m.manifest.trunk is None:
            return []
        return [n for n in trunk_groups(self.models).get(m.manifest.trunk.sha256, []) if n != m.name]

    def add_model(self, m: Model) -> None:
        """Serve ``m`` (loaded, its batcher not started): on the event loop."""
        if m.batcher is not None:
            m.batcher.start()
        self.models = {**self.models, m.name: m}

    async def remove_model(self, name: str, timeout: float) -> Model:
        """Stop routing requests to ``name``, wait up to ``timeout`` seconds for those in flight, close it.

        Past the timeout the model is served again and the removal refused (409): no request is lost."""
        m = self.models[name]
        self.models = {k: v for k, v in self.models.items() if k != name}
        if m.in_flight:
            m.idle = asyncio.Event()
            try:
                await asyncio.wait_for(m.idle.wait(), timeout)
            except TimeoutError:
                self.models = {**self.models, name: m}
                raise ApiError(409, f"'{name}' still has {m.in_flight} request(s) in flight after {timeout:g}s: "
                               "try again", param="model", code="model_busy") from None
        await m.close()
        self.metrics.loaded.set(0, model=name)
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
