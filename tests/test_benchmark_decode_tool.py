"""tools/benchmark_decode.py's timing loop: each pair of variants is timed in both load orders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark_decode", ROOT / "tools" / "benchmark_decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_variants_are_loaded_again_in_reverse_order_for_the_second_half_of_the_rounds(monkeypatch):
    events = []
    tool = _tool()
    monkeypatch.setattr(tool, "settle", lambda: events.append(("settle", None)))

    def loader(label):
        def load():
            events.append(("load", label))
            calls = iter(range(100))

            def generate():
                call = next(calls)
                events.append(("run", label))
                return [call], 10.0 + call, 100.0 + call  # tokens, prefill ms, decode tokens/s

            return generate

        return load

    samples = tool.run({label: loader(label) for label in "ABC"}, repeats=3)
    loads = [label for kind, label in events if kind == "load"]
    runs = [label for kind, label in events if kind == "run"]
    assert loads == ["A", "B", "C", "C", "B", "A"]
    assert runs == [*"ABC" * 3, *"CBA" * 2]  # each half opens with a warm-up round
    kinds = [kind for kind, _ in events if kind != "load"]
    assert kinds == ["settle", "run"] * len(runs)  # no generation starts on the last one's spinning threads
    # Warm-up generations (call 0 of each load) are not samples: rounds 1, 2 of the first load, 1 of the second.
    assert all(s.tokens_per_s == [101.0, 102.0, 101.0] and s.prefill_ms == [11.0, 12.0, 11.0] for s in samples.values())
