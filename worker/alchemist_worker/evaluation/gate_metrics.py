"""What the evaluation gate exports to Prometheus: its decisions and the latest readings."""

from __future__ import annotations

from alchemist_protocol.schemas import EvaluationReading
from prometheus_client import CollectorRegistry, Counter, Gauge

SCORES = ("perplexity", "reference_nll", "exact_match")


class GateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "alchemist_evaluation_gate_decisions",
            "Candidate versions judged by the evaluation gate, by decision (held: never rolled out)",
            ["decision"],
            registry=registry,
        )
        self.held_version = Gauge(
            "alchemist_evaluation_last_held_version",
            "The newest version the evaluation gate held back (0: none yet)",
            registry=registry,
        )
        self.scores = Gauge(
            "alchemist_evaluation_score",
            "Scores on the evaluation set of the newest candidate and of the base model",
            ["model", "score"],
            registry=registry,
        )

    def judged(self, version: int, reading: EvaluationReading) -> None:
        self.decisions.labels(decision=reading.decision.value).inc()
        if reading.held:
            self.held_version.set(version)
        for model, scores in (("candidate", reading.scores), ("base", reading.base)):
            for score in SCORES:
                value = getattr(scores, score)
                if value is not None:
                    self.scores.labels(model=model, score=score).set(value)
