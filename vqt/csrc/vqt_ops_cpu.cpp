// Fused CPU backend of the sparse-recomputation operators (DESIGN.md section 5). The semantics are
// those of vqt/ops/reference.py; this file only changes the order of the arithmetic: one pass per
// query row (OpenMP over rows), head_dim loops written for vectorization, and float64 accumulation
// for float32 as well as float64 inputs.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "vqt_ops_common.h"
#include "vqt_ops_torch.h"

#define VQT_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), "the cpu backend needs CPU tensors, got " #x " on ", \
                                     (x).device())

namespace vqt {
namespace {

using torch::Tensor;

template <typename T>
inline double dot(const T* a, const T* b, int64_t n) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return acc;
}

template <typename T>
inline double squared_distance(const T* a, const T* b, int64_t n) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    acc += diff * diff;
  }
  return acc;
}

template <typename T>
inline void axpy(double* acc, double p, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += p * static_cast<double>(x[d]);
}

// Rounds to the storage precision: a stabilizer is used at exactly the value that is stored.
template <typename T>
inline double stored(double x) {
  return static_cast<double>(static_cast<T>(x));
}

// Per-thread scratch for one query row: the indices of its visible keys, their scores s[c * H + h],
// the row's accumulators (u, z), the sums being added to them (acc, zacc) and per-head stabilizers.
struct RowScratch {
  std::vector<int64_t> keys;
  std::vector<double> s, u, acc, z, zacc, m, rescale;
  RowScratch(int64_t max_keys, const Heads& L)
      : keys(max_keys), s(max_keys * L.H), u(L.H * L.hdv), acc(L.H * L.hdv), z(L.H), zacc(L.H), m(L.H),
        rescale(L.H) {}
};

// Runs body(i, scratch) for i in [0, n) on torch's number of OpenMP threads with one scratch per
// thread; stays on one thread when the whole job is too small to pay for waking the others.
template <typename MakeScratch, typename Body>
void for_each_row(int64_t n, int64_t work_per_row, MakeScratch make_scratch, Body body) {
  const bool parallel = n > 1 && n * work_per_row >= (int64_t{1} << 15);
#pragma omp parallel if (parallel) num_threads(at::get_num_threads())
  {
    auto scratch = make_scratch();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i, scratch);
  }
}

// Collects the keys visible from a query at pos_q into S.keys and their scores scale * q_h . k_{j, kv(h)}
// into S.s; returns how many there are.
template <typename T>
int64_t visible_scores(const T* qi, double pos_q, const Keys<T>& K, const Heads& L, const Window& w, double scale,
                       RowScratch& S) {
  int64_t n = 0;
  for (int64_t j = 0; j < K.n; ++j) {
    if (w.visible(pos_q, K.pos[j])) S.keys[n++] = j;
  }
  for (int64_t c = 0; c < n; ++c) {
    const T* kj = K.k + S.keys[c] * L.Hkv * L.hd;
    for (int64_t h = 0; h < L.H; ++h) S.s[c * L.H + h] = dot(qi + h * L.hd, kj + L.kv(h) * L.hd, L.hd) * scale;
  }
  return n;
}

// Highest of m[h] and the scores of the n collected keys, per head (NaN-propagating, like amax).
inline void raise_max(int64_t n, int64_t H, RowScratch& S) {
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t h = 0; h < H; ++h) S.m[h] = nan_max(S.m[h], S.s[c * H + h]);
  }
}

// acc[h] = sum_c p v_{keys[c], kv(h)} and zacc[h] = sum_c p over the n collected keys, p = exp(s - m[h]).
template <typename T>
void weighted_sum(int64_t n, const Keys<T>& K, const Heads& L, RowScratch& S) {
  std::fill(S.acc.begin(), S.acc.end(), 0.0);
  std::fill(S.zacc.begin(), S.zacc.end(), 0.0);
  for (int64_t c = 0; c < n; ++c) {
    const T* vj = K.v + S.keys[c] * L.Hkv * L.hdv;
    for (int64_t h = 0; h < L.H; ++h) {
      const double p = std::exp(S.s[c * L.H + h] - S.m[h]);
      S.zacc[h] += p;
      axpy(S.acc.data() + h * L.hdv, p, vj + L.kv(h) * L.hdv, L.hdv);
    }
  }
}

template <typename T>
void store(T* dst, const double* src, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);
}

