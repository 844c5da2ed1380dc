// Fused CPU backend of the sparse-recomputation operators (DESIGN.md section 5). The semantics are
// those of vqt/ops/reference.py; only the order of the arithmetic differs. Each call copies its keys
// (or codebook) once, in float64, into the layouts the row loops stream through: sorted by position,
// so that the keys a query sees are one contiguous range, and transposed, so that scores vectorize
// over keys. Rows run on OpenMP threads; inner loops are fixed-width register blocks the compiler
// vectorizes, exp included. float32 inputs are computed in float64 too and rounded once, at the end:
// a delta update subtracts contributions from a sum, and where that cancels, float32 rounding in
// them would be amplified far beyond the reference's own error.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqt_ops_common.h"
#include "vqt_ops_torch.h"

#define VQT_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), "the cpu backend needs CPU tensors, got " #x " on ", \
                                     (x).device())

namespace vqt {
namespace {

using torch::Tensor;

// Register blocks: up to kVecs vectors of kLanes doubles (GCC/Clang vector extensions, lowered to
// whatever the target has: one AVX-512 register per vector, two AVX2 or four SSE ones).
constexpr int64_t kLanes = 8, kVecs = 4;
constexpr int64_t kBlock = kLanes * kVecs;  // keys, codewords or value components per register block
typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

template <typename To, typename From>
inline To bits(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

inline Vec load(const double* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec broadcast(double x) { return Vec{} + x; }

// Calls f(std::integral_constant<int64_t, NV>{}) with NV (1 to kVecs) the fewest vectors that cover
// count lanes, so that a short last block (a few keys, a narrow head) does not pay for a full one.
template <typename F>
inline void with_vectors(int64_t count, F&& f) {
  switch (std::min(kVecs, (count + kLanes - 1) / kLanes)) {
    case 1:
      return f(std::integral_constant<int64_t, 1>{});
    case 2:
      return f(std::integral_constant<int64_t, 2>{});
    case 3:
      return f(std::integral_constant<int64_t, 3>{});
    default:
      return f(std::integral_constant<int64_t, kVecs>{});
  }
}

// out[b] = scale * sum_t term(w[t], rows[t * stride + b]) for b < width, over n rows, in register
// blocks across b (rows must be readable up to the next multiple of kLanes past width). Even and odd
// rows go to separate accumulators, so that narrow blocks are not bound by the add latency.
template <typename Term>
void sum_rows(const double* w, int64_t n, const double* rows, int64_t stride, int64_t width, double scale,
              double* out, Term term) {
  for (int64_t b0 = 0; b0 < width; b0 += kBlock) {
    with_vectors(width - b0, [&](auto nv) {
      constexpr int64_t NV = decltype(nv)::value;
      Vec even[NV] = {}, odd[NV] = {};
      const auto add_row = [&](Vec(&acc)[NV], int64_t t) {
        const Vec wt = broadcast(w[t]);
        const double* row = rows + t * stride + b0;
        for (int64_t j = 0; j < NV; ++j) acc[j] += term(wt, load(row + j * kLanes));
      };
      int64_t t = 0;
      for (; t + 1 < n; t += 2) {
        add_row(even, t);
        add_row(odd, t + 1);
      }
      if (t < n) add_row(even, t);
      double block[NV * kLanes];
      for (int64_t j = 0; j < NV; ++j) {
        const Vec total = (even[j] + odd[j]) * scale;
        std::memcpy(block + j * kLanes, &total, sizeof total);
      }
      std::copy_n(block, std::min(NV * kLanes, width - b0), out + b0);
    });
  }
}

// x[i] = exp(x[i]) to within 1 ulp, in a loop the compiler vectorizes (no calls, no branches):
// x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite), exp(r) by its degree-13 Taylor polynomial
// (truncation below 1e-17), and 2^k applied as two exact power-of-two factors so that subnormal
// results, underflow to 0 (x = -inf included) and overflow to inf come out right. NaN stays NaN.
inline void exp_inplace(double* x, int64_t n) {
  constexpr double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                   ln2_lo = 1.90821492927058770002e-10;  // ln2_hi has trailing zero bits: k * ln2_hi is exact
  constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52: x + shifter rounds x to an integer in the low bits
  constexpr double c2 = 1.0 / 2, c3 = c2 / 3, c4 = c3 / 4, c5 = c4 / 5, c6 = c5 / 6, c7 = c6 / 7, c8 = c7 / 8,
                   c9 = c8 / 9, c10 = c9 / 10, c11 = c10 / 11, c12 = c11 / 12, c13 = c12 / 13;
  const uint64_t shifter_bits = bits<uint64_t>(shifter);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    double v = x[i];  // clamped to where exp is not yet 0 or inf; NaN passes
    v = v < -746.0 ? -746.0 : v;
    v = v > 710.0 ? 710.0 : v;
    const double k = (v * log2e + shifter) - shifter;
    const double r = (v - k * ln2_hi) - k * ln2_lo;
    double p = c13;
    p = p * r + c12;
    p = p * r + c11;
    p = p * r + c10;
    p = p * r + c9;
    p = p * r + c8;
    p = p * r + c7;
    p = p * r + c6;
    p = p * r + c5;
    p = p * r + c4;
    p = p * r + c3;
    p = p * r + c2;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const double k1 = ((k * 0.5 - 0.25) + shifter) - shifter;  // floor(k / 2): 2^k = 2^k1 2^(k - k1)
    const double s1 = bits<double>((bits<uint64_t>(k1 + (shifter + 1023.0)) - shifter_bits) << 52);
    const double s2 = bits<double>((bits<uint64_t>((k - k1) + (shifter + 1023.0)) - shifter_bits) << 52);
    x[i] = p * s1 * s2;
  }
}

// max(init, x[0..n)), NaN if any of them is NaN (as amax and torch.maximum).
inline double nan_max_of(const double* x, int64_t n, double init) {
  double m = -kInf;
  int nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t c = 0; c < n; ++c) {
    const double xc = x[c];
    m = xc > m ? xc : m;
    nans += xc != xc ? 1 : 0;
  }
  return nans ? kNaN : nan_max(init, m);
}

template <typename From, typename To>
inline void convert(const From* src, int64_t n, To* dst) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<To>(src[d]);
}

// Rounds to the storage precision: a stabilizer is used at exactly the value that is stored.
template <typename T>
inline double stored(double x) {
  return static_cast<double>(static_cast<T>(x));
}

// Per-thread scratch of one query row: its query, scores, softmax weights and two value sums.
struct RowScratch {
  std::vector<double> q, s, u, u2;
  RowScratch(int64_t max_keys, const Heads& L) : q(L.H * L.hd), s(max_keys), u(L.hdv), u2(L.hdv) {}
};

// Indices of the keys at non-NaN positions (a NaN position is never visible), stably sorted by
// position; already sorted keys (a document's, in order) cost one pass.
template <typename T>
std::vector<int64_t> sorted_keys(const Keys<T>& K) {
  std::vector<int64_t> order;
  order.reserve(K.n);
  bool sorted = true;
  for (int64_t j = 0; j < K.n; ++j) {
    if (K.pos[j] != K.pos[j]) continue;
    sorted = sorted && (order.empty() || K.pos[order.back()] <= K.pos[j]);
    order.push_back(j);
  }
  if (!sorted) std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return K.pos[a] < K.pos[b]; });
  return order;
}

