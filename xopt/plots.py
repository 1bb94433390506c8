"""matplotlib for the `--plot` options, loaded only when a plot is asked for (the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from xopt.errors import XoptError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XoptError("--plot needs matplotlib: pip install 'xopt[bench]'") from None
    return plt


def check_plot_path(path: Path) -> None:
    """Refuse, before any work, a plot path matplotlib cannot write: its suffix names the format."""
    pyplot()
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise XoptError(f"--plot {path}: name the file with an image suffix ({', '.join(sorted(formats))})")
    if path.is_dir():
        raise XoptError(f"--plot {path}: is a folder")
