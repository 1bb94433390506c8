"""Compiling xopt's CUDA kernels with nvcc: one shared library per source set, GPU architecture and nvcc.

The kernels are CUDA C++ sources beside this file (`kernels/*.cu`, with `extern "C"` launchers).
`shared_library(arch)` builds them into one `.so` under the xopt cache, named by a hash of the
sources, the architecture and nvcc's version, so a library is built once per machine and a changed
kernel is rebuilt; it is written to a temporary name and renamed, so no half-built library is ever
loaded. `compile_check(arch)` compiles each source alone to an object, which CI runs without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from xopt.cache import cache_dir
from xopt.errors import XoptError

KERNEL_FOLDER = Path(__file__).with_name("kernels")
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC"]
DEFAULT_ARCH = "sm_90"  # Hopper, the lent GPUs; the build itself checks any architecture nvcc knows


def kernel_sources() -> list[Path]:
    """Every CUDA source, in name order."""
    return sorted(KERNEL_FOLDER.glob("*.cu"))


def find_nvcc() -> Path:
    """nvcc on PATH, else under $CUDA_HOME; a one-line error when there is none."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    if candidate.is_file():
        return candidate
    raise XoptError("the CUDA backend needs nvcc (the CUDA toolkit): not on PATH nor under $CUDA_HOME")


def nvcc_version(nvcc: Path) -> str:
    return subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def shared_library(arch: str = DEFAULT_ARCH) -> Path:
    """The kernels built for `arch` (e.g. "sm_90") as one shared library, from the cache when built before."""
    nvcc = find_nvcc()
    sources = kernel_sources()
    digest = hashlib.sha256()
    for path in [*sources, *KERNEL_FOLDER.glob("*.cuh")]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{arch} {NVCC_FLAGS} {nvcc_version(nvcc)}".encode())
    target = cache_dir() / "cuda" / f"libxopt_kernels-{arch}-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        _nvcc([str(nvcc), *NVCC_FLAGS, f"-arch={arch}", "-shared", "-o", str(built), *map(str, sources)], "library")
        os.replace(built, target)
    return target


def compile_check(arch: str = DEFAULT_ARCH) -> list[str]:
    """Compile every source alone for `arch`; the names compiled. Needs nvcc, not a GPU."""
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as scratch:
        for source in kernel_sources():
            obj = Path(scratch) / f"{source.stem}.o"
            _nvcc([str(nvcc), *NVCC_FLAGS, f"-arch={arch}", "-c", str(source), "-o", str(obj)], source.name)
    return [source.name for source in kernel_sources()]


def _nvcc(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise XoptError(f"nvcc could not compile {what}: {errors[0].strip() if errors else 'no message'}")