// The keys of order (sorted by position) that at least one of the m queries at pos_q can see: the
// union of their visible ranges. Full attention rows of a few queries then copy only their band.
template <typename T>
std::vector<int64_t> visible_to_any(const Keys<T>& K, std::vector<int64_t> order, const double* pos_q, int64_t m,
                                    const Window& w) {
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<double> pos(n);
  for (int64_t c = 0; c < n; ++c) pos[c] = K.pos[order[c]];
  const auto after = [&](double x) { return std::upper_bound(pos.begin(), pos.end(), x) - pos.begin(); };
  std::vector<int64_t> cover(n + 1, 0);  // +1 where a query's range starts, -1 where it ends
  for (int64_t i = 0; i < m; ++i) {
    if (pos_q[i] != pos_q[i]) continue;  // a NaN query sees nothing
    const int64_t hi = after(pos_q[i]), lo = w.on ? std::min(hi, after(pos_q[i] - w.width)) : 0;
    cover[lo] += 1;
    cover[hi] -= 1;
  }
  int64_t depth = 0, kept = 0;
  for (int64_t c = 0; c < n; ++c) {
    depth += cover[c];
    if (depth > 0) order[kept++] = order[c];
  }
  order.resize(kept);
  return order;
}

// One key set in float64, sorted by position (keys at NaN positions, never visible, are dropped):
// kt (Hkv, hd, n_pad) holds the keys transposed and v (Hkv, n, hdv_pad) the values, zero padded so
// that register blocks may read past the end.
struct KeyBlock {
  int64_t n, n_pad, hd, hdv, hdv_pad;
  std::vector<double> pos, kt, v;

