// Instantiates the sm_80 linear_grad_weight kernels (and the split-K reduction) for __half
// (block sizes 16, 32, 64, 128).
#include "bsmm_sm80.cuh"

namespace set_kernels {
namespace bsmm {
template void launch_grad_weight_sm80<__half>(const GradWeightParams&, int, cudaStream_t);
}  // namespace bsmm
}  // namespace set_kernels
