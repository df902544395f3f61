"""Statistics of rewriting and of pass pipelines: what ran, how long, and which rules fired.

Every rule of a rule set is listed, including those never tried, so unmatched rules stay
visible. `to_json()` gives the JSON-like form recorded in module.attributes["pass_stats"].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rewrite import RuleSet


@dataclass
class RuleStats:
    attempts: int = 0        # times the pattern was tried at a root of the right op
    matches: int = 0         # times the pattern matched
    rewrites: int = 0        # times the handler returned a replacement
    match_seconds: float = 0.0
    handler_seconds: float = 0.0
    location: str = ""

    def add(self, other: "RuleStats") -> None:
        self.attempts += other.attempts
        self.matches += other.matches
        self.rewrites += other.rewrites
        self.match_seconds += other.match_seconds
        self.handler_seconds += other.handler_seconds
        self.location = self.location or other.location

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "matches": self.matches, "rewrites": self.rewrites,
                "match_seconds": round(self.match_seconds, 6),
                "handler_seconds": round(self.handler_seconds, 6)}


@dataclass
class RewriteStats:
    """Per-rule statistics. Every rule of the rule set is listed, so unmatched ones show."""

    rules: dict[str, RuleStats] = field(default_factory=dict)
    steps: int = 0  # rewrites applied

    @classmethod
    def for_rules(cls, rules: RuleSet) -> "RewriteStats":
        return cls({r.name: RuleStats(location=r.location) for r in rules})

    def merge(self, other: "RewriteStats") -> "RewriteStats":
        for name, st in other.rules.items():
            self.rules.setdefault(name, RuleStats()).add(st)
        self.steps += other.steps
        return self

    def __getitem__(self, name: str) -> RuleStats:
        return self.rules[name]

    def to_json(self) -> dict[str, Any]:
        return {name: st.to_json() for name, st in self.rules.items()}

    def table(self) -> str:
        head = f"{'rule':<28} {'attempts':>8} {'matches':>8} {'rewrites':>8} " \
               f"{'match ms':>9} {'handler ms':>10}  location"
        lines = [head, "-" * len(head)]
        for name, st in sorted(self.rules.items(), key=lambda kv: -kv[1].match_seconds
                               - kv[1].handler_seconds):
            lines.append(f"{name:<28} {st.attempts:>8} {st.matches:>8} {st.rewrites:>8} "
                         f"{st.match_seconds * 1e3:>9.3f} {st.handler_seconds * 1e3:>10.3f}"
                         f"  {st.location}")
        return "\n".join(lines)


@dataclass
class PassStats:
    """What one pass did: wall time, per-rule statistics and free-form counters."""

    name: str  # the pass as spelled in a pipeline, options included
    seconds: float = 0.0
    rules: RewriteStats = field(default_factory=RewriteStats)
    counters: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.name, "seconds": round(self.seconds, 6)}
        if self.counters:
            out["counters"] = dict(self.counters)
        if self.rules.rules:
            out["steps"] = self.rules.steps
            out["rules"] = self.rules.to_json()
        return out


@dataclass
class PipelineStats:
    pipeline: str
    passes: list[PassStats] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.passes)

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "seconds": round(self.seconds, 6),
                "passes": [p.to_json() for p in self.passes]}

    def table(self, rules: bool = False) -> str:
        lines = [f"{'pass':<40} {'ms':>10}"]
        for p in self.passes:
            extra = "  " + " ".join(f"{k}={v}" for k, v in p.counters.items())
            lines.append(f"{p.name:<40} {p.seconds * 1e3:>10.3f}{extra.rstrip()}")
            if rules and p.rules.rules:
                lines.extend("    " + line for line in p.rules.table().splitlines())
        lines.append(f"{'total':<40} {self.seconds * 1e3:>10.3f}")
        return "\n".join(lines)
