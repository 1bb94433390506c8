"""xopt's CUDA backend: the optimized graph run on a GPU with xopt's own fused kernels.

- `kernels/*.cu`: CUDA C++ kernels (norm + residual, bias + GELU, SwiGLU, RoPE, 4/8-bit
  dequant GEMV on the MatMulNBits layout, split-KV decode attention, padding-free packed
  encoder attention), built by nvcc into one shared library (`build.py`);
- `kernels.py`: those kernels as functions on torch CUDA tensors;
- `executor.py`: `GraphExecutor`, which runs an optimized model op by op, fused operators on the
  kernels, large matrix products on cuBLAS through torch.
"""

from xopt.backends.cuda.executor import GraphExecutor

__all__ = ["GraphExecutor"]
