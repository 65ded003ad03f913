"""The worker's configuration as `ALCHEMIST_*` environment variables (docs/worker-environment.md lists them).

Everything that is the same for every pod of a job goes into the job's ConfigMap (the pods load it with
`envFrom`, and a hash of it in the pod template rolls the pods when it changes); what differs per pod (its name)
or is secret (the Redis URL from a Secret, the Redis password) is set in the container's `env`, secrets always as
`valueFrom.secretKeyRef` so that no secret value appears in the ConfigMap or the pod spec.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from alchemist_protocol.keys import JobKeys

from alchemist_operator.evaluation_set import evaluation_config
from alchemist_operator.job_spec import JobSpec
from alchemist_operator.model_source import model_path
from alchemist_operator.naming import VERSIONS_DIR, JobRef
from alchemist_operator.quantities import quantity_bytes
from alchemist_operator.training_group_env import data_parallel_config, data_parallel_pod_env
from alchemist_operator.versions_storage import versions_config


class NoRedis(ValueError):
    """The job names no Redis and the operator was installed without one."""


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _mib(quantity: str | int) -> str:
    """Mebibytes, as the worker's *_MIB settings take them (fractions allowed)."""
    return repr(quantity_bytes(quantity) / 2**20)


# Where the API key Secrets are mounted: one directory per Secret, the chosen key as the file `keys`.
AUTH_DIR = "/etc/alchemist/auth"
API_KEYS_FILE = f"{AUTH_DIR}/api/keys"
ADMIN_KEYS_FILE = f"{AUTH_DIR}/admin/keys"
# The key of the Secret the operator writes into a job's namespace for its default Redis's password.
DEFAULT_PASSWORD_KEY = "password"


def auth_config(spec: JobSpec) -> dict[str, str]:
    """The key files' paths (never the keys): the worker reads the files, which follow Secret updates."""
    config: dict[str, str] = {}
    if spec.auth.api_keys_secret is not None:
        config["ALCHEMIST_API_KEYS_FILE"] = API_KEYS_FILE
    if spec.auth.admin_keys_secret is not None:
        config["ALCHEMIST_ADMIN_KEYS_FILE"] = ADMIN_KEYS_FILE
    return config


def worker_config(job: JobRef, spec: JobSpec) -> dict[str, str]:
    """ConfigMap data: the job-wide settings, all strings."""
    training = spec.training
    recording = spec.recording
    return auth_config(spec) | {
        "ALCHEMIST_JOB": job.name,
        "ALCHEMIST_FEEDBACK_STREAM": JobKeys(job.namespace, job.name, spec.feedback.stream).feedback,
        "ALCHEMIST_MODEL": model_path(spec),
        "ALCHEMIST_SERVED_MODEL_NAME": spec.model.served_name or job.name,
        "ALCHEMIST_DTYPE": spec.model.dtype.value,
        "ALCHEMIST_ENGINE": spec.engine.value,
        "ALCHEMIST_DEVICE": "cuda" if spec.resources.gpus > 0 else "cpu",
        "ALCHEMIST_HOST": "0.0.0.0",
        "ALCHEMIST_PORT": str(spec.serving.port),
        "ALCHEMIST_MAX_MODEL_LEN": str(spec.serving.max_model_len),
        "ALCHEMIST_MAX_NUM_SEQS": str(spec.serving.max_num_seqs),
        "ALCHEMIST_KV_CACHE_MIB": _mib(spec.serving.kv_cache_memory),
        "ALCHEMIST_RECORD_POLICY": recording.policy.value,
        "ALCHEMIST_RECORD_RATE": repr(recording.sample_rate),
        "ALCHEMIST_RECORD_DEVICE_MIB": _mib(recording.gpu_memory),
        "ALCHEMIST_RECORD_HOST_MIB": _mib(recording.host_memory),
        "ALCHEMIST_RECORD_DTYPE": recording.dtype.value,
        "ALCHEMIST_REQUEST_TTL_S": str(recording.ttl_seconds),
        "ALCHEMIST_TRAINING_ENABLED": _flag(training.enabled),
        "ALCHEMIST_TRAINING_OBJECTIVE": training.objective.value,
        "ALCHEMIST_TRAINING_BETA": repr(training.beta),
        "ALCHEMIST_TRAINING_DESIRABLE_WEIGHT": repr(training.desirable_weight),
        "ALCHEMIST_TRAINING_UNDESIRABLE_WEIGHT": repr(training.undesirable_weight),
        "ALCHEMIST_TRAINING_KL_WEIGHT": repr(training.kl_weight),
        "ALCHEMIST_TRAINING_REHEARSAL_SAMPLES": str(training.rehearsal.samples),
        "ALCHEMIST_TRAINING_REHEARSAL_CAPACITY": str(training.rehearsal.capacity),
        "ALCHEMIST_TRAINING_METHOD": training.method.value,
        "ALCHEMIST_TRAINING_MODE": training.mode.value,
        "ALCHEMIST_TRAINING_LORA_RANK": str(training.lora.rank),
        "ALCHEMIST_TRAINING_LORA_ALPHA": repr(training.lora.alpha),
        "ALCHEMIST_TRAINING_LORA_TARGET_MODULES": ",".join(training.lora.target_modules),
        "ALCHEMIST_TRAINING_TRAIN_EMBEDDINGS": _flag(training.full.train_embeddings),
        "ALCHEMIST_TRAINING_OPTIMIZER": training.optimizer.value,
        "ALCHEMIST_TRAINING_LEARNING_RATE": repr(training.learning_rate),
        "ALCHEMIST_TRAINING_WEIGHT_DECAY": repr(training.weight_decay),
        "ALCHEMIST_TRAINING_BATCH_SIZE": str(training.batch_size),
        "ALCHEMIST_TRAINING_MAX_STALENESS": str(training.max_staleness),
        "ALCHEMIST_TRAINING_STEP_INTERVAL_SECONDS": repr(training.step_interval_seconds),
        "ALCHEMIST_TRAINING_PUBLISH_EVERY_STEPS": str(training.publish_every_steps),
        "ALCHEMIST_VERSIONS_DIR": VERSIONS_DIR,
        **evaluation_config(spec),
        **data_parallel_config(spec),
        **versions_config(job, spec),
    }


