"""The built wheel installs xopt with passes/ and backends/ as xopt.passes and xopt.backends."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_core_passes_and_backends(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("xopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "xopt/__init__.py",
        "xopt/cli.py",
        "xopt/pipeline.py",
        "xopt/capture/__init__.py",
        "xopt/analysis/structure.py",
        "xopt/passes/__init__.py",
        "xopt/passes/cleanup.py",
        "xopt/backends/__init__.py",
        "xopt/backends/onnxruntime.py",
        "xopt/backends/cuda/executor.py",
        "xopt/backends/cuda/kernels/common.cuh",
        "xopt/backends/cuda/kernels/decode_attention.cu",
    ):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "xopt = xopt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
