"""Where xopt keeps what it measured or built on this machine (lowering timings, CUDA libraries).

`XOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/xopt`, else `~/.cache/xopt`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder of xopt's per-machine caches (not created here)."""
    configured = os.environ.get("XOPT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xopt"
