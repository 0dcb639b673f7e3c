// Instantiates the sm_80 linear_grad_weight kernels (and the split-K reduction) for __nv_bfloat16
// (block sizes 16, 32, 64, 128).
#include "bsmm_sm80.cuh"

namespace set_kernels {
namespace bsmm {
template void launch_grad_weight_sm80<__nv_bfloat16>(const GradWeightParams&, int, cudaStream_t);
}  // namespace bsmm
}  // namespace set_kernels
