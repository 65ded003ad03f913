"""The main job's scripted application against a real worker process (the tiny model stands in for SmolLM2)."""

from pathlib import Path

import pytest
from alchemist_worker.demo.main_job import GENERAL_SET, gate_summary, print_summary
from alchemist_worker.demo.scenario import Scenario, run_scenario, settled

from tests.worker.continual.worker_process import WorkerProcess

pytestmark = pytest.mark.slow


def test_the_scenario_trains_versions_and_reports_them(
    tiny_checkpoints: dict[str, Path], redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The demo's gate, with bounds no version of the tiny model's training breaks: the test is about the loop.
    worker = WorkerProcess(
        tiny_checkpoints["llama"], redis_url, tmp_path / "versions", tmp_path / "worker.log",
        ALCHEMIST_SERVED_MODEL_NAME="smollm2", ALCHEMIST_TRAINING_LEARNING_RATE="0.01",
        ALCHEMIST_MAX_MODEL_LEN="256", ALCHEMIST_EVALUATION_SET=str(GENERAL_SET),
        ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE="10", ALCHEMIST_EVALUATION_MAX_REFERENCE_NLL_INCREASE="10",
        ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP="1",
    ).start()  # fmt: skip
    lines: list[str] = []
    try:
        summary = run_scenario(
            worker.base_url, Scenario(rounds=2, max_tokens=4, settle_timeout_s=120), lines.append
        )
    finally:
        worker.stop()
    trainable = 2 * (
        len(Scenario().accepted) + Scenario().askers_of_target
    )  # the late user's answer included
    assert summary["first_version"] == 0 and summary["last_version"] >= 2
    assert summary["reused"] + summary["recomputed"] == trainable
    assert summary["reused"] > 0
    assert summary["feedback"] == {"positive": 8, "negative": 2, "correction": 4}
    assert [v["version"] for v in summary["versions"]] == list(range(1, summary["last_version"] + 1))
    assert summary["logprob_after"]["logprob"] > summary["logprob_before"]["logprob"]
    assert any("HTTP 404" in line for line in lines)
    assert all(v["evaluation"]["decision"] == "passed" for v in summary["versions"])
    print_summary(summary)
    out = capsys.readouterr().out
    assert "log-probability under v0" in out
    assert out.count("; gate passed (perplexity") == len(summary["versions"])


def test_the_scenario_settles_on_the_newest_version_the_gate_passed() -> None:
    def status(serving: int, held: list[int]) -> dict[str, object]:
        idle = {"feedback_lag": 0, "pending": 0, "in_step": False, "uncommitted_steps": 0}
        return {
            "data": [{"version": v} for v in (3, 2, 1)],
            "held": held,
            "worker": {**idle, "serving_version": serving},
        }

    assert settled(status(3, []))
    assert not settled(status(1, []))
    assert settled(status(1, [2, 3]))  # 2 and 3 held: version 1 is what should be served
    assert not settled(status(3, [3]))  # a held version served: not what the gate allows
    assert gate_summary(None) == ""
