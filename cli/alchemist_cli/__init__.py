"""The `alchemist` command: a human's view of a ContinualLearningJob, read from Redis and the Kubernetes API."""
