"""Rehearsal: a bounded sample of earlier accepted answers, trained again alongside new feedback.

A forgetting guard that needs no reference model (the other one is the KL penalty, training/objectives.py):
each step adds `rehearsal_samples` answers drawn from this buffer to its feedback, so what earlier versions
learned keeps being asked for while new corrections pull the weights elsewhere. It also repeats a taught
correction after its own step, which is most of what a new fact needs.

What enters: the desirable answers (accepted, and corrections' texts) of a version once it is committed and, when
the job has an evaluation gate, once the gate has passed it; a held version's answers never do, so a run of
wrong corrections is not rehearsed into the next versions. The buffer is a uniform reservoir over everything that
ever entered (Vitter's algorithm R), so old lessons keep their share however long the job runs.

Rehearsed answers are recomputed: their prefill records were used, or evicted, long ago. The buffer travels in
the trainer's checkpointed state, so a restart, a rollback or a revert continues with the buffer of the version
it continues from. Choices are seeded by what has happened so far (entries seen, optimizer steps), so a step
is reproducible from its version.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from alchemist_worker.feedback.samples import TrainingSample

_SEED = 0x5EED


@dataclass(frozen=True)
class RehearsalEntry:
    """One answer to rehearse: the prompt's and the answer's token ids, and the feedback it came from."""

    feedback_id: str
    prompt_tokens: tuple[int, ...]
    response_tokens: tuple[int, ...]


def answers_of(samples: Iterable[TrainingSample]) -> list[RehearsalEntry]:
    """The desirable answers among trained samples: what may enter the buffer once their version passes."""
    return [RehearsalEntry(s.feedback_id, s.prompt_tokens, s.response_tokens) for s in samples if s.desirable]


class RehearsalBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a rehearsal buffer holds at least one answer, got capacity {capacity}")
        self.capacity = capacity
        self.entries: list[RehearsalEntry] = []
        self.seen = 0  # entries ever offered: the reservoir's denominator

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Iterable[RehearsalEntry]) -> None:
        """Keeps each offered entry with probability capacity / seen (all of them while there is room)."""
        for entry in entries:
            self.seen += 1
            if len(self.entries) < self.capacity:
                self.entries.append(entry)
                continue
            slot = random.Random(_SEED * 1_000_003 + self.seen).randrange(self.seen)
            if slot < self.capacity:
                self.entries[slot] = entry

    def draw(self, k: int, step: int) -> list[RehearsalEntry]:
        """Up to `k` distinct entries for optimizer step `step`, the same for the same buffer and step."""
        if k <= 0 or not self.entries:
            return []
        return random.Random(_SEED * 7_919 + step).sample(self.entries, min(k, len(self.entries)))

    def state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "entries": self.entries_state(self.entries)}

    def load(self, state: dict[str, Any] | None) -> None:
        """Takes a checkpointed buffer (none: empty). A smaller capacity now keeps the first entries."""
        self.entries, self.seen = [], 0
        if not state:
            return
        self.entries = self.entries_from_state(state["entries"])[: self.capacity]
        self.seen = max(int(state["seen"]), len(self.entries))

    @staticmethod
    def entries_state(entries: list[RehearsalEntry]) -> list[list[Any]]:
        """Plain lists, as the trainer's checkpointed state holds them."""
        return [[e.feedback_id, list(e.prompt_tokens), list(e.response_tokens)] for e in entries]

    @staticmethod
    def entries_from_state(raw: list[list[Any]]) -> list[RehearsalEntry]:
        return [
            RehearsalEntry(str(fid), tuple(int(t) for t in prompt), tuple(int(t) for t in response))
            for fid, prompt, response in raw
        ]
