"""The Redis protocol shared by the worker, the operator and applications: key names and message schemas."""
