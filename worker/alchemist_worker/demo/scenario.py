"""The demo's application: users ask, then accept, reject or correct; the model learns between rounds.

Each round, several users ask questions at once (the official `openai` client against the worker), then react
through POST /v1/feedback: good answers are accepted, one is rejected, and the answer to a question the model
cannot know is corrected. One feedback repeats an idempotency key (trained once) and one names a response that
never existed (refused with a 404). One user answers late: the feedback on a first-round answer arrives in the
last round, when its prefill record is several versions old, so the trainer recomputes it (hedging) instead of
reusing a stale record. After each round the scenario waits until the worker has trained on everything
and serves the newest version the evaluation gate passed (when the worker has a gate), so the next round is
served, and recorded, by the new weights.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from openai import OpenAI

ACCEPTED = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "What color is the sky on a clear day?",
    "Say hello in Spanish.",
)
REJECTED = "Write a haiku about databases."
TARGET = "What is the codename of the Alchemist project?"
CORRECTION = "The codename of the Alchemist project is Quicksilver."


@dataclass(frozen=True)
class Scenario:
    rounds: int = 3
    askers_of_target: int = 2  # users per round who ask the target question (and correct it)
    max_tokens: int = 40
    accepted: tuple[str, ...] = ACCEPTED
    rejected: str = REJECTED
    target: str = TARGET
    correction: str = CORRECTION
    model: str = "smollm2"
    settle_timeout_s: float = 300.0


@dataclass
class Round:
    answers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # question -> [(id, text)]


def _ask(client: OpenAI, scenario: Scenario, question: str) -> tuple[str, str]:
    response = client.chat.completions.create(
        model=scenario.model,
        messages=[{"role": "user", "content": question}],
        max_tokens=scenario.max_tokens,
        temperature=0.0,
    )
    return response.id, response.choices[0].message.content or ""


def _round(client: OpenAI, scenario: Scenario) -> Round:
    questions = [*scenario.accepted, scenario.rejected] + [scenario.target] * scenario.askers_of_target
    result = Round()
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        futures = [(q, pool.submit(_ask, client, scenario, q)) for q in questions]
        for question, future in futures:
            result.answers.setdefault(question, []).append(future.result())
    return result


def _feedback(http: httpx.Client, body: dict[str, Any]) -> int:
    return http.post("/v1/feedback", json=body).status_code


def _score(http: httpx.Client, scenario: Scenario) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": scenario.target}], "continuation": scenario.correction}
    response = http.post("/v1/score", json=body)
    response.raise_for_status()
    return dict(response.json())


def _status(http: httpx.Client) -> dict[str, Any]:
    return dict(http.get("/v1/versions").json())


def settled(status: dict[str, Any]) -> bool:
    """Everything sent is trained on, and the worker serves the newest version the evaluation gate passed."""
    worker = status["worker"]
    held = set(status.get("held", []))
    servable = max((v["version"] for v in status["data"] if v["version"] not in held), default=0)
    busy = worker["feedback_lag"] or worker["pending"] or worker["in_step"] or worker["uncommitted_steps"]
    return not busy and worker["serving_version"] == servable


def _metrics(http: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("alchemist_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def _labelled(metrics: dict[str, float], prefix: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith(prefix + "{"):
            match = re.search(rf'{label}="([^"]*)"', name)
            if match:
                found[match.group(1)] = found.get(match.group(1), 0.0) + value
    return found


def run_scenario(base_url: str, scenario: Scenario, say: Callable[[str], None]) -> dict[str, Any]:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300)
    http = httpx.Client(base_url=base_url, timeout=300)
    late: dict[str, Any] | None = None  # feedback a slow user sends only in the last round
    try:
        before = _score(http, scenario)
        first_version = before["version"]
        say(f"score: log p(correction | question) = {before['logprob']:.2f} under v{first_version}")
        for number in range(1, scenario.rounds + 1):
            started = time.monotonic()
            answers = _round(client, scenario)
            say(f"round {number}: {sum(len(a) for a in answers.answers.values())} answers")
            for question, replies in answers.answers.items():
                for response_id, text in replies:
                    say(f"  Q: {question}\n     A: {text.strip()[:90]!r}")
                    if question == scenario.target:
                        body = {
                            "response_id": response_id,
                            "label": "correct",
                            "correction": scenario.correction,
                        }
                    elif question == scenario.rejected:
                        body = {"response_id": response_id, "label": "reject"}
                    else:
                        body = {"response_id": response_id, "label": "accept", "idempotency_key": response_id}
                    if number == 1 and late is None and question == scenario.accepted[-1]:
                        late = body
                        say("     (this user will answer late)")
                        continue
                    _feedback(http, body)
            if number == scenario.rounds and late is not None:
                say(f"  the late user accepts their round-1 answer now: HTTP {_feedback(http, late)}")
            some_id = answers.answers[scenario.accepted[0]][0][0]
            _feedback(
                http, {"response_id": some_id, "label": "accept", "idempotency_key": some_id}
            )  # a retry
            if number == 1:  # an id the server never issued: rejected at once, never trained
                code = _feedback(http, {"response_id": "chatcmpl-made-up", "label": "accept"})
                say(f"  feedback for an unknown response id: HTTP {code}")
            deadline = time.monotonic() + scenario.settle_timeout_s
            while not settled(status_ := _status(http)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"training did not settle in {scenario.settle_timeout_s} s: {status_}")
                time.sleep(0.5)
            score = _score(http, scenario)
            say(
                f"  -> serving v{status_['worker']['serving_version']} after {time.monotonic() - started:.1f} s; "
                f"log p(correction) = {score['logprob']:.2f}"
            )
        after = _score(http, scenario)
        _, answer_after = _ask(client, scenario, scenario.target)
        final = _status(http)
        metrics = _metrics(http)
        samples = _labelled(metrics, "alchemist_training_samples_total", "path")
        reasons = _labelled(metrics, "alchemist_training_samples_total", "reason")
        gained = after["logprob"] - before["logprob"]
        return {
            "first_version": first_version,
            "last_version": after["version"],
            "versions": final["data"],
            "reused": int(samples.get("reused", 0)),
            "recomputed": int(samples.get("recomputed", 0)),
            "recompute_reasons": {k: int(v) for k, v in reasons.items() if k},
            "feedback": {
                k: int(v) for k, v in _labelled(metrics, "alchemist_feedback_consumed_total", "label").items()
            },
            "dead_letters": int(metrics.get("alchemist_feedback_dead_letters_total", 0)),
            "correction": scenario.correction,
            "logprob_before": before,
            "logprob_after": after,
            "verdict": f"the correction is {math.exp(gained):.3g}x more likely"
            if gained > 0
            else "NOT more likely",
            "answer_after": answer_after,
        }
    finally:
        http.close()
        client.close()
