"""The suite's result schema: measurements, skips, ratios and goals, as dataclasses <-> JSON.

A run of the suite is one ``SuiteResult``: the environment it ran in (machine, threads,
versions), every ``Measurement`` (a median with its spread, or one plain figure), every
system it had to skip and why, the export ``Gate`` of every artifact it measured, and the
``Ratio``s and ``Goal``s computed from them.
This module does arithmetic and bookkeeping only; it measures nothing and imports
nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft.bench import Stat


@dataclass(frozen=True)
class Measurement:
    """One figure of one system in one case, e.g. edgeft int8's decode tokens/s."""

    case: str  # generation, bandwidth, classification, quality, tuning, footprint
    system: str  # "edgeft int8", "transformers fp32", "llama.cpp Q8_0", ...
    metric: str  # decode_tps, prefill_tps, ttft_ms, peak_mib, accuracy, ...
    value: Stat | float
    unit: str
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"prompt_tokens": 512}
    higher_is_better: bool = True
    note: str = ""

    @property
    def median(self) -> float:
        return self.value.median if isinstance(self.value, Stat) else float(self.value)

    def matches(self, metric: str, system: str, params: dict[str, Any] | None = None) -> bool:
        if self.metric != metric or self.system != system:
            return False
        return all(self.params.get(k) == v for k, v in (params or {}).items())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = self.value.to_dict() if isinstance(self.value, Stat) else self.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurement":
        d = dict(d)
        v = d["value"]
        d["value"] = Stat.from_dict(v) if isinstance(v, dict) else v
        return cls(**d)


@dataclass(frozen=True)
class Skipped:
    """A system or case the suite could not run here, and why (e.g. an extra not installed)."""

    case: str
    system: str
    reason: str


@dataclass(frozen=True)
class Gate:
    """An artifact's export gate as its manifest records it: the verdict and the figures it was judged on.

    ``metrics`` are the gate's own figures (perplexity increase %, token agreement, accuracy drop...);
    ``origin`` is "manifest", or "note" for a result written before gates were fields (its verdict was
    then only in a measurement's note, and is read from there once, when the file is loaded).
    """

    case: str
    system: str
    passed: bool
    chosen: str = ""  # the candidate kept (int4, mixed, int8-dynamic...)
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    origin: str = "manifest"

    @classmethod
    def from_manifest(cls, case: str, system: str, gate: dict[str, Any]) -> "Gate":
        """From a manifest's ``gate`` section (``edgeft.export.pipeline`` writes it)."""
        return cls(case, system, bool(gate["passed"]), str(gate.get("chosen", "")), dict(gate.get("metrics") or {}),
                   list(gate.get("failures") or []), dict(gate.get("thresholds") or {}))


def _gates_from_notes(measurements: list["Measurement"]) -> list[Gate]:
    """The verdicts a result from before gates were fields kept in its decode notes."""
    out = []
    for m in measurements:
        if m.metric == "decode_tps" and ("gate passed" in m.note or "gate FAILED" in m.note):
            out.append(Gate(m.case, m.system, "gate passed" in m.note, origin="note"))
    return out


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of one metric: edgeft against an alternative.

    ``low`` and ``high`` bound the ratio by the two systems' quartiles (worst against best),
    so a ratio whose range straddles 1.0 is within noise.
    """

    metric: str
    numerator: str
    denominator: str
    value: float
    low: float
    high: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.metric}{f' ({extra})' if extra else ''}: {self.numerator} / {self.denominator}"


def _bounds(m: Measurement) -> tuple[float, float]:
    if isinstance(m.value, Stat):
        return m.value.q1, m.value.q3
    return m.median, m.median


def compute_ratio(num: Measurement, den: Measurement, params: dict[str, Any] | None = None) -> Ratio:
    """The ratio of two measurements' medians, with bounds from their quartiles.

    ``params`` are what the two were matched on (shown in the ratio's label).
    """
    if num.metric != den.metric:
        raise ValueError(f"cannot divide {num.metric} by {den.metric}")
    n_lo, n_hi = _bounds(num)
    d_lo, d_hi = _bounds(den)
    div = lambda a, b: a / b if b else float("inf")  # noqa: E731
    return Ratio(num.metric, num.system, den.system, div(num.median, den.median),
                 div(n_lo, d_hi), div(n_hi, d_lo), dict(params or {}))


@dataclass(frozen=True)
class Goal:
    """A target from the issue: ``value`` (a ratio or a plain figure) must reach ``target``.

    ``kind`` is ">=" (the value must be at least the target) or "<=" (at most).
    """

    name: str
    value: float | None  # None when a system it needs was skipped
    target: float
    kind: str = ">="
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.kind == ">=" else self.value <= self.target

    @property
    def verdict(self) -> str:
        """'met', 'not measured', or 'missed by X%' relative to the target."""
        if self.value is None:
            return "not measured"
        if self.met:
            return "met"
        if self.target == 0:
            return f"missed by {abs(self.value - self.target):.3g}"
        gap = abs(self.value - self.target) / abs(self.target) * 100
        return f"missed by {gap:.0f}%"


@dataclass
class Environment:
    """Where and how a suite ran: every absolute figure is only meaningful with this."""

    date: str
    host: str
    cpu: str
    cores: int
    threads: int
    memory_gib: float
    python: str
    versions: dict[str, str]
    quick: bool = False
    shared_machine: str = ""  # a note when other work ran on the machine meanwhile
    load_average: list[float] = field(default_factory=list)
    isa: list[str] = field(default_factory=list)  # the CPU's instruction-set flags (avx2, avx512f, amx_tile...)


@dataclass
class SuiteResult:
    """Everything one run of the suite produced."""

    env: Environment
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gates: list[Gate] = field(default_factory=list)  # the export gates of the artifacts measured

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        return m

    def gate(self, system: str) -> Gate | None:
        """The export gate of the artifact a system ran (the latest recorded), or None."""
        return next((g for g in reversed(self.gates) if g.system == system), None)

    def skip(self, case: str, system: str, reason: str) -> None:
        self.skipped.append(Skipped(case, system, reason))

    def find(self, metric: str, system: str, params: dict[str, Any] | None = None) -> Measurement | None:
        for m in self.measurements:
            if m.matches(metric, system, params):
                return m
        return None

    def ratio(self, metric: str, num: str, den: str, params: dict[str, Any] | None = None) -> Ratio | None:
        """``num / den`` of ``metric`` (with matching params), or None if either is missing."""
        a, b = self.find(metric, num, params), self.find(metric, den, params)
        return compute_ratio(a, b, params) if a and b else None

    def systems(self, case: str) -> list[str]:
        seen: list[str] = []
        for m in self.measurements:
            if m.case == case and m.system not in seen:
                seen.append(m.system)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {"env": asdict(self.env), "measurements": [m.to_dict() for m in self.measurements],
                "skipped": [asdict(s) for s in self.skipped], "notes": list(self.notes),
                "seconds": self.seconds, "gates": [asdict(g) for g in self.gates]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        ms = [Measurement.from_dict(m) for m in d["measurements"]]
        gates = [Gate(**g) for g in d["gates"]] if "gates" in d else _gates_from_notes(ms)
        return cls(Environment(**d["env"]), ms, [Skipped(**s) for s in d["skipped"]], list(d.get("notes", [])),
                   float(d.get("seconds", 0.0)), gates)

    def save(self, path: Path) -> Path:
        from edgeft.fsutil import atomic_write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "SuiteResult":
        return cls.from_dict(json.loads(Path(path).read_text()))
