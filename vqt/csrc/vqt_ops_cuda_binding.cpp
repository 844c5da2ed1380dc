// Torch binding of the CUDA backend: checks the tensors, allocates the outputs and launches the
// kernels of vqt_ops_cuda.cu on the current stream. Built only when torch.cuda.is_available().

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <tuple>

#include "vqt_ops_cuda.h"
#include "vqt_ops_torch.h"

#define VQT_CHECK_CUDA(x) \
  TORCH_CHECK((x).is_cuda(), "the cuda backend needs CUDA tensors, got " #x " on ", (x).device())
#define VQT_CHECK_LAUNCH(call)                                                              \
  do {                                                                                      \
    const cudaError_t err_ = (call);                                                        \
    TORCH_CHECK(err_ == cudaSuccess, "vqt CUDA kernel failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace vqt {
namespace {

using torch::Tensor;

// Grid limits: rows go on the x axis (< 2^31), heads or groups on the y axis (< 2^16).
void check_grid(int64_t rows, int64_t cols, size_t shared_bytes) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() && cols < 65536, "too many rows (", rows,
              ") or heads/groups (", cols, ") for one CUDA launch");
  TORCH_CHECK(shared_bytes <= gpu::kMaxSharedBytes, "vectors too wide for the CUDA kernels' shared memory (",
              shared_bytes, " bytes)");
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<Tensor, Tensor, Tensor> attention_rows(const Tensor& q, const Tensor& pos_q, const Tensor& k,
                                                  const Tensor& v, const Tensor& pos_k, std::optional<double> window,
                                                  double scale, const std::optional<Tensor>& sink_s,
                                                  const std::optional<Tensor>& sink_v) {
  VQT_CHECK_CUDA(q);
  const Heads L = check_attention_rows(q, pos_q, k, v, pos_k);
  check_sink(sink_s, sink_v, q.size(0), L, q.scalar_type(), q.device());
  check_grid(q.size(0), L.H, gpu::attention_shared_bytes(L));
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor U, Z, M;
  std::tie(U, Z, M) = empty_accumulators(q, L);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vqt_attention_rows_cuda", [&] {
    using T = scalar_t;
    VQT_CHECK_LAUNCH(gpu::attention_rows(rows_inputs<T>(q, pos_q, k, v, pos_k, L, window, scale, sink_s, sink_v), q.size(0),
                                         U.data_ptr<T>(), Z.data_ptr<T>(), M.data_ptr<T>(), stream()));
  });
  return {U, Z, M};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_delta(const Tensor& q, const Tensor& pos_q_old,
                                                           const Tensor& pos_q, const Tensor& U, const Tensor& Z,
                                                           const Tensor& M, const Tensor& k_rem, const Tensor& v_rem,
                                                           const Tensor& pos_rem, const Tensor& k_add,
                                                           const Tensor& v_add, const Tensor& pos_add,
                                                           std::optional<double> window, double scale, double tau) {
  VQT_CHECK_CUDA(q);
  const Heads L = check_attention_delta(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add);
  check_grid(q.size(0), L.H, gpu::attention_shared_bytes(L));
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor U2, Z2, M2;
  std::tie(U2, Z2, M2) = empty_accumulators(q, L);
  Tensor refresh_heads = at::empty({q.size(0), L.H}, q.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vqt_attention_delta_cuda", [&] {
    using T = scalar_t;
    const auto in = delta_inputs<T>(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add, L,
                                    window, scale, tau);
    VQT_CHECK_LAUNCH(gpu::attention_delta(in, q.size(0), U2.data_ptr<T>(), Z2.data_ptr<T>(), M2.data_ptr<T>(),
                                          refresh_heads.data_ptr<bool>(), stream()));
  });
  return {U2, Z2, M2, refresh_heads.any(-1)};
}

std::tuple<Tensor, Tensor, Tensor> requantize(const Tensor& a, const Tensor& codebook, const Tensor& codes,
                                              const Tensor& a_old, const Tensor& radius) {
  VQT_CHECK_CUDA(a);
  check_requantize(a, codebook, codes, a_old, radius);
  check_grid(a.size(0), a.size(1), a.size(2) * sizeof(double));
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor codes2 = at::empty_like(codes), radius2 = at::empty_like(radius);
  Tensor searched = at::empty(codes.sizes(), codes.options().dtype(torch::kBool));
  Tensor e2max = at::empty({a.size(1)}, a.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "vqt_requantize_cuda", [&] {
    using T = scalar_t;
    VQT_CHECK_LAUNCH(gpu::requantize(requantize_inputs<T>(a, codebook, codes, a_old, radius), a.size(0),
                                     e2max.data_ptr<double>(), codes2.data_ptr<int64_t>(), radius2.data_ptr<T>(),
                                     searched.data_ptr<bool>(), stream()));
  });
  return {codes2, radius2, searched};
}

Tensor lookup(const Tensor& table, const Tensor& codes) {
  VQT_CHECK_CUDA(table);
  check_lookup(table, codes);
  check_grid(codes.size(0), 1, 0);
  const c10::cuda::CUDAGuard guard(table.device());
  Tensor out = at::empty({codes.size(0), table.size(2)}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "vqt_lookup_cuda", [&] {
    using T = scalar_t;
    VQT_CHECK_LAUNCH(gpu::lookup(table.data_ptr<T>(), codes.data_ptr<int64_t>(), codes.size(0), table.size(0),
                                 table.size(1), table.size(2), out.data_ptr<T>(), stream()));
  });
  return out;
}

}  // namespace
}  // namespace vqt

VQT_DEFINE_MODULE("vqt fused CUDA operators (semantics: vqt/ops/reference.py)")
