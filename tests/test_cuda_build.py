"""The CUDA kernels compile with nvcc (no GPU needed), and the library exports what the bindings call."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from xopt.backends.cuda import build
from xopt.backends.cuda.kernels import SIGNATURES
from xopt.errors import XoptError

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")


@needs_nvcc
def test_every_kernel_source_compiles_for_hopper():
    compiled = build.compile_check("sm_90")
    assert set(compiled) == {path.name for path in build.kernel_sources()}
    assert {
        "norm_residual.cu",
        "activations.cu",
        "rope.cu",
        "nbits_gemv.cu",
        "decode_attention.cu",
        "packed_attention.cu",
    } <= set(compiled)


@needs_nvcc
def test_the_library_exports_every_launcher_the_bindings_call(tmp_path, monkeypatch):
    monkeypatch.setenv("XOPT_CACHE_DIR", str(tmp_path))
    path = build.shared_library("sm_90")
    assert path.parent == tmp_path / "cuda" and build.shared_library("sm_90") == path  # built once, then cached
    library = ctypes.CDLL(str(path))
    for name in [*SIGNATURES, "xopt_error_string"]:
        assert hasattr(library, name), name
    assert list((tmp_path / "cuda").iterdir()) == [path]  # no scratch left behind


@needs_nvcc
def test_a_kernel_that_does_not_compile_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text("__global__ void broken() { undefined_call(); }\n")
    monkeypatch.setattr(build, "KERNEL_FOLDER", tmp_path)
    with pytest.raises(XoptError, match=r"nvcc could not compile broken\.cu: .*undefined"):
        build.compile_check("sm_90")


def test_without_nvcc_the_error_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(XoptError, match="needs nvcc"):
        build.find_nvcc()
