// CUDA's message for an error code a launcher returned, for the Python bindings.
#include <cuda_runtime.h>

extern "C" const char* xopt_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
