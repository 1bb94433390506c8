"""Progress of the long loops inside a pass (fuse timing each family, quantize computing each
linear's form), shown by whoever runs the pass and asked for it.

Library code wraps such a loop in `progress(items, …)`; with no display installed (the Python
API, tests) that returns `items` unchanged. The CLI installs a display with `showing_progress`
for the length of a run: a bar on a terminal under the bar of the passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

Item = TypeVar("Item")
# (items, total, unit, description) → the items, iterated with a display
Display = Callable[[Iterable, int, str, str], Iterable]

_DISPLAY: ContextVar[Display | None] = ContextVar("xopt_progress_display", default=None)


def progress(items: Iterable[Item], *, unit: str, description: str) -> Iterable[Item]:
    """`items`, shown as they go by the display installed (none: `items` itself)."""
    display = _DISPLAY.get()
    if display is None:
        return items
    items = list(items)
    return display(items, len(items), unit, description)


@contextlib.contextmanager
def showing_progress(display: Display) -> Iterator[None]:
    """Install `display` for the loops that `progress` wraps within this block."""
    token = _DISPLAY.set(display)
    try:
        yield
    finally:
        _DISPLAY.reset(token)
