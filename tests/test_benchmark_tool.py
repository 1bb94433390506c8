"""Smoke run of tools/benchmark.py (few iterations, MiniLM only): it writes a table and a plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_tool_quick_run_writes_results(tmp_path):
    script = ROOT / "tools" / "benchmark.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--models", "minilm", "--output", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    markdown = (tmp_path / "RESULTS.md").read_text()
    for variant in (
        "PyTorch eager",
        "plain ORT",
        "ORT transformers optimizer",
        "onnxscript ORT fusions",
        "ORT quantize_dynamic int8",
        "xopt exact",
        "xopt int8",
    ):
        assert variant in markdown
    assert "## MiniLM 1×128" in markdown and "## MiniLM 8×128" in markdown
    assert (tmp_path / "RESULTS.png").read_bytes()[:4] == b"\x89PNG"


def test_run_length_reads_in_whole_minutes_at_least_one():
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import run_length

    assert run_length(20) == run_length(89) == "The run took 1 minute."
    assert run_length(91) == "The run took 2 minutes." and run_length(1500) == "The run took 25 minutes."