  // The keys listed in order (indices into K, ascending by position; see sorted_keys).
  template <typename T>
  KeyBlock(const Keys<T>& K, const Heads& L, const std::vector<int64_t>& order)
      : n(static_cast<int64_t>(order.size())),
        n_pad(n + kBlock),
        hd(L.hd),
        hdv(L.hdv),
        hdv_pad(round_up(L.hdv, kLanes)),
        pos(n),
        kt(L.Hkv * L.hd * n_pad, 0.0),
        v(L.Hkv * n * hdv_pad, 0.0) {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t j = order[c];
      pos[c] = K.pos[j];
      for (int64_t h = 0; h < L.Hkv; ++h) {
        const T* kj = K.k + (j * L.Hkv + h) * hd;
        for (int64_t d = 0; d < hd; ++d) kt[(h * hd + d) * n_pad + c] = static_cast<double>(kj[d]);
        convert(K.v + (j * L.Hkv + h) * hdv, hdv, v.data() + (h * n + c) * hdv_pad);
      }
    }
  }

  template <typename T>
  KeyBlock(const Keys<T>& K, const Heads& L) : KeyBlock(K, L, sorted_keys(K)) {}

  // The keys visible from a query at pos_q, pos_q - window < pos <= pos_q, as the sorted range [lo, hi).
  std::pair<int64_t, int64_t> visible(double pos_q, const Window& w) const {
    const auto after = [&](double x) {  // index of the first key with position > x (none when x is NaN)
      return x == x ? std::upper_bound(pos.begin(), pos.end(), x) - pos.begin() : n;
    };
    const int64_t hi = pos_q == pos_q ? after(pos_q) : 0;
    const int64_t lo = w.on ? after(pos_q - w.width) : 0;
    return {lo, std::max(lo, hi)};
  }

  // s[c] = (q . k_{lo + c}) * scale for the count keys of kv head h starting at lo.
  void scores(const double* q, int64_t h, int64_t lo, int64_t count, double scale, double* s) const {
    sum_rows(q, hd, kt.data() + h * hd * n_pad + lo, n_pad, count, scale, s,
             [](const Vec& qd, const Vec& k) { return qd * k; });
  }

  // Softmax weights at stabilizer m over the count keys of kv head h starting at lo, given their
  // scores s (overwritten with the weights): u = sum_c p_c v_c; returns sum_c p_c.
  double accumulate(double* s, double m, int64_t h, int64_t lo, int64_t count, double* u) const {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) s[c] -= m;
    exp_inplace(s, count);
    double z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t c = 0; c < count; ++c) z += s[c];
    sum_rows(s, count, v.data() + (h * n + lo) * hdv_pad, hdv_pad, hdv, 1.0, u,
             [](const Vec& p, const Vec& x) { return p * x; });
    return z;
  }
};

