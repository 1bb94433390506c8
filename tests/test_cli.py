"""The `xopt` command: the contract of each subcommand, and every bad-input case.

Bad input must give one line on stderr and exit 2, write nothing and leave the input as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys

import onnx_ir as ir
import pytest
from helpers import LINEAR_MODEL, REDUNDANT_MODEL, model_from_text

from xopt.cli import EXIT_USER_ERROR, main

UNRUNNABLE_MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
unrunnable (float[N, S] x) => (float[3] y) {
    shape = Constant <value = int64[1] {3}> ()
    y = Reshape (x, shape)
}
"""


def _digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


@pytest.fixture
def redundant_onnx(tmp_path):
    path = tmp_path / "redundant.onnx"
    ir.save(model_from_text(REDUNDANT_MODEL), path)
    return path


def test_optimize_writes_model_report_and_explains(redundant_onnx, tmp_path, capsys):
    before = _digest(redundant_onnx)
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", str(redundant_onnx), "-o", str(output), "--report", str(report), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "12→2" in out and "nodes_removed: 10" in out
    data = json.loads(report.read_text())
    assert data["input"]["nodes"] == 12 and data["output"]["nodes"] == 2
    assert stat.S_IMODE(report.stat().st_mode) == stat.S_IMODE(output.stat().st_mode)  # as open() makes files
    assert data["passes"][0]["parity"]["max_abs"] == 0.0
    assert list(data["seconds"]) == ["capture", "reference outputs", "save"]
    assert "time s: capture" in out and "in all" in out
    assert [n.op_type for n in ir.load(output).graph] == ["Mul", "Add"]
    assert _digest(redundant_onnx) == before


def test_optimize_hugging_face_folder_to_folder(tiny_folder, tmp_path, capsys):
    output, report = tmp_path / "out", tmp_path / "report.json"
    command = ["optimize", str(tiny_folder("llama")), "-o", str(output), "--passes", "cleanup(iterations=1)"]
    assert main([*command, "--report", str(report)]) == 0
    assert {"model.onnx", "config.json"} <= {p.name for p in output.iterdir()}
    assert "max abs diff" in capsys.readouterr().out
    parity = json.loads(report.read_text())["passes"][0]["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["top1_agreed"] == parity["top1_positions"] > 0


def test_explain_ends_with_the_structure_found_in_the_input(tiny_folder, tmp_path, capsys):
    """The fused output hides the blocks; the structure --explain reports is the input's."""
    command = ["optimize", str(tiny_folder("llama")), "-o", str(tmp_path / "out"), "--no-verify", "--explain"]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "fuse: changed the model" in out
    assert re.search(r"^input structure: 2 blocks found$", out, re.MULTILINE), out


def test_optimize_shows_the_long_loops_inside_passes(tiny_folder, tmp_path, monkeypatch):
    """The CLI gives fuse's family timings and quantize's linears a display of their own."""
    shown = []

    def recording(items, total, unit, description):
        shown.append((description, unit, total))
        return items

    monkeypatch.setattr("xopt.cli._iterate", recording)
    passes = "cleanup,fuse,quantize(method=rtn,accuracy=0)"
    command = ["optimize", str(tiny_folder("llama")), "-o", str(tmp_path / "out"), "--passes", passes]
    assert main([*command, "--no-verify"]) == 0
    descriptions = {description for description, _, _ in shown}
    assert descriptions == {"fuse", "quantize"}, shown
    assert all(total > 0 for _, _, total in shown)


def test_a_lossy_optimize_prints_and_writes_its_cost_in_quality(tiny_folder, tmp_path, capsys):
    output, report = tmp_path / "out", tmp_path / "report.json"
    passes = "cleanup,quantize(method=rtn,accuracy=0)"
    command = ["optimize", str(tiny_folder("llama")), "-o", str(output), "--passes", passes, "--report", str(report)]
    assert main(command) == 0
    quality = json.loads(report.read_text())["quality"]
    assert quality["task"] == "causal-lm" and quality["windows"] == 4 and quality["kl"] >= 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("quality on 4 windows"))
    assert f"perplexity {quality['reference_perplexity']:.2f} → {quality['perplexity']:.2f}" in line


