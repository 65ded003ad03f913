"""The in-pod continual trainer: settings, co-scheduling with serving, the sliced step, versions, the runtime."""
