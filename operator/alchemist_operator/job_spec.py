"""The `ContinualLearningJob` spec as typed models, with the same defaults as the CRD's OpenAPI schema.

The API server applies the CRD defaults before the operator sees an object; the operator applies them again
here, so a spec that reaches it by another path (an old object, a test API, a server without defaulting) means the
same thing. A test walks the CRD schema and this model side by side and keeps the two in step.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from alchemist_operator.quantities import QUANTITY_PATTERN, parse_quantity

# The CRD's bounds, repeated here for specs that reach the operator without the API server's validation.
MAX_REPLICAS = 64
MAX_GPUS = 1  # the worker drives one device; more would be requested, paid for and left idle


class SpecModel(BaseModel):
    """camelCase in YAML, snake_case in Python; unknown fields are an error (the API server prunes them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSource(enum.StrEnum):
    IMAGE = "Image"
    VOLUME = "Volume"


class Dtype(enum.StrEnum):
    AUTO = "auto"  # bfloat16 on a GPU, float32 on CPU
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Engine(enum.StrEnum):
    NATIVE = "native"
    VLLM = "vllm"


class RecordingPolicy(enum.StrEnum):
    OFF = "off"
    KV = "kv"
    SELECTIVE = "selective"
    FULL = "full"


class RecordDtype(enum.StrEnum):
    AUTO = "auto"  # the model's
    BFLOAT16 = "bfloat16"


class TrainingMethod(enum.StrEnum):
    LORA = "lora"
    FULL = "full"


class TrainingMode(enum.StrEnum):
    EXACT = "exact"
    TRUNCATED = "truncated"


class Objective(enum.StrEnum):
    SUPERVISED = "supervised"
    UNLIKELIHOOD = "unlikelihood"
    KTO = "kto"
    DPO = "dpo"


class OnHeld(enum.StrEnum):
    REVERT = "revert"  # training continues from the held version's parent
    CONTINUE = "continue"  # training continues from the held version


class Optimizer(enum.StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class RolloutStrategy(enum.StrEnum):
    IMMEDIATE = "Immediate"
    CANARY = "Canary"


class VersionsStorage(enum.StrEnum):
    PER_REPLICA = "PerReplica"  # a ReadWriteOnce claim per pod; replicas copy versions over HTTP
    PERSISTENT_VOLUME_CLAIM = "PersistentVolumeClaim"  # one claim all pods mount (ReadWriteMany)
    S3 = "S3"  # an S3-compatible bucket; each pod keeps a local copy of what it loads
    EMPTY_DIR = "EmptyDir"


class AccessMode(enum.StrEnum):
    READ_WRITE_MANY = "ReadWriteMany"  # every replica mounts it, on any node
    READ_WRITE_ONCE = "ReadWriteOnce"  # replicas must share one node


class PullPolicy(enum.StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


def _checked_quantity(value: str | int) -> str | int:
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a quantity like '8Gi', '500m' or '4'")
    parse_quantity(value)
    return value


Quantity = Annotated[str | int, AfterValidator(_checked_quantity)]


class S3Spec(SpecModel):
    """How to reach an S3-compatible store; the Secret holds AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""

    endpoint: str | None = Field(default=None, pattern=r"^https?://")
    region: str | None = Field(default=None, min_length=1)
    credentials_secret: str | None = Field(default=None, min_length=1)


MODEL_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|oci://\S+|s3://[^/\s]+(/\S*)?)$"


class ModelSpec(SpecModel):
    uri: str | None = Field(default=None, pattern=MODEL_URI_PATTERN)
    path: str | None = Field(default=None, min_length=1)
    source: ModelSource = ModelSource.IMAGE
    claim_name: str | None = Field(default=None, min_length=1)
    mount_path: str = Field(default="/models", pattern=r"^/")
    dtype: Dtype = Dtype.AUTO
    served_name: str | None = Field(default=None, min_length=1)
    s3: S3Spec = Field(default_factory=S3Spec)


class Toleration(SpecModel):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


class ResourcesSpec(SpecModel):
    gpus: int = Field(default=1, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    cpu: Quantity = Field(default="4")
    memory: Quantity = Field(default="32Gi")
    cpu_limit: Quantity | None = None  # None: no CPU limit (the worker then runs ceil(cpu) torch threads)
    shared_memory: Quantity = Field(default="8Gi")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


def _checked_positive_quantity(value: str | int) -> str | int:
    if parse_quantity(value) <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return value


PositiveQuantity = Annotated[Quantity, AfterValidator(_checked_positive_quantity)]


class ServingSpec(SpecModel):
    port: int = Field(default=8000, ge=1024, le=65535)
    max_model_len: int = Field(default=4096, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    kv_cache_memory: PositiveQuantity = Field(default="4Gi")


class RecordingSpec(SpecModel):
    policy: RecordingPolicy = RecordingPolicy.SELECTIVE
    sample_rate: float = Field(default=0.25, ge=0.0, le=1.0)
    host_memory: Quantity = Field(default="8Gi")
    gpu_memory: Quantity = Field(default="1Gi")
    ttl_seconds: int = Field(default=86400, ge=1)
    dtype: RecordDtype = RecordDtype.AUTO


class LoraSpec(SpecModel):
    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class FullSpec(SpecModel):
    train_embeddings: bool = False


class RehearsalSpec(SpecModel):
    samples: int = Field(default=0, ge=0)
    capacity: int = Field(default=512, ge=1)


class TrainingSpec(SpecModel):
    enabled: bool = True
    objective: Objective = Objective.SUPERVISED
    beta: float = Field(default=0.1, gt=0)
    desirable_weight: float = Field(default=1.0, ge=0)
    undesirable_weight: float = Field(default=1.0, ge=0)
    kl_weight: float = Field(default=0.0, ge=0)
    rehearsal: RehearsalSpec = Field(default_factory=RehearsalSpec)
    method: TrainingMethod = TrainingMethod.LORA
    mode: TrainingMode = TrainingMode.EXACT
    lora: LoraSpec = Field(default_factory=LoraSpec)
    full: FullSpec = Field(default_factory=FullSpec)
    optimizer: Optimizer = Optimizer.ADAMW
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    max_staleness: int = Field(default=4, ge=0)
    step_interval_seconds: float = Field(default=0.0, ge=0)
    publish_every_steps: int = Field(default=10, ge=1)


class SecretKeyRef(SpecModel):
    name: str = Field(min_length=1)
    key: str = Field(default="url", min_length=1)


class FeedbackSpec(SpecModel):
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    redis_secret_ref: SecretKeyRef | None = None
    stream: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^\S+$")


class CanarySpec(SpecModel):
    replicas: int = Field(default=1, ge=1)
    min_feedback: int = Field(default=50, ge=1)
    max_acceptance_drop: float = Field(default=0.05, ge=0.0, le=1.0)
    auto_rollback: bool = True
    timeout_seconds: int = Field(default=3600, ge=1)


class RolloutSpec(SpecModel):
    strategy: RolloutStrategy = RolloutStrategy.IMMEDIATE
    canary: CanarySpec = Field(default_factory=CanarySpec)


class VersionsSpec(SpecModel):
    storage: VersionsStorage = VersionsStorage.PER_REPLICA
    size: Quantity = Field(default="20Gi")
    access_mode: AccessMode | None = None  # None: ReadWriteMany shared, ReadWriteOnce per replica
    storage_class_name: str | None = None
    retain_on_delete: bool = False
    uri: str | None = Field(default=None, pattern=r"^s3://[^/\s]+(/\S*)?$")
    s3: S3Spec = Field(default_factory=S3Spec)


class KeySelector(SpecModel):
    """A key of a Secret or ConfigMap in the job's namespace, as a pod's env takes it."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)
    optional: bool | None = None


class FieldSelector(SpecModel):
    field_path: str = Field(min_length=1)
    api_version: str | None = None


class ResourceFieldSelector(SpecModel):
    resource: str = Field(min_length=1)
    container_name: str | None = None
    divisor: Quantity | None = None


class EnvVarSource(SpecModel):
    secret_key_ref: KeySelector | None = None
    config_map_key_ref: KeySelector | None = None
    field_ref: FieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None


class EnvVar(SpecModel):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: EnvVarSource | None = None


class SecretKey(SpecModel):
    """One key of a Secret in the job's namespace."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class AuthSpec(SpecModel):
    """API keys for the worker's HTTP API, mounted as files; the Secrets hold one key per line."""

    api_keys_secret: SecretKey | None = None
    admin_keys_secret: SecretKey | None = None


class PasswordSecret(SpecModel):
    name: str = Field(min_length=1)
    key: str = Field(default="password", min_length=1)


class RedisSpec(SpecModel):
    """Credentials for the job's Redis, kept out of the URL (and so out of the ConfigMap and the pod spec)."""

    password_secret: PasswordSecret | None = None


class LocalObjectReference(SpecModel):
    name: str = Field(min_length=1)


class PodOptions(SpecModel):
    """Passed through to the worker pods as Kubernetes takes them; the API server validates the free-form ones
    (affinity, topology spread, volumes and mounts) when the StatefulSet is written."""

    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    # None: replicas spread across nodes where they can (pod_template.py); [] places them freely.
    topology_spread_constraints: list[dict[str, Any]] | None = None
    priority_class_name: str | None = Field(default=None, min_length=1)
    runtime_class_name: str | None = Field(default=None, min_length=1)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)


class LifecycleSpec(SpecModel):
    """How a worker pod stops: the pod's grace period is preStopSeconds + drainSeconds + a flush margin."""

    pre_stop_seconds: int = Field(default=5, ge=0, le=120)  # for the Service to stop routing to the pod
    drain_seconds: int = Field(default=120, ge=0, le=3600)  # for in-flight generations to finish


class ConfigMapKeyRef(SpecModel):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1, pattern=r"^[-._a-zA-Z0-9]+$")


class EvaluationSpec(SpecModel):
    """The evaluation gate: the set every candidate version is scored on before rollout, and how far it may fall
    behind its parent and the base model. Exactly one of `path` and `config_map`."""

    path: str | None = Field(default=None, pattern=r"^/")  # a JSONL file in the image or on a mounted volume
    config_map: ConfigMapKeyRef | None = None  # a ConfigMap key the operator mounts as the file
    max_perplexity_increase: float = Field(default=0.02, ge=0, le=10)
    max_reference_nll_increase: float = Field(default=0.05, ge=0, le=10)
    max_exact_match_drop: float = Field(default=0.05, ge=0, le=1)
    on_held: OnHeld = OnHeld.REVERT
    # Under revert, the learning rate is multiplied by this once per candidate held in a row from one version.
    held_backoff: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if (self.path is None) == (self.config_map is None):
            raise ValueError(
                "give exactly one of path (a JSONL file in the worker's image or volume) and configMap "
                "(name and key of a ConfigMap in the job's namespace)"
            )
        return self


class JobSpec(SpecModel):
    model: ModelSpec
    image: str | None = Field(default=None, min_length=1)
    image_pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    engine: Engine = Engine.NATIVE
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    recording: RecordingSpec = Field(default_factory=RecordingSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    redis: RedisSpec = Field(default_factory=RedisSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    evaluation: EvaluationSpec | None = None  # no gate without one
    versions: VersionsSpec = Field(default_factory=VersionsSpec)
    env: list[EnvVar] = Field(default_factory=list)
    service_account_name: str | None = Field(default=None, min_length=1)
    pod: PodOptions = Field(default_factory=PodOptions)
    lifecycle: LifecycleSpec = Field(default_factory=LifecycleSpec)
    suspend: bool = False


class InvalidSpec(ValueError):
    """A spec the operator cannot act on; the message says which fields to fix."""


def parse_job_spec(raw: dict[str, Any]) -> JobSpec:
    """Typed spec with defaults; raises InvalidSpec with one line per problem."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        ]
        raise InvalidSpec("; ".join(problems)) from None
