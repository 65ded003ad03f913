"""The worker: one process per GPU pod that serves a model and trains it on feedback."""
