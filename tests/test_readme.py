"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_demo_then_tests():
    demo, tests = _setup_commands()
    assert demo.rstrip().endswith("xopt demo") and "pip install torch==2.13.0" in demo
    assert tests.rstrip().endswith("python -m pytest") and "pip install torch==2.13.0" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _setup_commands()
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()
