"""Where a job's evaluation set reaches the worker: a path it already has, or a ConfigMap mounted as a file.

Pure builders: the environment the worker reads (evaluation/settings.py in the worker) and the pod volume.
The worker reads the set at start and refuses to start on a malformed one (its log names the line), so the
gate never judges versions on a set other than the one the spec names.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import JobSpec

EVALUATION_VOLUME = "evaluation-set"
EVALUATION_DIR = "/etc/alchemist/evaluation"
EVALUATION_FILE = f"{EVALUATION_DIR}/eval.jsonl"


def evaluation_path(spec: JobSpec) -> str | None:
    evaluation = spec.evaluation
    if evaluation is None:
        return None
    return EVALUATION_FILE if evaluation.config_map is not None else evaluation.path


def evaluation_config(spec: JobSpec) -> dict[str, str]:
    """ALCHEMIST_EVALUATION_* for the worker's ConfigMap; empty without an evaluation set (no gate)."""
    evaluation, path = spec.evaluation, evaluation_path(spec)
    if evaluation is None or path is None:
        return {}
    return {
        "ALCHEMIST_EVALUATION_SET": path,
        "ALCHEMIST_EVALUATION_MAX_PERPLEXITY_INCREASE": repr(evaluation.max_perplexity_increase),
        "ALCHEMIST_EVALUATION_MAX_REFERENCE_NLL_INCREASE": repr(evaluation.max_reference_nll_increase),
        "ALCHEMIST_EVALUATION_MAX_EXACT_MATCH_DROP": repr(evaluation.max_exact_match_drop),
        "ALCHEMIST_EVALUATION_ON_HELD": evaluation.on_held.value,
        "ALCHEMIST_EVALUATION_HELD_BACKOFF": repr(evaluation.held_backoff),
    }


def evaluation_volumes(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): the ConfigMap's key as a read-only file, when the set comes from one."""
    ref = None if spec.evaluation is None else spec.evaluation.config_map
    if ref is None:
        return [], []
    volume = {
        "name": EVALUATION_VOLUME,
        "configMap": {
            "name": ref.name,
            "items": [{"key": ref.key, "path": EVALUATION_FILE.rsplit("/", 1)[1]}],
        },
    }
    return [volume], [{"name": EVALUATION_VOLUME, "mountPath": EVALUATION_DIR, "readOnly": True}]