// Runs body(i, scratch) for i in [0, n) on torch's number of OpenMP threads with one scratch per
// thread; stays on one thread when the whole job is too small to pay for waking the others.
template <typename MakeScratch, typename Body>
void for_each_row(int64_t n, int64_t work_per_row, MakeScratch make_scratch, Body body) {
  const bool parallel = n > 1 && n * work_per_row >= (int64_t{1} << 16);
#pragma omp parallel if (parallel) num_threads(at::get_num_threads())
  {
    auto scratch = make_scratch();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i, scratch);
  }
}

// One full attention row: (U, Z, M) of query i over every visible key.
template <typename T>
void attention_row(int64_t i, const RowsInputs<T>& in, const KeyBlock& B, T* U, T* Z, T* M, RowScratch& S) {
  const Heads& L = in.L;
  const auto [lo, hi] = B.visible(in.pos_q[i], in.w);
  convert(in.q + i * L.H * L.hd, L.H * L.hd, S.q.data());
  for (int64_t h = 0; h < L.H; ++h) {
    const int64_t ih = i * L.H + h, kv = L.kv(h);
    B.scores(S.q.data() + h * L.hd, kv, lo, hi - lo, in.scale, S.s.data());
    const double m = stored<T>(nan_max_of(S.s.data(), hi - lo, -kInf));
    const double z = B.accumulate(S.s.data(), m, kv, lo, hi - lo, S.u.data());
    // Without a finite score the reference's softmax is exp(-inf - (-inf)) = NaN; so is ours.
    const bool none = m == -kInf;
    if (none) std::fill(S.u.begin(), S.u.end(), kNaN);
    convert(S.u.data(), L.hdv, U + ih * L.hdv);
    Z[ih] = static_cast<T>(none ? kNaN : z);
    M[ih] = static_cast<T>(m);
  }
}

// Delta update of row i: subtract removed keys at the current stabilizer, flag a cancellation,
// then fold in added keys, raising the stabilizer (and rescaling) where a new score exceeds it.
template <typename T>
bool delta_row(int64_t i, const DeltaInputs<T>& in, const KeyBlock& R, const KeyBlock& A, T* U, T* Z, T* M,
               RowScratch& S) {
  const Heads& L = in.L;
  const auto [rlo, rhi] = R.visible(in.pos_q_old[i], in.w);
  const auto [alo, ahi] = A.visible(in.pos_q[i], in.w);
  convert(in.q + i * L.H * L.hd, L.H * L.hd, S.q.data());
  bool refresh = false;
  for (int64_t h = 0; h < L.H; ++h) {
    const int64_t ih = i * L.H + h, kv = L.kv(h);
    const double* q = S.q.data() + h * L.hd;
    double* u = S.u.data();
    double m = static_cast<double>(in.M[ih]);
    R.scores(q, kv, rlo, rhi - rlo, in.scale, S.s.data());
    double z = static_cast<double>(in.Z[ih]) - R.accumulate(S.s.data(), m, kv, rlo, rhi - rlo, u);
    const T* u_in = in.U + ih * L.hdv;
#pragma omp simd
    for (int64_t d = 0; d < L.hdv; ++d) u[d] = static_cast<double>(u_in[d]) - u[d];
    refresh |= static_cast<T>(z) < static_cast<T>(in.tau) * in.Z[ih];
    if (in.add.n > 0) {
      A.scores(q, kv, alo, ahi - alo, in.scale, S.s.data());
      const double m_new = stored<T>(nan_max_of(S.s.data(), ahi - alo, m));
      const double rescale = std::exp(m - m_new);
      z = z * rescale + A.accumulate(S.s.data(), m_new, kv, alo, ahi - alo, S.u2.data());
      const double* added = S.u2.data();
#pragma omp simd
      for (int64_t d = 0; d < L.hdv; ++d) u[d] = u[d] * rescale + added[d];
      m = m_new;
    }
    convert(u, L.hdv, U + ih * L.hdv);
    Z[ih] = static_cast<T>(z);
    M[ih] = static_cast<T>(m);
  }
  return refresh;
}