// One full attention row: (U, Z, M) of query i over every visible key.
template <typename T>
void attention_row(int64_t i, const RowsInputs<T>& in, T* U, T* Z, T* M, RowScratch& S) {
  const Heads& L = in.L;
  const int64_t n = visible_scores(in.q + i * L.H * L.hd, in.pos_q[i], in.keys, L, in.w, in.scale, S);
  std::fill(S.m.begin(), S.m.end(), -std::numeric_limits<double>::infinity());
  raise_max(n, L.H, S);
  for (auto& m : S.m) m = stored<T>(m);
  weighted_sum(n, in.keys, L, S);
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t h = 0; h < L.H; ++h) {
    const int64_t ih = i * L.H + h;
    // Without a finite score the reference's softmax is exp(-inf - (-inf)) = NaN; so is ours.
    const bool none = S.m[h] == -std::numeric_limits<double>::infinity();
    if (none) std::fill_n(S.acc.data() + h * L.hdv, L.hdv, nan);
    store(U + ih * L.hdv, S.acc.data() + h * L.hdv, L.hdv);
    Z[ih] = static_cast<T>(none ? nan : S.zacc[h]);
    M[ih] = static_cast<T>(S.m[h]);
  }
}

// Delta update of row i: subtract removed keys at the current stabilizer, flag a cancellation,
// then fold in added keys, raising the stabilizer (and rescaling) where a new score exceeds it.
template <typename T>
bool delta_row(int64_t i, const DeltaInputs<T>& in, T* U, T* Z, T* M, RowScratch& S) {
  const Heads& L = in.L;
  const T* qi = in.q + i * L.H * L.hd;
  for (int64_t h = 0; h < L.H; ++h) S.m[h] = static_cast<double>(in.M[i * L.H + h]);
  int64_t n = visible_scores(qi, in.pos_q_old[i], in.rem, L, in.w, in.scale, S);
  weighted_sum(n, in.rem, L, S);
  bool refresh = false;
  for (int64_t h = 0; h < L.H; ++h) {
    const int64_t ih = i * L.H + h;
    S.z[h] = static_cast<double>(in.Z[ih]) - S.zacc[h];
    refresh |= static_cast<T>(S.z[h]) < static_cast<T>(in.tau) * in.Z[ih];
    const T* src = in.U + ih * L.hdv;
    double* u = S.u.data() + h * L.hdv;
    const double* acc = S.acc.data() + h * L.hdv;
#pragma omp simd
    for (int64_t d = 0; d < L.hdv; ++d) u[d] = static_cast<double>(src[d]) - acc[d];
  }
  if (in.add.n > 0) {
    n = visible_scores(qi, in.pos_q[i], in.add, L, in.w, in.scale, S);
    std::copy(S.m.begin(), S.m.end(), S.rescale.begin());
    raise_max(n, L.H, S);
    for (int64_t h = 0; h < L.H; ++h) {
      S.m[h] = stored<T>(S.m[h]);
      S.rescale[h] = std::exp(S.rescale[h] - S.m[h]);
    }
    weighted_sum(n, in.add, L, S);
    for (int64_t h = 0; h < L.H; ++h) {
      const double r = S.rescale[h];
      S.z[h] = S.z[h] * r + S.zacc[h];
      double* u = S.u.data() + h * L.hdv;
      const double* acc = S.acc.data() + h * L.hdv;
#pragma omp simd
      for (int64_t d = 0; d < L.hdv; ++d) u[d] = u[d] * r + acc[d];
    }
  }
  for (int64_t h = 0; h < L.H; ++h) {
    const int64_t ih = i * L.H + h;
    store(U + ih * L.hdv, S.u.data() + h * L.hdv, L.hdv);
    Z[ih] = static_cast<T>(S.z[h]);
    M[ih] = static_cast<T>(S.m[h]);
  }
  return refresh;
}

// Re-quantizes group vector ig = (i, g) unless it stays within its certified radius; returns whether it was searched.
template <typename T>
bool requantize_group(int64_t ig, int64_t g, const RequantizeInputs<T>& in, const double* e2max, int64_t* codes,
                      T* a_ref, T* radius) {
  const int64_t gd = in.gd;
  const T* a = in.a + ig * gd;
  const bool search = !(std::sqrt(squared_distance(a, in.a_ref + ig * gd, gd)) < static_cast<double>(in.radius[ig]));
  if (!search) {
    codes[ig] = in.codes[ig];
    std::copy_n(in.a_ref + ig * gd, gd, a_ref + ig * gd);
    radius[ig] = in.radius[ig];
    return false;
  }
  Top2 best = Top2::none();
  const T* cb = in.codebook + g * in.K * gd;
  for (int64_t k = 0; k < in.K; ++k) best.push(squared_distance(a, cb + k * gd, gd), k);
  codes[ig] = best.code();
  std::copy_n(a, gd, a_ref + ig * gd);
  radius[ig] = static_cast<T>(best.radius(dot(a, a, gd), e2max[g], Eps<T>::value));
  return true;
}

// out = sum_g table[g, codes[i, g]], summed in group order from the first term as the reference does
// (so the result is bitwise equal to it).
template <typename T>
void lookup_row(int64_t i, const T* table, const int64_t* codes, int64_t G, int64_t K, int64_t d, T* out) {
  std::copy_n(table + codes[i * G] * d, d, out);
  for (int64_t g = 1; g < G; ++g) {
    const T* row = table + (g * K + codes[i * G + g]) * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) out[c] += row[c];
  }
}