def test_inspect_json_has_the_contract_keys(tiny_folder, capsys):
    assert main(["inspect", str(tiny_folder("qwen2")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("num_blocks", "hidden_size", "num_heads", "num_kv_heads", "norm", "norm_position", "params", "ops"):
        assert key in summary
    assert (summary["num_blocks"], summary["num_heads"], summary["num_kv_heads"]) == (3, 4, 2)


def test_inspect_reads_the_structure_after_cleanup(tiny_folder, capsys):
    # Gemma-2's captured norms scale by 1 + γ computed in the graph and cast back with CastLike
    assert main(["inspect", str(tiny_folder("gemma2")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["norm"], summary["norm_position"], summary["intermediate_size"]) == ("RMSNorm", "pre", 80), summary
    assert summary["output_norms"] and summary["final_norm"] and not summary["embedding_norm"]


def test_inspect_table(tiny_folder, capsys):
    assert main(["inspect", str(tiny_folder("bert"))]) == 0
    out = capsys.readouterr().out
    assert "norm_position      post" in out and "block 1" in out


def test_inspect_and_blocks_say_when_fused_operators_hide_the_structure(tiny_folder, tmp_path, capsys):
    output = tmp_path / "out"
    fused = "cleanup,fuse(lowering=all)"
    assert main(["optimize", str(tiny_folder("llama")), "-o", str(output), "--passes", fused]) == 0
    capsys.readouterr()
    assert main(["inspect", str(output), "--json"]) == 0
    assert "the structure below may be partial" in json.loads(capsys.readouterr().out)["note"]
    assert main(["blocks", str(output)]) == 2  # no blocks to score: one line, not a traceback
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert re.search(r"the graph has [\w, ]+ nodes \(fused or quantized\): score the blocks", line), line
    assert main(["inspect", str(tiny_folder("llama")), "--json"]) == 0
    assert "note" not in json.loads(capsys.readouterr().out)


def test_passes_lists_every_pass_and_recipe(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "exact" in out and "iterations: int = 2" in out and "recipe exact" in out


def test_calibration_text_reaches_the_passes_that_calibrate(tiny_folder, tmp_path, capsys):
    """`--calibration` is what GPTQ reads: a text shorter than one window is refused by name."""
    short = tmp_path / "short.txt"
    short.write_text("It was a bright cold day in April. " * 20)
    out = tmp_path / "out"
    argv = ["optimize", str(tiny_folder("llama")), "-o", str(out), "--passes", "quantize", "--calibration", str(short)]
    assert main(argv) == EXIT_USER_ERROR
    assert "calibration text has" in capsys.readouterr().err and not out.exists()


def _bad_inputs(tmp_path, redundant_onnx):
    text = tmp_path / "notes.onnx"
    text.write_text("these are notes, not a model\n" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(redundant_onnx.read_bytes()[:-40])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\xff\xff\xff" + redundant_onnx.read_bytes()[5:])
    empty_folder = tmp_path / "no-config"
    empty_folder.mkdir()
    (empty_folder / "weights.bin").write_bytes(b"0")
    linear = tmp_path / "linear.onnx"
    ir.save(model_from_text(LINEAR_MODEL), linear)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    configs = {"bad-json": "{not json", "json-list": "[]"}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
    pt2 = tmp_path / "broken.pt2"
    pt2.write_text("not a zip archive")
    unrunnable = tmp_path / "unrunnable.onnx"  # fails inside ONNX Runtime's run: [B, S] to [3]
    ir.save(model_from_text(UNRUNNABLE_MODEL), unrunnable)
    good, out = str(redundant_onnx), str(tmp_path / "out.onnx")
    return {
        "missing file": (["optimize", str(tmp_path / "absent.onnx"), "-o", out], "no such file"),
        "not a model": (["optimize", str(text), "-o", out], "not a readable ONNX model"),
        "truncated onnx": (["optimize", str(truncated), "-o", out], "not a readable ONNX model"),
        "corrupt onnx": (["optimize", str(corrupt), "-o", out], "ONNX model"),
        "folder without config.json": (["optimize", str(empty_folder), "-o", out], "no config.json"),
        "unknown pass": (["optimize", good, "-o", out, "--passes", "cleanup,fold-everything"], "unknown pass"),
        "unknown option": (["optimize", good, "-o", out, "--passes", "cleanup(speed=11)"], "has no option 'speed'"),
        "bad option value": (["optimize", good, "-o", out, "--passes", "cleanup(iterations=two)"], "not a valid int"),
        "unknown recipe": (["optimize", good, "-o", out, "--recipe", "magic"], "unknown recipe"),
        "recipe and passes": (["optimize", good, "-o", out, "--recipe", "exact", "--passes", "cleanup"], "not both"),
        "unwritable output": (["optimize", good, "-o", "/proc/xopt-out.onnx"], "cannot write"),
        "output folder missing": (["optimize", good, "-o", str(tmp_path / "a" / "b.onnx")], "does not exist"),
        "output equal to input": (["optimize", good, "-o", good], "output is the input"),
        "onnx name as a folder": (["optimize", good, "-o", out + "/"], "drop the slash"),
        "missing calibration": (["optimize", good, "-o", out, "--calibration", str(tmp_path / "x.txt")], "calibration"),
        "inspect missing": (["inspect", str(tmp_path / "absent.onnx")], "no such file"),
        "quantize bits": (["optimize", good, "-o", out, "--passes", "quantize(bits=3)"], "bits=3"),
        "nothing to quantize": (["optimize", good, "-o", out, "--passes", "quantize"], "no MatMul with a constant"),
        "gptq without tokenizer": (["optimize", str(linear), "-o", out, "--passes", "quantize"], "no tokenizer"),
        "output under a file": (["optimize", good, "-o", str(text / "x.onnx")], "is a file, not a folder"),
        "option twice": (["optimize", good, "-o", out, "--passes", "cleanup(iterations=1,iterations=1)"], "twice"),
        "empty recipe": (["optimize", good, "-o", out, "--recipe", ""], "unknown recipe ''"),
        "cleanup iterations": (["optimize", good, "-o", out, "--passes", "cleanup(iterations=0)"], "at least 1"),
        "report is the input": (["optimize", good, "-o", out, "--report", good], "would overwrite the input"),
        "report is the output": (["optimize", good, "-o", out, "--report", out], "would overwrite the output"),
        "report is a folder": (["optimize", good, "-o", out, "--report", str(empty_folder)], "is a folder"),
        "unsupported file": (["inspect", str(weights)], "xopt reads .onnx and .pt2 files"),
        "config not json": (["inspect", str(tmp_path / "bad-json")], "not a readable JSON config"),
        "config not an object": (["inspect", str(tmp_path / "json-list")], "not a model config"),
        "broken pt2": (["inspect", str(pt2)], "not a readable torch.export program"),
        "bench threads": (["bench", good, "--threads", "0"], "--threads 0"),
        "bench plot suffix": (["bench", good, "--plot", str(tmp_path / "plot.txt")], "image suffix"),
        "bench out of range": (["bench", good, "--batch", "4000000000", "--no-memory"], "the run failed"),
        "bench run error": (["bench", str(unrunnable), "--no-memory"], "cannot be reshaped"),
        "optimize run error": (["optimize", str(unrunnable), "-o", out], "the input model fails on xopt's sample"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "not a model",
        "truncated onnx",
        "corrupt onnx",
        "folder without config.json",
        "unknown pass",
        "unknown option",
        "bad option value",
        "unknown recipe",
        "recipe and passes",
        "unwritable output",
        "output folder missing",
        "output equal to input",
        "onnx name as a folder",
        "missing calibration",
        "inspect missing",
        "quantize bits",
        "nothing to quantize",
        "gptq without tokenizer",
        "output under a file",
        "option twice",
        "empty recipe",
        "cleanup iterations",
        "report is the input",
        "report is the output",
        "report is a folder",
        "unsupported file",
        "config not json",
        "config not an object",
        "broken pt2",
        "bench threads",
        "bench plot suffix",
        "bench out of range",
        "bench run error",
        "optimize run error",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, redundant_onnx, capfd):
    argv, message = _bad_inputs(tmp_path, redundant_onnx)[case]
    listing_before = sorted(p.name for p in tmp_path.iterdir())
    digest_before = _digest(redundant_onnx)
    assert main(argv) == EXIT_USER_ERROR
    captured = capfd.readouterr()  # file descriptors: ONNX Runtime's logger writes there
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("xopt: error:") and message in errors[0], captured.err

    assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing_before
    assert _digest(redundant_onnx) == digest_before


def test_an_output_folder_holding_the_input_is_refused(tmp_path, redundant_onnx, capsys):
    holder = tmp_path / "holder"
    holder.mkdir()
    source = holder / "in.onnx"
    shutil.copy(redundant_onnx, source)
    assert main(["optimize", str(source), "-o", str(holder)]) == EXIT_USER_ERROR
    assert "the input lies inside this output folder" in capsys.readouterr().err
    assert sorted(p.name for p in holder.iterdir()) == ["in.onnx"] and _digest(source) == _digest(redundant_onnx)


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    executable = shutil.which("xopt") or pytest.fail("the xopt console script is not installed")
    result = subprocess.run(
        [executable, "optimize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"xopt: error: {tmp_path / 'absent.onnx'}: no such file or folder"]


def test_module_entry_point_lists_passes():
    result = subprocess.run([sys.executable, "-m", "xopt.cli", "passes"], capture_output=True, text=True, check=True)
    assert "cleanup" in result.stdout


def test_demo_refuses_an_output_it_could_not_write_before_any_work(tmp_path, monkeypatch, capsys):
    """A file, a missing parent, or a `model` folder holding something else: one line, exit 2, and
    the model is not even captured."""
    import xopt

    monkeypatch.setattr(xopt, "load", lambda *args, **kwargs: pytest.fail("captured before the output was checked"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "taken" / "model").mkdir(parents=True)
    (tmp_path / "taken" / "model" / "notes.txt").write_text("mine")
    refusals = {
        "a-file": "exists and is not a folder",
        "missing/demo": "does not exist",
        "taken": "holds no model.onnx",
    }
    for name, reason in refusals.items():
        assert main(["demo", "--output", str(tmp_path / name)]) == EXIT_USER_ERROR
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert reason in line, line
    assert (tmp_path / "taken" / "model" / "notes.txt").read_text() == "mine"


def test_optimize_refuses_an_output_it_could_not_write_before_any_work(tmp_path, redundant_onnx, monkeypatch, capsys):
    """A folder holding something else, or a name ending like another kind of file: one line, exit
    2, before the model is captured (`save` would refuse them only after every pass ran)."""
    import xopt

    monkeypatch.setattr(xopt, "load", lambda *args, **kwargs: pytest.fail("captured before the output was checked"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    refusals = {"taken": "holds no model.onnx", "out.pt": "names a .pt file"}
    for name, reason in refusals.items():
        assert main(["optimize", str(redundant_onnx), "-o", str(tmp_path / name)]) == EXIT_USER_ERROR
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert reason in line, line
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "out.pt").exists()


def test_verbose_is_taken_before_or_after_the_command(capsys):
    from xopt.cli import _parser

    parser = _parser()
    assert parser.parse_args(["-v", "passes"]).verbose and parser.parse_args(["passes", "-v"]).verbose
    assert not parser.parse_args(["passes"]).verbose
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("xopt ")


def test_verbose_logs_xopt_steps_not_the_libraries(tmp_path, redundant_onnx):
    """-v is for xopt's own steps: the libraries under it (onnx-ir logs each node it removes, with a
    stack dump) stay at warnings, or xopt's lines drown."""
    executable = shutil.which("xopt") or pytest.fail("the xopt console script is not installed")
    result = subprocess.run(
        [executable, "-v", "optimize", str(redundant_onnx), "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(line.startswith("xopt.pipeline: cleanup:") for line in lines), result.stderr
    assert all(line.startswith("xopt") for line in lines), result.stderr