// max_k |e_k|^2 of each of the G groups of a (G, K, gd) codebook, in float64.
template <typename T>
std::vector<double> max_codeword_norms(const T* codebook, int64_t G, int64_t K, int64_t gd) {
  std::vector<double> e2max(G, 0.0);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t k = 0; k < K; ++k) {
      const T* e = codebook + (g * K + k) * gd;
      double e2 = 0;
#pragma omp simd reduction(+ : e2)
      for (int64_t d = 0; d < gd; ++d) e2 += static_cast<double>(e[d]) * static_cast<double>(e[d]);
      e2max[g] = nan_max(e2max[g], e2);
    }
  }
  return e2max;
}

// The codebook in float64, transposed per group, (G, gd, K_pad) zero padded: distances to all
// codewords vectorize over codewords. Building it costs a pass over the codebook, so it is used
// when many vectors are searched in one call.
struct CodebookBlock {
  int64_t K, K_pad, gd;
  std::vector<double> et, e2max;

  template <typename T>
  CodebookBlock(const T* codebook, int64_t G, int64_t K_, int64_t gd_)
      : K(K_), K_pad(round_up(K_, kLanes)), gd(gd_), et(G * gd_ * K_pad, 0.0),
        e2max(max_codeword_norms(codebook, G, K_, gd_)) {
    for (int64_t g = 0; g < G; ++g) {
      const T* cg = codebook + g * K * gd;
      for (int64_t d = 0; d < gd; ++d) {
        double* row = et.data() + (g * gd + d) * K_pad;
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<double>(cg[k * gd + d]);
      }
    }
  }

  // Squared Euclidean distances from a (float64, gd) to every codeword of group g, computed directly.
  void distances(const double* a, int64_t g, double* dist2) const {
    sum_rows(a, gd, et.data() + g * gd * K_pad, K_pad, K, 1.0, dist2, [](const Vec& ad, const Vec& e) {
      const Vec diff = ad - e;
      return diff * diff;
    });
  }
};

// The codebook read in place (row-major, any float type), for calls that search only a few vectors:
// no copy to build, distances vectorize over the codeword's components instead.
template <typename T>
struct CodebookRows {
  const T* codebook;
  int64_t K, K_pad, gd;
  std::vector<double> e2max;

  CodebookRows(const T* codebook_, int64_t G, int64_t K_, int64_t gd_)
      : codebook(codebook_), K(K_), K_pad(round_up(K_, kLanes)), gd(gd_),
        e2max(max_codeword_norms(codebook_, G, K_, gd_)) {}

  void distances(const double* a, int64_t g, double* dist2) const {
    const T* cg = codebook + g * K * gd;
    for (int64_t k = 0; k < K; ++k) {
      const T* e = cg + k * gd;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < gd; ++d) {
        const double diff = a[d] - static_cast<double>(e[d]);
        s += diff * diff;
      }
      dist2[k] = s;
    }
  }
};

// The nearest and second-nearest of K squared distances, exactly as Top2::push over k = 0, 1, ...
// would find them (lowest index among equals, NaN never), in vectorizable passes: the minimum, its
// first index, the minimum of the others, its first index.
inline Top2 nearest_two(const double* dist2, int64_t K) {
  Top2 best = Top2::none();
  const auto first = [&](double value, int64_t skip) {
    for (int64_t k = 0; k < K; ++k) {
      if (dist2[k] == value && k != skip) return k;
    }
    return Top2::kNone;
  };
  double d1 = kInf;
#pragma omp simd reduction(min : d1)
  for (int64_t k = 0; k < K; ++k) d1 = dist2[k] < d1 ? dist2[k] : d1;
  best.i1 = first(d1, Top2::kNone);
  if (best.i1 == Top2::kNone) return best;
  best.d1 = d1;
  double d2 = kInf;
#pragma omp simd reduction(min : d2)
  for (int64_t k = 0; k < K; ++k) d2 = (dist2[k] < d2 && k != best.i1) ? dist2[k] : d2;
  best.i2 = first(d2, best.i1);
  if (best.i2 != Top2::kNone) best.d2 = d2;
  return best;
}

