"""Checks that the CRD's OpenAPI schema cannot express, run before anything is built from a spec.

The CRD also carries CEL rules for some of these; servers without CEL, objects written before a rule existed,
and the job's name (which no schema validates) still need them here. A failed check leaves the job's children
as they were, and the job gets a False `Valid` condition and a Warning Event with these messages.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.job_spec import (
    MAX_GPUS,
    InvalidSpec,
    JobSpec,
    ModelSource,
    RolloutStrategy,
    TrainingMethod,
    parse_job_spec,
)
from alchemist_operator.model_source import model_problems
from alchemist_operator.naming import job_name_problem
from alchemist_operator.operator_config import OperatorConfig
from alchemist_operator.pod_template import pod_options_problems
from alchemist_operator.quantities import quantity_bytes
from alchemist_operator.versions_storage import versions_problems
from alchemist_operator.worker_env import POD_ENV_NAMES


def spec_problems(name: str, spec: JobSpec, config: OperatorConfig) -> list[str]:
    problems: list[str] = []
    if (name_problem := job_name_problem(name)) is not None:
        problems.append(f"metadata.{name_problem}")
    canary = spec.rollout.canary
    if spec.rollout.strategy is RolloutStrategy.CANARY and 0 < spec.replicas <= canary.replicas:
        problems.append(
            f"spec.rollout.canary.replicas ({canary.replicas}) must be smaller than spec.replicas "
            f"({spec.replicas}): at least one replica must stay on the stable version to compare against"
        )
    problems += model_problems(spec)
    if spec.model.uri is None:
        if spec.model.source is ModelSource.VOLUME and not spec.model.claim_name:
            problems.append("spec.model.claimName is required when spec.model.source is Volume")
        if spec.model.source is ModelSource.IMAGE and spec.model.claim_name:
            problems.append(
                "spec.model.claimName is only used with spec.model.source Volume; remove it or set source"
            )
        if spec.model.source is ModelSource.IMAGE and spec.model.path and not spec.model.path.startswith("/"):
            problems.append(
                f"spec.model.path must be absolute for a model baked into the image, got {spec.model.path!r}"
            )
    problems += versions_problems(spec)
    feedback = spec.feedback
    if feedback.redis_url and feedback.redis_secret_ref:
        problems.append("set spec.feedback.redisUrl or spec.feedback.redisSecretRef, not both")
    elif not feedback.redis_url and not feedback.redis_secret_ref and not config.default_redis_url:
        problems.append(
            "no Redis for feedback: set spec.feedback.redisUrl or spec.feedback.redisSecretRef "
            "(this operator was installed without a default Redis)"
        )
    if spec.training.method is TrainingMethod.LORA and not spec.training.lora.target_modules:
        problems.append("spec.training.lora.targetModules must name at least one module for LoRA training")
    host_budget = quantity_bytes(spec.recording.host_memory)
    pod_memory = quantity_bytes(spec.resources.memory)
    if host_budget >= pod_memory:
        problems.append(
            f"spec.recording.hostMemory ({spec.recording.host_memory}) must be smaller than "
            f"spec.resources.memory ({spec.resources.memory}): the records live in the pod's memory"
        )
    if spec.resources.gpus > MAX_GPUS:
        problems.append(
            f"spec.resources.gpus is {spec.resources.gpus}, but the worker uses {MAX_GPUS} device per pod: the "
            "others would be reserved and idle; set gpus to 1 and add replicas instead"
        )
    problems += _env_problems(spec)
    problems += pod_options_problems(spec)
    reserved = sorted({var.name for var in spec.env} & set(POD_ENV_NAMES))
    if reserved:
        problems.append(f"spec.env must not set {', '.join(reserved)}: the operator sets them for each pod")
    duplicates = sorted({v.name for v in spec.env if [w.name for w in spec.env].count(v.name) > 1})
    if duplicates:
        problems.append(f"spec.env sets {', '.join(duplicates)} more than once")
    return problems


def _env_problems(spec: JobSpec) -> list[str]:
    problems: list[str] = []
    for var in spec.env:
        if var.value is not None and var.value_from is not None:
            problems.append(f"spec.env {var.name}: set value or valueFrom, not both")
        if var.value_from is not None:
            sources = [name for name, v in var.value_from if v is not None]
            if len(sources) != 1:
                problems.append(
                    f"spec.env {var.name}: valueFrom needs exactly one of secretKeyRef, configMapKeyRef, "
                    f"fieldRef or resourceFieldRef, got {len(sources)}"
                )
    return problems


def validate_job(name: str, raw_spec: dict[str, Any], config: OperatorConfig) -> JobSpec:
    """The typed spec, or InvalidSpec listing every problem found."""
    spec = parse_job_spec(raw_spec)
    problems = spec_problems(name, spec, config)
    if problems:
        raise InvalidSpec("; ".join(problems))
    return spec