def uses_default_redis(spec: JobSpec) -> bool:
    return spec.feedback.redis_url is None and spec.feedback.redis_secret_ref is None


def password_source(job: JobRef, spec: JobSpec, default_password: bool) -> dict[str, str] | None:
    """The secretKeyRef holding the Redis password: the job's own Secret, else the one the operator writes for
    its default Redis (`default_password`: the operator was installed with a password for it), else None."""
    ref = spec.redis.password_secret
    if ref is not None:
        return {"name": ref.name, "key": ref.key}
    if default_password and uses_default_redis(spec):
        return {"name": job.redis_secret, "key": DEFAULT_PASSWORD_KEY}
    return None


def url_with_password_reference(url: str) -> str:
    """`url` with `$(ALCHEMIST_REDIS_PASSWORD)` as its password, for Kubernetes to expand in the container.

    The password then reaches the worker inside the URL without being written in the pod spec. Kubernetes does
    not URL-encode what it expands, so the password must use URL-safe characters (generated ones do). A URL that
    carries a password of its own, or a unix socket URL, is returned unchanged; `rediss://` stays TLS.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or parts.password is not None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return url.replace(parts.netloc, f"{user}:$(ALCHEMIST_REDIS_PASSWORD)@{host}", 1)


def redis_env(
    job: JobRef, spec: JobSpec, default_redis_url: str | None, default_password: bool
) -> list[dict[str, object]]:
    """ALCHEMIST_REDIS_PASSWORD (when there is one), then ALCHEMIST_REDIS_URL: from the job's Secret, its URL, or
    the operator's default, in that order."""
    env: list[dict[str, object]] = []
    password = password_source(job, spec, default_password)
    if password is not None:
        env.append({"name": "ALCHEMIST_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": password}})
    feedback = spec.feedback
    if feedback.redis_secret_ref is not None:
        ref = feedback.redis_secret_ref
        env.append(
            {"name": "ALCHEMIST_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
        return env
    url = feedback.redis_url or default_redis_url
    if url is None:
        raise NoRedis(
            "no Redis for feedback: set spec.feedback.redisUrl or spec.feedback.redisSecretRef, "
            "or install the operator with a Redis (Helm value redis.enabled or redis.externalUrl)"
        )
    if password is not None:
        url = url_with_password_reference(url)
    env.append({"name": "ALCHEMIST_REDIS_URL", "value": url})
    return env


POD_ENV_NAMES = (
    "ALCHEMIST_NAMESPACE",
    "ALCHEMIST_REPLICA",
    "ALCHEMIST_REDIS_URL",
    "ALCHEMIST_REDIS_PASSWORD",
    "ALCHEMIST_DP_ADDRESS",
)


def pod_env(
    job: JobRef, spec: JobSpec, default_redis_url: str | None, default_password: bool = False
) -> list[dict[str, object]]:
    """Container env: the per-pod identity, the Redis password and URL, then the job's own extra variables."""
    env: list[dict[str, object]] = [
        {"name": "ALCHEMIST_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "ALCHEMIST_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *redis_env(job, spec, default_redis_url, default_password),
        *data_parallel_pod_env(job, spec),
    ]
    env.extend(var.model_dump(by_alias=True, exclude_none=True) for var in spec.env)
    return env