// Keeps the code of group vector ig when it stays within its certified radius (the code cannot have
// changed) and returns false; returns true, writing nothing, when it must be searched.
template <typename T>
bool must_search(int64_t ig, const RequantizeInputs<T>& in, int64_t* codes, T* a_ref, T* radius) {
  const int64_t gd = in.gd;
  const T* a = in.a + ig * gd;
  const T* ref = in.a_ref + ig * gd;
  double moved = 0;
  for (int64_t d = 0; d < gd; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(ref[d]);
    moved += diff * diff;
  }
  if (std::sqrt(moved) < static_cast<double>(in.radius[ig])) {  // NaN-safe: anything uncertain is searched
    codes[ig] = in.codes[ig];
    std::copy_n(ref, gd, a_ref + ig * gd);
    radius[ig] = in.radius[ig];
    return false;
  }
  return true;
}

// Searches group vector ig = (i, g): its nearest codeword, a new reference point and radius.
template <typename T, typename Codebook>
void search_group(int64_t ig, int64_t g, const RequantizeInputs<T>& in, const Codebook& cb,
                  std::vector<double>& scratch, int64_t* codes, T* a_ref, T* radius) {
  const int64_t gd = in.gd;
  const T* a = in.a + ig * gd;
  double* ad = scratch.data();
  double* dist2 = ad + gd;
  double a2 = 0;
  for (int64_t d = 0; d < gd; ++d) {
    ad[d] = static_cast<double>(a[d]);
    a2 += ad[d] * ad[d];
  }
  cb.distances(ad, g, dist2);
  const Top2 best = nearest_two(dist2, cb.K);
  codes[ig] = best.code();
  std::copy_n(a, gd, a_ref + ig * gd);
  radius[ig] = static_cast<T>(best.radius(a2, cb.e2max[g], Eps<T>::value));
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
    const KeyBlock keys(in.keys, L, visible_to_any(in.keys, sorted_keys(in.keys), in.pos_q, q.size(0), in.w));
    T *Up = U.data_ptr<T>(), *Zp = Z.data_ptr<T>(), *Mp = M.data_ptr<T>();
    for_each_row(
        q.size(0), keys.n * L.H * (L.hd + L.hdv), [&] { return RowScratch(keys.n, L); },
        [&](int64_t i, RowScratch& S) { attention_row(i, in, keys, Up, Zp, Mp, S); });
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
    const KeyBlock removed(in.rem, L), added(in.add, L);
    T *Up = U2.data_ptr<T>(), *Zp = Z2.data_ptr<T>(), *Mp = M2.data_ptr<T>();
    bool* rp = refresh.data_ptr<bool>();
    for_each_row(
        q.size(0), (removed.n + added.n) * L.H * (L.hd + L.hdv),
        [&] { return RowScratch(std::max(removed.n, added.n), L); },
        [&](int64_t i, RowScratch& S) { rp[i] = delta_row(i, in, removed, added, Up, Zp, Mp, S); });
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
    int64_t* cp = codes2.data_ptr<int64_t>();
    T *rp = a_ref2.data_ptr<T>(), *radp = radius2.data_ptr<T>();
    bool* sp = searched.data_ptr<bool>();
    std::vector<int64_t> todo;  // group vectors (i * G + g) outside their certified radius
    for (int64_t ig = 0; ig < m * G; ++ig) {
      sp[ig] = must_search(ig, in, cp, rp, radp);
      if (sp[ig]) todo.push_back(ig);
    }
    const int64_t n = static_cast<int64_t>(todo.size());
    const auto run = [&](const auto& cb) {
      for_each_row(
          n, in.K * in.gd, [&] { return std::vector<double>(in.gd + cb.K_pad); },
          [&](int64_t t, std::vector<double>& scratch) {
            search_group(todo[t], todo[t] % G, in, cb, scratch, cp, rp, radp);
          });
    };
    // Transposing the codebook pays off once several vectors per group are searched.
    if (n > 4 * G) {
      run(CodebookBlock(in.codebook, G, in.K, in.gd));
    } else if (n > 0) {
      run(CodebookRows<T>(in.codebook, G, in.K, in.gd));
    }
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
