// Launchers of the CUDA kernels (vqt_ops_cuda_kernels.cuh), instantiated for float and double.
// Includes only CUDA headers: `nvcc -c vqt_ops_cuda.cu` compiles it without torch or a GPU.

#include <cuda_runtime.h>

#include "vqt_ops_cuda.h"
#include "vqt_ops_cuda_kernels.cuh"

namespace vqt {
namespace gpu {

template <typename T>
cudaError_t attention_rows(const RowsInputs<T>& in, int64_t m, T* U, T* Z, T* M, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(in.L.H));
  attention_rows_kernel<T><<<grid, kThreads, attention_shared_bytes(in.L), stream>>>(in, U, Z, M);
  return cudaGetLastError();
}

template <typename T>
cudaError_t attention_delta(const DeltaInputs<T>& in, int64_t m, T* U, T* Z, T* M, bool* refresh_heads,
                            cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(in.L.H));
  attention_delta_kernel<T><<<grid, kThreads, attention_shared_bytes(in.L), stream>>>(in, U, Z, M, refresh_heads);
  return cudaGetLastError();
}

template <typename T>
cudaError_t requantize(const RequantizeInputs<T>& in, int64_t m, double* e2max, int64_t* codes, T* radius,
                       bool* searched, cudaStream_t stream) {
  if (m == 0 || in.G == 0) return cudaSuccess;
  codebook_norm_kernel<T><<<static_cast<unsigned>(in.G), kThreads, 0, stream>>>(in.codebook, in.K, in.gd, e2max);
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(in.G));
  requantize_kernel<T><<<grid, kThreads, in.gd * sizeof(double), stream>>>(in, e2max, codes, radius, searched);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lookup(const T* table, const int64_t* codes, int64_t m, int64_t G, int64_t K, int64_t d, T* out,
                   cudaStream_t stream) {
  if (m == 0 || d == 0) return cudaSuccess;
  lookup_kernel<T><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(table, codes, G, K, d, out);
  return cudaGetLastError();
}

#define VQT_INSTANTIATE(T)                                                                                          \
  template cudaError_t attention_rows<T>(const RowsInputs<T>&, int64_t, T*, T*, T*, cudaStream_t);                 \
  template cudaError_t attention_delta<T>(const DeltaInputs<T>&, int64_t, T*, T*, T*, bool*, cudaStream_t);        \
  template cudaError_t requantize<T>(const RequantizeInputs<T>&, int64_t, double*, int64_t*, T*, bool*,            \
                                     cudaStream_t);                                                                \
  template cudaError_t lookup<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, T*, cudaStream_t);

VQT_INSTANTIATE(float)
VQT_INSTANTIATE(double)

}  // namespace gpu
}  // namespace vqt
