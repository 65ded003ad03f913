"""Which version this replica serves: following the rollout pointer (or the latest version), and heartbeats."""
