// Instantiates the sm_80 linear_forward / linear_grad_input kernels for float (block sizes 16, 32, 64, 128).
// One dtype and op family per file keeps each nvcc job small and lets the build run in parallel.
#include "bsmm_sm80.cuh"

namespace set_kernels {
namespace bsmm {
template void launch_linear_sm80<float>(const LinearParams&, int, bool, cudaStream_t);
}  // namespace bsmm
}  // namespace set_kernels
