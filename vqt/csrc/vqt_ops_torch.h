// Torch-side code shared by the CPU and CUDA bindings: boundary checks (dtype, device, contiguity,
// shapes), so the kernels can assume dense, consistent inputs, and the packing of tensors into the
// plain input structs of vqt_ops_common.h.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <utility>

#include "vqt_ops_common.h"

// A dense tensor of rank n and dtype dt on device dev; the message names the argument.
#define VQT_CHECK_TENSOR(x, n, dt, dev) ::vqt::check_tensor((x), #x, (n), (dt), (dev))
#define VQT_CHECK_SIZE(x, d, n) \
  TORCH_CHECK((x).size(d) == (n), #x ".size(" #d ") must be ", (n), ", got shape ", (x).sizes())

// The Python module of a backend: the four operators, defined in the including file's vqt namespace,
// then any further definitions the backend adds (statements using the module `m`).
#define VQT_DEFINE_MODULE(docstring, ...)                                                      \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                                   \
    m.doc() = docstring;                                                                       \
    m.def("attention_rows", &vqt::attention_rows, "full attention rows as (U, Z, M)");          \
    m.def("attention_delta", &vqt::attention_delta, "exact update for removed and added keys"); \
    m.def("requantize", &vqt::requantize, "re-quantization with the certified skip");           \
    m.def("lookup", &vqt::lookup, "lookup-table output projection");                            \
    __VA_ARGS__                                                                                \
  }

