"""Settings a running worker applies without a restart, and their one Redis key.

A change to the job's spec that only tunes training (learning rate, batch size, staleness bound, step pacing,
how often a step becomes a version) must not restart every pod and reload the model. The operator writes these
values to `JobKeys.live_settings`; each worker's trainer reads the key every few seconds and applies what
changed from its next step on. The pod's environment carries the same values for a worker that starts before
the operator has written them, so a missing key means "keep what the environment said".
"""

from __future__ import annotations

import redis
from pydantic import BaseModel, ConfigDict, Field

from alchemist_protocol.keys import JobKeys


class LiveTraining(BaseModel):
    """Named as the worker's `TrainerSettings` fields, so that the worker applies them by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0)
    batch_samples: int = Field(ge=1)
    max_staleness: int = Field(ge=0)
    step_interval_s: float = Field(ge=0)
    publish_every_steps: int = Field(ge=1)


class LiveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    training: LiveTraining


def read_live_settings(client: redis.Redis, keys: JobKeys) -> LiveSettings | None:
    """None when nobody wrote settings for this job; raises pydantic's ValidationError for a corrupt value."""
    raw = client.get(keys.live_settings)
    return None if raw is None else LiveSettings.model_validate_json(raw)


def write_live_settings(client: redis.Redis, keys: JobKeys, settings: LiveSettings) -> bool:
    """Writes the settings when they differ from the stored ones; returns whether it wrote."""
    payload = settings.model_dump_json()
    if client.get(keys.live_settings) in (payload, payload.encode()):
        return False
    client.set(keys.live_settings, payload)
    return True
