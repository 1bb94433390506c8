"""Smoke run of tools/benchmark_cuda.py on the CPU (tiny configs): every variant runs, generates the
same greedy tokens as ONNX Runtime, and the report is written — so a GPU session spends its few
minutes measuring, not debugging the tool."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_cuda_smoke_run_on_the_cpu(tmp_path):
    report = tmp_path / "CUDA.md"
    command = [sys.executable, str(ROOT / "tools" / "benchmark_cuda.py"), "--device", "cpu", "--tiny", "--no-compile"]
    options = ["--repeats", "1", "--rounds", "2", "--prompt", "8", "--new-tokens", "6", "--output", str(report)]
    subprocess.run([*command, *options], check=True, capture_output=True)
    markdown = report.read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| xopt executor, ")]
    assert len(rows) == 6 and all(row.endswith("| 6/6 |") for row in rows), rows
    assert "| PyTorch eager (transformers generate), fp32 |" in markdown
    unpadded, padded = (float(x) for x in re.findall(r"unpadded ([0-9.e+-]+), padded ([0-9.e+-]+)", markdown)[0])
    assert unpadded < 1e-4 and padded < 1e-4