namespace vqt {

inline void check_tensor(const torch::Tensor& x, const char* name, int64_t dim, torch::ScalarType dt,
                         torch::Device dev) {
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dimensions, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dt, name, " must be ", dt, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == dev, name, " must be on ", dev, ", got ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

inline void check_float(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, what,
              " must be float32 or float64, got ", x.scalar_type());
}

// Key set (k (n, Hkv, hd), v (n, Hkv, hdv), pos (n,)) consistent with the query layout; names[] label the three.
inline void check_keys(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& pos,
                       const char* const names[3], const Heads& L, torch::ScalarType dt, torch::Device dev) {
  check_tensor(k, names[0], 3, dt, dev);
  check_tensor(v, names[1], 3, dt, dev);
  check_tensor(pos, names[2], 1, torch::kDouble, dev);
  const int64_t n = k.size(0);
  TORCH_CHECK(k.size(1) == L.Hkv && k.size(2) == L.hd, names[0], " must have shape (n, ", L.Hkv, ", ", L.hd,
              "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == n && v.size(1) == L.Hkv && v.size(2) == L.hdv, names[1], " must have shape (", n, ", ",
              L.Hkv, ", ", L.hdv, "), got ", v.sizes());
  TORCH_CHECK(pos.size(0) == n, names[2], " must have shape (", n, ",), got ", pos.sizes());
}

// Validates queries q (m, H, hd) at positions (m,) against keys of Hkv heads and values of width hdv.
inline Heads check_queries(const torch::Tensor& q, const torch::Tensor& pos_q, int64_t Hkv, int64_t hdv) {
  check_float(q, "q");
  VQT_CHECK_TENSOR(q, 3, q.scalar_type(), q.device());
  VQT_CHECK_TENSOR(pos_q, 1, torch::kDouble, q.device());
  VQT_CHECK_SIZE(pos_q, 0, q.size(0));
  const Heads L{q.size(1), Hkv, q.size(2), hdv};
  TORCH_CHECK(L.Hkv > 0 && L.H % L.Hkv == 0, "query heads (", L.H, ") must be a multiple of key/value heads (", L.Hkv,
              ")");
  return L;
}

// (Hkv, hdv) read from keys and values, before their full checks.
inline std::pair<int64_t, int64_t> kv_layout(const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3, "keys and values must be (n, Hkv, width), got ", k.sizes(), " and ",
              v.sizes());
  return {k.size(1), v.size(2)};
}

// Validates the attention_rows inputs and returns their head layout.
inline Heads check_attention_rows(const torch::Tensor& q, const torch::Tensor& pos_q, const torch::Tensor& k,
                                  const torch::Tensor& v, const torch::Tensor& pos_k) {
  static const char* const names[3] = {"k", "v", "pos_k"};
  const auto [Hkv, hdv] = kv_layout(k, v);
  const Heads L = check_queries(q, pos_q, Hkv, hdv);
  check_keys(k, v, pos_k, names, L, q.scalar_type(), q.device());
  return L;
}

// Validates the attention_delta inputs (accumulators and both key sets) and returns their head layout.
inline Heads check_attention_delta(const torch::Tensor& q, const torch::Tensor& pos_q_old, const torch::Tensor& pos_q,
                                   const torch::Tensor& U, const torch::Tensor& Z, const torch::Tensor& M,
                                   const torch::Tensor& k_rem, const torch::Tensor& v_rem,
                                   const torch::Tensor& pos_rem, const torch::Tensor& k_add,
                                   const torch::Tensor& v_add, const torch::Tensor& pos_add) {
  static const char* const rem[3] = {"k_rem", "v_rem", "pos_rem"};
  static const char* const add[3] = {"k_add", "v_add", "pos_add"};
  const auto [Hkv, hdv] = kv_layout(k_add, v_add);
  const Heads L = check_queries(q, pos_q, Hkv, hdv);
  const auto dt = q.scalar_type();
  VQT_CHECK_TENSOR(pos_q_old, 1, torch::kDouble, q.device());
  VQT_CHECK_SIZE(pos_q_old, 0, q.size(0));
  check_keys(k_add, v_add, pos_add, add, L, dt, q.device());
  check_keys(k_rem, v_rem, pos_rem, rem, L, dt, q.device());
  VQT_CHECK_TENSOR(U, 3, dt, q.device());
  VQT_CHECK_TENSOR(Z, 2, dt, q.device());
  VQT_CHECK_TENSOR(M, 2, dt, q.device());
  TORCH_CHECK(U.size(0) == q.size(0) && U.size(1) == L.H && U.size(2) == L.hdv, "U must have shape (", q.size(0),
              ", ", L.H, ", ", L.hdv, "), got ", U.sizes());
  TORCH_CHECK(Z.sizes() == U.sizes().slice(0, 2) && M.sizes() == Z.sizes(), "Z and M must have shape (", q.size(0),
              ", ", L.H, "), got ", Z.sizes(), " and ", M.sizes());
  return L;
}

// Validates the requantize inputs: a, a_old (m, G, gd), codebook (G, K, gd), codes (m, G) int64, radius (m, G).
inline void check_requantize(const torch::Tensor& a, const torch::Tensor& codebook, const torch::Tensor& codes,
                             const torch::Tensor& a_old, const torch::Tensor& radius) {
  check_float(a, "a");
  const auto dt = a.scalar_type();
  VQT_CHECK_TENSOR(a, 3, dt, a.device());
  VQT_CHECK_TENSOR(codebook, 3, dt, a.device());
  VQT_CHECK_TENSOR(codes, 2, torch::kLong, a.device());
  VQT_CHECK_TENSOR(a_old, 3, dt, a.device());
  VQT_CHECK_TENSOR(radius, 2, dt, a.device());
  VQT_CHECK_SIZE(codebook, 0, a.size(1));
  VQT_CHECK_SIZE(codebook, 2, a.size(2));
  TORCH_CHECK(codebook.size(1) > 0, "the codebook needs at least one codeword");
  TORCH_CHECK(codes.sizes() == a.sizes().slice(0, 2), "codes must have shape (m, G) = ", a.sizes().slice(0, 2),
              ", got ", codes.sizes());
  TORCH_CHECK(a_old.sizes() == a.sizes(), "a_old must have the shape of a ", a.sizes(), ", got ", a_old.sizes());
  TORCH_CHECK(radius.sizes() == codes.sizes(), "radius must have shape (m, G) = ", codes.sizes(), ", got ",
              radius.sizes());
}

// Validates the lookup inputs: table (G, K, d) and codes (m, G) int64 with every code in [0, K).
inline void check_lookup(const torch::Tensor& table, const torch::Tensor& codes) {
  check_float(table, "table");
  VQT_CHECK_TENSOR(table, 3, table.scalar_type(), table.device());
  VQT_CHECK_TENSOR(codes, 2, torch::kLong, table.device());
  TORCH_CHECK(table.size(0) > 0, "the table needs at least one group");
  VQT_CHECK_SIZE(codes, 1, table.size(0));
  if (codes.numel()) {
    const auto lo = codes.min().item<int64_t>(), hi = codes.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < table.size(1), "codes must lie in [0, ", table.size(1), "), got [", lo, ", ", hi, "]");
  }
}

