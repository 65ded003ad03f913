"""The evaluation gate: a candidate version is scored on the job's evaluation set before it may be rolled out."""
