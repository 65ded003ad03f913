"""Feedback from applications: the consumer-group reader, sample resolution and the HTTP route."""
