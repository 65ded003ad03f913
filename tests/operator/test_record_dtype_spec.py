"""The record dtype: from the job spec to the worker's environment, and refused when unknown."""

import pytest
from alchemist_operator.job_spec import parse_job_spec
from alchemist_operator.naming import JobRef
from alchemist_operator.worker_env import worker_config

JOB = JobRef(namespace="team-a", name="chat", uid="1234")


def test_record_dtype_defaults_to_the_models_and_reaches_the_worker() -> None:
    default = parse_job_spec({"model": {"path": "/m"}})
    assert worker_config(JOB, default)["ALCHEMIST_RECORD_DTYPE"] == "auto"
    half = parse_job_spec({"model": {"path": "/m"}, "recording": {"dtype": "bfloat16"}})
    assert worker_config(JOB, half)["ALCHEMIST_RECORD_DTYPE"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        parse_job_spec({"model": {"path": "/m"}, "recording": {"dtype": "float8"}})
