// Host-side launchers of the CUDA kernels (vqt_ops_cuda.cu), for float and double. Plain CUDA
// runtime types only, so that the kernels compile without torch; the torch binding
// (vqt_ops_cuda_binding.cpp) checks the tensors, allocates the outputs and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "vqt_ops_common.h"

namespace vqt {
namespace gpu {

// Bytes of dynamic shared memory a block may use without opting in.
constexpr size_t kMaxSharedBytes = 48 * 1024;
// Threads per block of every kernel (a multiple of the warp size).
constexpr int kThreads = 128;

// Dynamic shared memory of one attention block: the query, the value accumulator and one weight per thread.
inline size_t attention_shared_bytes(const Heads& L) { return (L.hd + L.hdv + kThreads) * sizeof(double); }

// One block per (row, head). Outputs U (m, H, hdv), Z and M (m, H).
template <typename T>
cudaError_t attention_rows(const RowsInputs<T>& in, int64_t m, T* U, T* Z, T* M, cudaStream_t stream);

// One block per (row, head). refresh_heads (m, H): the cancellation flag of each head (the caller ORs them).
template <typename T>
cudaError_t attention_delta(const DeltaInputs<T>& in, int64_t m, T* U, T* Z, T* M, bool* refresh_heads,
                            cudaStream_t stream);

// One block per (row, group). e2max: scratch for G doubles (max_k |e_k|^2 of each group).
template <typename T>
cudaError_t requantize(const RequantizeInputs<T>& in, int64_t m, double* e2max, int64_t* codes, T* radius,
                       bool* searched, cudaStream_t stream);

// One block per row: out (m, d) = sum_g table[g, codes[i, g]].
template <typename T>
cudaError_t lookup(const T* table, const int64_t* codes, int64_t m, int64_t G, int64_t K, int64_t d, T* out,
                   cudaStream_t stream);

}  // namespace gpu
}  // namespace vqt
