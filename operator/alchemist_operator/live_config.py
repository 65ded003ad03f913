"""Which of a job's settings reach running workers without a restart, and which need new pods.

Training hyper-parameters can change between two steps, so the operator writes them to Redis (the protocol's
`live_settings`) and the workers apply them; they stay in the ConfigMap too, for pods that start later, but are
left out of the pod template's config hash, so changing them rolls no pod and reloads no model. Everything else
in the ConfigMap (the model, the engine, LoRA's shape, recording budgets) is read once at start and rolls the
pods when it changes. Rollout settings are the operator's alone and never reach the pods.
"""

from __future__ import annotations

from alchemist_protocol.live_settings import LiveSettings, LiveTraining

from alchemist_operator.job_spec import JobSpec

# ConfigMap keys the workers also take live: each is one LiveTraining field.
LIVE_CONFIG_KEYS = frozenset(
    {
        "ALCHEMIST_TRAINING_LEARNING_RATE",
        "ALCHEMIST_TRAINING_WEIGHT_DECAY",
        "ALCHEMIST_TRAINING_BATCH_SIZE",
        "ALCHEMIST_TRAINING_MAX_STALENESS",
        "ALCHEMIST_TRAINING_STEP_INTERVAL_SECONDS",
        "ALCHEMIST_TRAINING_PUBLISH_EVERY_STEPS",
    }
)


def restart_config(config_data: dict[str, str]) -> dict[str, str]:
    """The ConfigMap data whose change needs new pods: what the pod template's config hash covers."""
    return {key: value for key, value in config_data.items() if key not in LIVE_CONFIG_KEYS}


def live_settings(spec: JobSpec) -> LiveSettings:
    training = spec.training
    return LiveSettings(
        training=LiveTraining(
            learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            batch_samples=training.batch_size,
            max_staleness=training.max_staleness,
            step_interval_s=training.step_interval_seconds,
            publish_every_steps=training.publish_every_steps,
        )
    )