std::tuple<Tensor, Tensor, Tensor> attention_rows(const Tensor& q, const Tensor& pos_q, const Tensor& k,
                                                  const Tensor& v, const Tensor& pos_k, std::optional<double> window,
                                                  double scale) {
  VQT_CHECK_CPU(q);
  const Heads L = check_attention_rows(q, pos_q, k, v, pos_k);
  Tensor U, Z, M;
  std::tie(U, Z, M) = empty_accumulators(q, L);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vqt_attention_rows_cpu", [&] {
    using T = scalar_t;
    const auto in = rows_inputs<T>(q, pos_q, k, v, pos_k, L, window, scale);
    T *Up = U.data_ptr<T>(), *Zp = Z.data_ptr<T>(), *Mp = M.data_ptr<T>();
    for_each_row(
        q.size(0), in.keys.n * L.H * (L.hd + L.hdv), [&] { return RowScratch(in.keys.n, L); },
        [&](int64_t i, RowScratch& S) { attention_row(i, in, Up, Zp, Mp, S); });
  });
  return {U, Z, M};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_delta(const Tensor& q, const Tensor& pos_q_old,
                                                           const Tensor& pos_q, const Tensor& U, const Tensor& Z,
                                                           const Tensor& M, const Tensor& k_rem, const Tensor& v_rem,
                                                           const Tensor& pos_rem, const Tensor& k_add,
                                                           const Tensor& v_add, const Tensor& pos_add,
                                                           std::optional<double> window, double scale, double tau) {
  VQT_CHECK_CPU(q);
  const Heads L = check_attention_delta(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add);
  Tensor U2, Z2, M2;
  std::tie(U2, Z2, M2) = empty_accumulators(q, L);
  Tensor refresh = at::empty({q.size(0)}, q.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vqt_attention_delta_cpu", [&] {
    using T = scalar_t;
    const auto in = delta_inputs<T>(q, pos_q_old, pos_q, U, Z, M, k_rem, v_rem, pos_rem, k_add, v_add, pos_add, L,
                                    window, scale, tau);
    T *Up = U2.data_ptr<T>(), *Zp = Z2.data_ptr<T>(), *Mp = M2.data_ptr<T>();
    bool* rp = refresh.data_ptr<bool>();
    for_each_row(
        q.size(0), (in.rem.n + in.add.n) * L.H * (L.hd + L.hdv),
        [&] { return RowScratch(std::max(in.rem.n, in.add.n), L); },
        [&](int64_t i, RowScratch& S) { rp[i] = delta_row(i, in, Up, Zp, Mp, S); });
  });
  return {U2, Z2, M2, refresh};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> requantize(const Tensor& a, const Tensor& codebook, const Tensor& codes,
                                                      const Tensor& a_ref, const Tensor& radius) {
  VQT_CHECK_CPU(a);
  check_requantize(a, codebook, codes, a_ref, radius);
  const int64_t m = a.size(0), G = a.size(1);
  Tensor codes2 = at::empty_like(codes), a_ref2 = at::empty_like(a_ref), radius2 = at::empty_like(radius);
  Tensor searched = at::empty({m, G}, codes.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "vqt_requantize_cpu", [&] {
    using T = scalar_t;
    const auto in = requantize_inputs<T>(a, codebook, codes, a_ref, radius);
    std::vector<double> e2max(G, 0.0);  // max_k |e_k|^2 per group, for the radius' safety margin
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t k = 0; k < in.K; ++k) {
        const T* e = in.codebook + (g * in.K + k) * in.gd;
        e2max[g] = std::max(e2max[g], dot(e, e, in.gd));
      }
    }
    int64_t* cp = codes2.data_ptr<int64_t>();
    T *rp = a_ref2.data_ptr<T>(), *radp = radius2.data_ptr<T>();
    bool* sp = searched.data_ptr<bool>();
    for_each_row(
        m, G * in.K * in.gd, [] { return 0; },
        [&](int64_t i, int) {
          for (int64_t g = 0; g < G; ++g) sp[i * G + g] = requantize_group(i * G + g, g, in, e2max.data(), cp, rp, radp);
        });
  });
  return {codes2, a_ref2, radius2, searched};
}

Tensor lookup(const Tensor& table, const Tensor& codes) {
  VQT_CHECK_CPU(table);
  check_lookup(table, codes);
  const int64_t m = codes.size(0), G = table.size(0), K = table.size(1), d = table.size(2);
  Tensor out = at::empty({m, d}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "vqt_lookup_cpu", [&] {
    using T = scalar_t;
    const T* tp = table.data_ptr<T>();
    const int64_t* cp = codes.data_ptr<int64_t>();
    T* op = out.data_ptr<T>();
    for_each_row(
        m, G * d, [] { return 0; },
        [&](int64_t i, int) { lookup_row(i, tp, cp, G, K, d, op + i * d); });
  });
  return out;
}

}  // namespace
}  // namespace vqt

VQT_DEFINE_MODULE("vqt fused CPU operators (semantics: vqt/ops/reference.py)")