inline Window window_of(std::optional<double> window) { return Window{window.has_value(), window.value_or(0.0)}; }

template <typename T>
Keys<T> keys_of(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& pos) {
  return {k.data_ptr<T>(), v.data_ptr<T>(), pos.data_ptr<double>(), k.size(0)};
}

// Validates an attention sink: scores sink_s (m, H) and values sink_v (H, hdv), both present or neither.
inline void check_sink(const std::optional<torch::Tensor>& sink_s, const std::optional<torch::Tensor>& sink_v,
                       int64_t m, const Heads& L, torch::ScalarType dt, torch::Device dev) {
  TORCH_CHECK(sink_s.has_value() == sink_v.has_value(), "sink_s and sink_v come together (or neither)");
  if (!sink_s) return;
  check_tensor(*sink_s, "sink_s", 2, dt, dev);
  check_tensor(*sink_v, "sink_v", 2, dt, dev);
  TORCH_CHECK(sink_s->size(0) == m && sink_s->size(1) == L.H, "sink_s must be (", m, ", ", L.H, "), got ",
              sink_s->sizes());
  TORCH_CHECK(sink_v->size(0) == L.H && sink_v->size(1) == L.hdv, "sink_v must be (", L.H, ", ", L.hdv, "), got ",
              sink_v->sizes());
}

template <typename T>
const T* data_or_null(const std::optional<torch::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

template <typename T>
RowsInputs<T> rows_inputs(const torch::Tensor& q, const torch::Tensor& pos_q, const torch::Tensor& k,
                          const torch::Tensor& v, const torch::Tensor& pos_k, const Heads& L,
                          std::optional<double> window, double scale,
                          const std::optional<torch::Tensor>& sink_s = std::nullopt,
                          const std::optional<torch::Tensor>& sink_v = std::nullopt) {
  return {q.data_ptr<T>(), pos_q.data_ptr<double>(), keys_of<T>(k, v, pos_k), L, window_of(window), scale,
          data_or_null<T>(sink_s), data_or_null<T>(sink_v)};
}

template <typename T>
DeltaInputs<T> delta_inputs(const torch::Tensor& q, const torch::Tensor& pos_q_old, const torch::Tensor& pos_q,
                            const torch::Tensor& U, const torch::Tensor& Z, const torch::Tensor& M,
                            const torch::Tensor& k_rem, const torch::Tensor& v_rem, const torch::Tensor& pos_rem,
                            const torch::Tensor& k_add, const torch::Tensor& v_add, const torch::Tensor& pos_add,
                            const Heads& L, std::optional<double> window, double scale, double tau) {
  return {q.data_ptr<T>(),
          U.data_ptr<T>(),
          Z.data_ptr<T>(),
          M.data_ptr<T>(),
          pos_q_old.data_ptr<double>(),
          pos_q.data_ptr<double>(),
          keys_of<T>(k_rem, v_rem, pos_rem),
          keys_of<T>(k_add, v_add, pos_add),
          L,
          window_of(window),
          scale,
          tau};
}

template <typename T>
RequantizeInputs<T> requantize_inputs(const torch::Tensor& a, const torch::Tensor& codebook,
                                      const torch::Tensor& codes, const torch::Tensor& a_old,
                                      const torch::Tensor& radius) {
  return {a.data_ptr<T>(),          codebook.data_ptr<T>(), a_old.data_ptr<T>(), radius.data_ptr<T>(),
          codes.data_ptr<int64_t>(), a.size(1),              codebook.size(1),    a.size(2)};
}

// Uninitialized accumulators (U (m, H, hdv), Z (m, H), M (m, H)) for the queries q.
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> empty_accumulators(const torch::Tensor& q,
                                                                                   const Heads& L) {
  auto Z = at::empty({q.size(0), L.H}, q.options());
  return {at::empty({q.size(0), L.H, L.hdv}, q.options()), Z, at::empty_like(Z)};
}

}  // namespace vqt
