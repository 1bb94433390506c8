"""Where xopt keeps what it measured or built on this machine (lowering timings, CUDA libraries,
captured graphs, converted GGUF tokenizers and configs).

`XOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/xopt`, else `~/.cache/xopt`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def cache_dir() -> Path:
    """The folder of xopt's per-machine caches (not created here)."""
    configured = os.environ.get("XOPT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xopt"


def drop_least_recent(paths: Iterable[Path], keep: int) -> None:
    """Delete all but the `keep` most recently modified of `paths` (files, or folders with what is in them)."""
    for path in sorted(paths, key=lambda path: path.stat().st_mtime_ns, reverse=True)[keep:]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
