"""Where the worker keeps what outlives a process on one machine: converted models, local versions."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$ALCHEMIST_CACHE`, else `$XDG_CACHE_HOME/alchemist`, else `~/.cache/alchemist`."""
    root = os.environ.get("ALCHEMIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alchemist"
    )
    return Path(root)
