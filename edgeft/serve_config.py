"""``ServeConfig``: everything ``edgeft serve`` can be told, validated on construction.

Each field is a flag of ``edgeft serve`` and an ``EDGEFT_*`` environment variable (the
names in ``flag(env=...)``); its docstring is the flag's help. This module imports only
the standard library and edgeft's errors, so ``edgeft --help`` works on an install
without the runtime extra; the server itself (``edgeft.runtime.serve``) imports it.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.flags import check_fields, flag
from edgeft.runtime.params import Speculation, Spin
from edgeft.signing import TrustedKeys


class LogFormat(str, enum.Enum):
    """How the server writes its log lines to stderr."""

    text = "text"
    json = "json"


def machine_slots(cores: int, memory_bytes: int) -> tuple[int, int]:
    """``--parallel`` and ``--queue-size`` for a machine with ``cores`` and ``memory_bytes``: what they default to.

    Slots: four per core (a decode step is batched, so more sequences than cores keep the cores
    busy: 8 slots on 2 cores served 3.2x one client in the serving benchmark), at most one per
    GiB of memory (a slot's KV cache holds a whole context), 1 to 32. The waiting line: 8 per
    slot (a waiting request holds only its prompt), so a burst is queued rather than refused.
    """
    parallel = max(1, min(4 * max(cores, 1), memory_bytes >> 30, 32))
    return parallel, 8 * parallel


def _machine() -> tuple[int, int]:
    """The cores this process may use (affinity, cgroup quota) and its memory (RAM, cgroup limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = 8 << 30  # where the system does not say
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        memory = min(memory, int(limit)) if limit.isdigit() else memory
    except OSError:
        pass
    return cores, memory


def _default_parallel() -> int:
    return machine_slots(*_machine())[0]


def _default_queue_size() -> int:
    return machine_slots(*_machine())[1]


@dataclass(frozen=True)
class ServeConfig(TrustedKeys):
    """Everything ``edgeft serve`` can be told (each also from an ``EDGEFT_*`` environment variable)."""

    artifacts: tuple[Path, ...] = field(metadata=flag(argument=True, env="EDGEFT_ARTIFACTS", show_default=False))
    """Artifact folders or packed .edgeft files (env: EDGEFT_ARTIFACTS, separated by ':', ';' on Windows)."""
    names: tuple[str, ...] = field(default=(), metadata=flag("--name", env="EDGEFT_NAMES", nonblank=True))
    """Model name for each artifact, in order (default: the folder or file name). Repeat per artifact
    (env: space-separated)."""
    host: str = field(default="127.0.0.1", metadata=flag(env="EDGEFT_HOST"))
    """Address to bind. 0.0.0.0 exposes the server to the network."""
    port: int = field(default=8000, metadata=flag(env="EDGEFT_PORT", min=0, max=65535))
    """Port to listen on."""
    api_key: str | None = field(default=None, metadata=flag(env="EDGEFT_API_KEY", blank_is_none=True))
    """Require 'Authorization: Bearer KEY' on every /v1 route, and on /metrics unless --metrics-key is given
    (/health stays open for probes)."""
    metrics_key: str | None = field(default=None, metadata=flag(env="EDGEFT_METRICS_KEY", blank_is_none=True))
    """Require 'Authorization: Bearer KEY' on /metrics (this key or the API key): give it to the Prometheus
    scraper instead of the API key."""
    threads: int | None = field(default=None, metadata=flag(env="EDGEFT_THREADS", min=1))
    """onnxruntime threads per model (default: all cores). Match the CPU limit."""
    spin: Spin = field(default=Spin.auto, metadata=flag(env="EDGEFT_SPIN"))
    """Idle onnxruntime threads spin (on) or sleep (off); env: EDGEFT_SPIN (1, 0 or auto). auto: spin
    only when the cores a model's threads take are idle at load, besides every other model's threads and,
    with --parallel > 1, one core for the HTTP loop."""
    parallel: int = field(default_factory=_default_parallel, metadata=flag(env="EDGEFT_PARALLEL", min=1))
    """Sequences decoded together per model: the KV slots of its one batching engine (llama.cpp's -np);
    decoders split on one trunk share one --parallel between them (docs/serve.md).
    Default: from this machine, 4 per core, at most 1 per GiB of memory and 32. Replaces --workers."""
    ctx_size: int = field(default=0, metadata=flag("--ctx-size", "-c", env="EDGEFT_CTX_SIZE", min=0))
    """KV cache tokens per model, shared by the slots (llama.cpp's -c); a request longer than one slot is a 400.
    0: parallel x the model's context (each slot a whole context; memory is used only as slots fill)."""
    queue_size: int = field(default_factory=_default_queue_size, metadata=flag(env="EDGEFT_QUEUE_SIZE", min=0))
    """Sequences that may wait per model for a free slot; more get 429. Default: 8 x the machine's default --parallel."""
    prefix_cache: int = field(default=4, metadata=flag(env="EDGEFT_PREFIX_CACHE", min=0))
    """Recent prompt prefixes (system prompt, few-shot header) whose KV cache later requests reuse (0: off)."""
    speculate: Speculation = field(default=Speculation.auto, metadata=flag(env="EDGEFT_SPECULATE"))
    """Prompt-lookup speculative decoding (drafts from the request's own tokens, verified several per step):
    auto switches it per request by its acceptance rate; a request's "speculate" field overrides it."""
    max_tokens: int = field(default=1024, metadata=flag(env="EDGEFT_MAX_TOKENS", min=1))
    """Largest max_tokens a request may ask."""
    max_body_bytes: int = field(default=1 << 20, metadata=flag(env="EDGEFT_MAX_BODY_BYTES", min=1))
    """Largest request body; larger gets 413."""
    max_inputs: int = field(default=256, metadata=flag(env="EDGEFT_MAX_INPUTS", min=1))
    """Texts per /v1/classify or /v1/embeddings request, and documents per /v1/rerank request."""
    batch_size: int = field(default=32, metadata=flag(env="EDGEFT_BATCH_SIZE", min=1))
    """Most texts per classifier run."""
    batch_wait_ms: float = field(default=5.0, metadata=flag(env="EDGEFT_BATCH_WAIT_MS", min=0, max=60_000))
    """How long a classify request waits for others to batch with."""
    max_connections: int = field(default=512, metadata=flag(env="EDGEFT_MAX_CONNECTIONS", min=1))
    """Open connections at most; more get 503."""
    drain_timeout: float = field(default=30.0, metadata=flag(env="EDGEFT_DRAIN_TIMEOUT", min=0, max=86_400))
    """Seconds SIGTERM waits for in-flight requests."""
    log_format: LogFormat = field(default=LogFormat.text, metadata=flag(env="EDGEFT_LOG_FORMAT"))
    """json: one JSON object per line."""
    log_level: str = field(default="info", metadata=flag(env="EDGEFT_LOG_LEVEL"))
    """debug, info, warning or error."""
    ui: bool = field(default=True, metadata=flag(env="EDGEFT_UI"))
    """Serve a page at / to try the models in a browser (it calls the /v1 routes like any client)."""
    max_connections_per_client: int = field(default=128, metadata=flag(env="EDGEFT_MAX_CONNECTIONS_PER_CLIENT",
                                                                                  min=0))
    """Open connections one client address may hold (0: no cap); more are answered 429 and closed. Behind a
    reverse proxy every client has the proxy's address: raise it to --max-connections, or give 0. (Past
    --max-connections, /health and /metrics still answer.)"""
    header_timeout: float = field(default=10.0, metadata=flag(env="EDGEFT_HEADER_TIMEOUT", above=0, max=3600))
    """Seconds a client has to send a request's headers, and again its body; a slower connection is closed
    (so idle or trickling sockets cannot hold the server)."""
    model_dirs: tuple[Path, ...] = field(default=(), metadata=flag("--model-dir", env="EDGEFT_MODEL_DIR"))
    """Folder whose artifacts may be loaded into the running server (POST /v1/models/load, needs --api-key;
    unload: POST /v1/models/unload). Repeat for several; env: folders separated by ':'."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts", tuple(Path(a) for a in self.artifacts))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "trusted_keys", tuple(Path(k) for k in self.trusted_keys))
        object.__setattr__(self, "model_dirs", tuple(Path(d) for d in self.model_dirs))
        try:
            object.__setattr__(self, "speculate", Speculation(self.speculate))
        except ValueError:
            raise EdgeftError(f"--speculate must be auto, on or off, got {self.speculate!r}") from None
        if not self.artifacts:
            raise EdgeftError("no artifact was given: name an artifact folder or packed .edgeft file (or set EDGEFT_ARTIFACTS)")
        check_fields(self)
        if self.names and len(self.names) != len(self.artifacts):
            raise EdgeftError(f"{len(self.names)} --name for {len(self.artifacts)} artifacts: give one per artifact")
        names = self.model_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise EdgeftError(f"two artifacts would both be served as {dup[0]!r}: name them with --name")
        for name in ("api_key", "metrics_key"):
            key = getattr(self, name)
            if key is not None and not key.strip():
                raise EdgeftError(f"the {name.replace('_', ' ')} is empty")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise EdgeftError(f"unknown log level {self.log_level!r}")

    def model_names(self) -> list[str]:
        if self.names:
            return list(self.names)
        return [a.stem if a.suffix == ".edgeft" else a.name for a in self.artifacts]
