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
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
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
namespace py = pybind11;

// Register blocks: up to kVecs vectors of kLanes doubles (GCC/Clang vector extensions, lowered to
// whatever the target has: one AVX-512 register per vector, two AVX2 or four SSE ones).
constexpr int64_t kLanes = 8, kVecs = 4;
constexpr int64_t kBlock = kLanes * kVecs;  // keys, codewords or value components per register block
typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// A vector whose elements start uninitialized (no memset): for buffers every element of which is written
// before it is read. An edit fills some per layer (gathered rows, accumulators, outputs) of about a
// megabyte each, and zero-filling them first cost a tenth of a keystroke's time.
template <typename T>
struct DefaultInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInit<U>;
  };
  DefaultInit() = default;
  template <typename U>
  DefaultInit(const DefaultInit<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Buffer = std::vector<T, DefaultInit<T>>;

// Wall time of each phase of layer_step, summed over calls while switched on (set_phase_timing; read by
// phase_times, shown by experiments/keystroke_phases.py). Off by default, when a mark is one untaken
// branch. Marks are made on the calling thread only (the phases' own threads run inside them).
enum Phase { kQkv, kRope, kChangedKeys, kAffectedRows, kDeltaRows, kFullRows, kRequantize, kCorrection, kMlp,
             kCommit, kPhases };
constexpr const char* kPhaseNames[kPhases] = {"qkv", "rope", "changed keys", "affected rows", "delta rows",
                                             "full rows", "requantize", "correction", "mlp", "commit"};
struct PhaseClock {
  bool on = false, running = false;  // switched on; inside a layer_step (layer_attend alone is not timed)
  int64_t calls = 0;
  std::chrono::steady_clock::time_point last;
  double ms[kPhases] = {};
  void start() {
    running = on;
    if (on) last = std::chrono::steady_clock::now(), ++calls;
  }
  void mark(Phase phase, bool last_one = false) {  // the time since the previous mark (or start) goes to phase
    if (!running) return;
    const auto now = std::chrono::steady_clock::now();
    ms[phase] += std::chrono::duration<double, std::milli>(now - last).count();
    last = now;
    running = !last_one;
  }
};
PhaseClock phase_clock;

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

inline Vec broadcast(double x) { return Vec{x, x, x, x, x, x, x, x}; }
static_assert(kLanes == 8, "broadcast lists kLanes copies");

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

// out[r][b] = scale * sum_t term(w[r][t], rows[t * stride + b]) for b < width and each of R weight
// vectors, over n rows, in register blocks across b (rows must be readable up to the next multiple of
// kLanes past width). Even and odd rows go to separate accumulators, so that narrow blocks are not bound
// by the add latency. The R weight vectors share each row's loads (the query heads of one key/value
// head read the same keys and values); each out[r] is computed exactly as it would be alone.
template <int R, typename Term>
void sum_rows(const double* const (&w)[R], int64_t n, const double* rows, int64_t stride, int64_t width,
              double scale, double* const (&out)[R], Term term) {
  for (int64_t b0 = 0; b0 < width; b0 += kBlock) {
    with_vectors(width - b0, [&](auto nv) {
      constexpr int64_t NV = decltype(nv)::value;
      Vec even[R][NV] = {}, odd[R][NV] = {};
      const auto add_row = [&](Vec(&acc)[R][NV], int64_t t) {
        const double* row = rows + t * stride + b0;
        Vec x[NV];
        for (int64_t j = 0; j < NV; ++j) x[j] = load(row + j * kLanes);
        for (int r = 0; r < R; ++r) {
          const Vec wt = broadcast(w[r][t]);
          for (int64_t j = 0; j < NV; ++j) acc[r][j] += term(wt, x[j]);
        }
      };
      int64_t t = 0;
      for (; t + 1 < n; t += 2) {
        add_row(even, t);
        add_row(odd, t + 1);
      }
      if (t < n) add_row(even, t);
      const bool whole = width - b0 >= NV * kLanes;  // the block's vectors all land inside out[r]
      for (int r = 0; r < R; ++r) {
        double block[NV * kLanes];
        for (int64_t j = 0; j < NV; ++j) {
          const Vec total = (even[r][j] + odd[r][j]) * scale;
          std::memcpy((whole ? out[r] + b0 : block) + j * kLanes, &total, sizeof total);
        }
        if (!whole) std::copy_n(block, width - b0, out[r] + b0);
      }
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

// The query heads that share a key/value head are processed together, up to kGroup at a time, so that
// each key and value loaded serves all of them (GQA; SmolLM2 has three query heads per kv head).
constexpr int kGroup = 3;

// Calls f(std::integral_constant<int, R>{}, h0) for runs of R <= kGroup query heads h0 .. h0 + R - 1
// that read the same key/value head, covering every head once, in order.
template <typename F>
inline void for_head_groups(const Heads& L, F&& f) {
  const int64_t rep = L.H / L.Hkv;
  for (int64_t h0 = 0; h0 < L.H;) {
    switch (std::min<int64_t>(kGroup, rep - h0 % rep)) {
      case 1:
        f(std::integral_constant<int, 1>{}, h0);
        h0 += 1;
        break;
      case 2:
        f(std::integral_constant<int, 2>{}, h0);
        h0 += 2;
        break;
      default:
        f(std::integral_constant<int, kGroup>{}, h0);
        h0 += kGroup;
    }
  }
}

// Per-thread scratch of one query row: its query, and per head of a group its scores (softmax weights)
// and two value sums.
struct RowScratch {
  int64_t keys, hdv;
  std::vector<double> q, s, u, u2;
  RowScratch(int64_t max_keys, const Heads& L)
      : keys(std::max<int64_t>(max_keys, 1)), hdv(L.hdv), q(L.H * L.hd), s(kGroup * keys), u(kGroup * hdv),
        u2(kGroup * hdv) {}
  double* scores(int r) { return s.data() + r * keys; }
  double* sum(int r) { return u.data() + r * hdv; }
  double* sum2(int r) { return u2.data() + r * hdv; }
};

// The keys idx (indices into pos) at non-NaN positions (a NaN position is never visible), stably
// sorted by position; already sorted keys (a document's, in order) cost one pass.
inline std::vector<int64_t> sorted_subset(const double* pos, const std::vector<int64_t>& idx) {
  std::vector<int64_t> order;
  order.reserve(idx.size());
  bool sorted = true;
  for (const int64_t j : idx) {
    if (pos[j] != pos[j]) continue;
    sorted = sorted && (order.empty() || pos[order.back()] <= pos[j]);
    order.push_back(j);
  }
  if (!sorted) std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return pos[a] < pos[b]; });
  return order;
}

template <typename T>
std::vector<int64_t> sorted_keys(const Keys<T>& K) {
  std::vector<int64_t> all(K.n);
  for (int64_t j = 0; j < K.n; ++j) all[j] = j;
  return sorted_subset(K.pos, all);
}

// The keys of order (indices into key_pos, sorted by position) that at least one of the m queries
// at pos_q can see: the union of their visible ranges. Full attention rows of a few queries then copy
// only their band. *pairs (when given) receives the number of visible (query, key) pairs.
inline std::vector<int64_t> visible_to_any(const double* key_pos, std::vector<int64_t> order, const double* pos_q,
                                           int64_t m, const Window& w, int64_t* pairs = nullptr) {
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<double> pos(n);
  for (int64_t c = 0; c < n; ++c) pos[c] = key_pos[order[c]];
  const auto after = [&](double x) { return std::upper_bound(pos.begin(), pos.end(), x) - pos.begin(); };
  std::vector<int64_t> cover(n + 1, 0);  // +1 where a query's range starts, -1 where it ends
  int64_t total = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (pos_q[i] != pos_q[i]) continue;  // a NaN query sees nothing
    const int64_t hi = after(pos_q[i]), lo = w.on ? std::min(hi, after(pos_q[i] - w.width)) : 0;
    cover[lo] += 1;
    cover[hi] -= 1;
    total += hi - lo;
  }
  int64_t depth = 0, kept = 0;
  for (int64_t c = 0; c < n; ++c) {
    depth += cover[c];
    if (depth > 0) order[kept++] = order[c];
  }
  order.resize(kept);
  if (pairs) *pairs = total;
  return order;
}

// Runs body(i, scratch) for i in [0, n) on torch's number of OpenMP threads with one scratch per
// thread; stays on one thread when the whole job is too small to pay for waking the others. Rows are
// handed out in chunks of about 4k work units as threads free up: the rows of one call can differ
// greatly in cost (the queries nearest an edit see all its changed keys, the farthest none), and
// halving the range statically left one thread with most of the work.
template <typename MakeScratch, typename Body>
void for_each_row(int64_t n, int64_t work_per_row, MakeScratch make_scratch, Body body) {
  const bool parallel = n > 1 && n * work_per_row >= (int64_t{1} << 16);
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 12) / std::max<int64_t>(1, work_per_row));
#pragma omp parallel if (parallel) num_threads(at::get_num_threads())
  {
    auto scratch = make_scratch();
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i) body(i, scratch);
  }
}

// One key set in float64, sorted by position (keys at NaN positions, never visible, are dropped):
// kt (Hkv, hd, n_pad) holds the keys transposed and v (Hkv, n, hdv_pad) the values, zero padded so
// that register blocks may read past the end.
struct KeyBlock {
  int64_t n, n_pad, hd, hdv, hdv_pad;
  Buffer<double> pos, kt, v;

  // The keys listed in order (indices into K, ascending by position; see sorted_keys).
  template <typename T>
  KeyBlock(const Keys<T>& K, const Heads& L, const std::vector<int64_t>& order)
      : n(static_cast<int64_t>(order.size())),
        n_pad(n + kBlock),
        hd(L.hd),
        hdv(L.hdv),
        hdv_pad(round_up(L.hdv, kLanes)),
        pos(n),
        kt(L.Hkv * L.hd * n_pad),
        v(L.Hkv * n * hdv_pad) {
    for (int64_t r = 0; r < L.Hkv * hd; ++r) std::fill(kt.begin() + r * n_pad + n, kt.begin() + (r + 1) * n_pad, 0.0);
    if (hdv_pad > hdv) {
      for (int64_t r = 0; r < L.Hkv * n; ++r) std::fill(v.begin() + r * hdv_pad + hdv, v.begin() + (r + 1) * hdv_pad, 0.0);
    }
    // In blocks of kBlock keys on the threads (a band of a few hundred keys or more is megabytes to write).
    for_each_row((n + kBlock - 1) / kBlock, kBlock * L.Hkv * (hd + hdv), [] { return 0; }, [&](int64_t b, int) {
      for (int64_t c = b * kBlock; c < std::min(n, (b + 1) * kBlock); ++c) {
        const int64_t j = order[c];
        pos[c] = K.pos[j];
        for (int64_t h = 0; h < L.Hkv; ++h) {
          const T* kj = K.k + (j * L.Hkv + h) * hd;
          for (int64_t d = 0; d < hd; ++d) kt[(h * hd + d) * n_pad + c] = static_cast<double>(kj[d]);
          convert(K.v + (j * L.Hkv + h) * hdv, hdv, v.data() + (h * n + c) * hdv_pad);
        }
      }
    });
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

  // s[r][c] = (q[r] . k_{lo + c}) * scale for the count keys of kv head h starting at lo, for R queries.
  template <int R>
  void scores(const double* const (&q)[R], int64_t h, int64_t lo, int64_t count, double scale,
              double* const (&s)[R]) const {
    sum_rows<R>(q, hd, kt.data() + h * hd * n_pad + lo, n_pad, count, scale, s,
                [](const Vec& qd, const Vec& k) { return qd * k; });
  }

  // For R queries: softmax weights at stabilizer m[r] over the count keys of kv head h starting at lo,
  // given their scores s[r] (overwritten with the weights): u[r] = sum_c p_c v_c and z[r] = sum_c p_c.
  template <int R>
  void accumulate(double* const (&s)[R], const double (&m)[R], int64_t h, int64_t lo, int64_t count,
                  double* const (&u)[R], double (&z)[R]) const {
    const double* p[R];
    for (int r = 0; r < R; ++r) {
      double* x = s[r];
      const double mr = m[r];
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) x[c] -= mr;
      exp_inplace(x, count);
      double total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t c = 0; c < count; ++c) total += x[c];
      z[r] = total;
      p[r] = x;
    }
    sum_rows<R>(p, count, v.data() + (h * n + lo) * hdv_pad, hdv_pad, hdv, 1.0, u,
                [](const Vec& w, const Vec& x) { return w * x; });
  }
};

// One full attention row: (U, Z, M) of query i over every visible key.
template <typename T>
void attention_row(int64_t i, const RowsInputs<T>& in, const KeyBlock& B, T* U, T* Z, T* M, RowScratch& S) {
  const Heads& L = in.L;
  const auto [lo, hi] = B.visible(in.pos_q[i], in.w);
  convert(in.q + i * L.H * L.hd, L.H * L.hd, S.q.data());
  for_head_groups(L, [&](auto group, int64_t h0) {
    constexpr int R = decltype(group)::value;
    const double* q[R];
    double *s[R], *u[R], m[R], z[R], sink[R];
    for (int r = 0; r < R; ++r) q[r] = S.q.data() + (h0 + r) * L.hd, s[r] = S.scores(r), u[r] = S.sum(r);
    const int64_t kv = L.kv(h0);
    B.scores<R>(q, kv, lo, hi - lo, in.scale, s);
    for (int r = 0; r < R; ++r) {
      sink[r] = in.sink_s ? static_cast<double>(in.sink_s[i * L.H + h0 + r]) : -kInf;
      m[r] = stored<T>(nan_max_of(s[r], hi - lo, sink[r]));
    }
    B.accumulate<R>(s, m, kv, lo, hi - lo, u, z);
    for (int r = 0; r < R; ++r) {
      const int64_t h = h0 + r, ih = i * L.H + h;
      if (in.sink_s) {  // the sink: one more always-visible key
        const double p = std::exp(sink[r] - m[r]);
        z[r] += p;
        for (int64_t d = 0; d < L.hdv; ++d) u[r][d] += p * static_cast<double>(in.sink_v[h * L.hdv + d]);
      }
      // Without a finite score the reference's softmax is exp(-inf - (-inf)) = NaN; so is ours.
      const bool none = m[r] == -kInf;
      if (none) std::fill_n(u[r], L.hdv, kNaN);
      convert(u[r], L.hdv, U + ih * L.hdv);
      Z[ih] = static_cast<T>(none ? kNaN : z[r]);
      M[ih] = static_cast<T>(m[r]);
    }
  });
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
  for_head_groups(L, [&](auto group, int64_t h0) {
    constexpr int G = decltype(group)::value;
    const double* q[G];
    double *s[G], *u[G], *u2[G], m[G], z[G], gone[G];
    for (int r = 0; r < G; ++r) {
      q[r] = S.q.data() + (h0 + r) * L.hd, s[r] = S.scores(r), u[r] = S.sum(r), u2[r] = S.sum2(r);
      m[r] = static_cast<double>(in.M[i * L.H + h0 + r]);
    }
    const int64_t kv = L.kv(h0);
    R.scores<G>(q, kv, rlo, rhi - rlo, in.scale, s);
    R.accumulate<G>(s, m, kv, rlo, rhi - rlo, u, gone);
    for (int r = 0; r < G; ++r) {
      const int64_t ih = i * L.H + h0 + r;
      z[r] = static_cast<double>(in.Z[ih]) - gone[r];
      const T* u_in = in.U + ih * L.hdv;
      double* ur = u[r];
#pragma omp simd
      for (int64_t d = 0; d < L.hdv; ++d) ur[d] = static_cast<double>(u_in[d]) - ur[d];
      refresh |= static_cast<T>(z[r]) < static_cast<T>(in.tau) * in.Z[ih];
    }
    if (in.add.n > 0) {
      A.scores<G>(q, kv, alo, ahi - alo, in.scale, s);
      double m_new[G], rescale[G], added[G];
      for (int r = 0; r < G; ++r) {
        m_new[r] = stored<T>(nan_max_of(s[r], ahi - alo, m[r]));
        rescale[r] = std::exp(m[r] - m_new[r]);
      }
      A.accumulate<G>(s, m_new, kv, alo, ahi - alo, u2, added);
      for (int r = 0; r < G; ++r) {
        z[r] = z[r] * rescale[r] + added[r];
        double* ur = u[r];
        const double *add = u2[r], c = rescale[r];
#pragma omp simd
        for (int64_t d = 0; d < L.hdv; ++d) ur[d] = ur[d] * c + add[d];
        m[r] = m_new[r];
      }
    }
    for (int r = 0; r < G; ++r) {
      const int64_t ih = i * L.H + h0 + r;
      convert(u[r], L.hdv, U + ih * L.hdv);
      Z[ih] = static_cast<T>(z[r]);
      M[ih] = static_cast<T>(m[r]);
    }
  });
  return refresh;
}

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

// Keeps the code of group vector ig when the certified radius its old one implies around a (remaining_radius)
// is positive (the code cannot have changed), storing that radius, and returns false; returns true, writing
// nothing, when it must be searched (a code outside [0, K) always is).
template <typename T>
bool must_search(int64_t ig, const RequantizeInputs<T>& in, int64_t* codes, T* radius) {
  const int64_t gd = in.gd, code = in.codes[ig];
  if (code < 0 || code >= in.K) return true;
  const T* a = in.a + ig * gd;
  const T* old = in.a_old + ig * gd;
  const T* e = in.codebook + ((ig % in.G) * in.K + code) * gd;
  double moved = 0, old2 = 0, new2 = 0;
#pragma omp simd reduction(+ : moved, old2, new2)
  for (int64_t d = 0; d < gd; ++d) {
    const double x = static_cast<double>(a[d]), o = static_cast<double>(old[d]), c = static_cast<double>(e[d]);
    moved += (x - o) * (x - o), old2 += (o - c) * (o - c), new2 += (x - c) * (x - c);
  }
  const T left = remaining_radius(in.radius[ig], moved, old2, new2);
  if (left > 0) {  // NaN-safe: anything uncertain is searched
    codes[ig] = in.codes[ig];
    radius[ig] = left;
    return false;
  }
  return true;
}

// Squared distance |a - e|^2 of two gd-vectors, in float64.
template <typename T>
inline double distance2(const T* a, const T* e, int64_t gd) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < gd; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(e[d]);
    s += diff * diff;
  }
  return s;
}

// Searches the group vectors todo (indices i * G + g) as vqt.quantize.nearest does: candidates from
// the expanded form |a|^2 - 2 a.e + |e|^2, whose dot products are one BLAS matmul per group; the two
// best are then recomputed directly (in float64) and ordered, and the radius subtracts nearest()'s
// margin for the expanded form's rounding.
// |e_k|^2 in float64 of the K codewords (gd wide) of one group.
template <typename T>
void codeword_norms(const T* cg, int64_t K, int64_t gd, double* e2) {
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < gd; ++d) s += static_cast<double>(cg[k * gd + d]) * static_cast<double>(cg[k * gd + d]);
    e2[k] = s;
  }
}

template <typename T>
void search_groups(const std::vector<int64_t>& todo, const RequantizeInputs<T>& in, int64_t* codes, T* radius,
                   const double* norms = nullptr) {
  const int64_t G = in.G, K = in.K, gd = in.gd;
  const auto opts = torch::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  for (int64_t g = 0; g < G; ++g) {
    std::vector<int64_t> mine;
    for (const int64_t ig : todo) {
      if (ig % G == g) mine.push_back(ig);
    }
    if (mine.empty()) continue;
    const int64_t n = static_cast<int64_t>(mine.size());
    const T* cg = in.codebook + g * K * gd;
    Tensor A = at::empty({n, gd}, opts);
    T* Ap = A.data_ptr<T>();
    for (int64_t t = 0; t < n; ++t) std::copy_n(in.a + mine[t] * gd, gd, Ap + t * gd);
    const Tensor E = at::from_blob(const_cast<T*>(cg), {K, gd}, opts);
    const Tensor dots = at::mm(A, E.t()).contiguous();  // (n, K)
    const T* dp = dots.data_ptr<T>();
    std::vector<double> own;
    const double* e2 = norms ? norms + g * K : nullptr;
    if (!e2) {
      own.resize(K);
      codeword_norms(cg, K, gd, own.data());
      e2 = own.data();
    }
    double e2max = 0;
    for (int64_t k = 0; k < K; ++k) e2max = nan_max(e2max, e2[k]);
    for_each_row(
        n, 4 * (K + gd), [&] { return std::vector<double>(K); },
        [&](int64_t t, std::vector<double>& dist) {
          const int64_t ig = mine[t];
          const T* a = in.a + ig * gd;
          double a2 = 0;
#pragma omp simd reduction(+ : a2)
          for (int64_t d = 0; d < gd; ++d) a2 += static_cast<double>(a[d]) * static_cast<double>(a[d]);
          for (int64_t k = 0; k < K; ++k) dist[k] = a2 - 2 * static_cast<double>(dp[t * K + k]) + e2[k];
          Top2 best = nearest_two(dist.data(), K);
          if (best.i1 != Top2::kNone) {  // the winners' distances, recomputed directly
            best.d1 = distance2(a, cg + best.i1 * gd, gd);
            if (best.i2 != Top2::kNone) {
              best.d2 = distance2(a, cg + best.i2 * gd, gd);
              // Canonical tie-break (as vqt.ops.search.nearest): the lower index among equal distances.
              if (Top2::before(best.d2, best.i2, best.d1, best.i1)) std::swap(best.d1, best.d2), std::swap(best.i1, best.i2);
            }
          }
          codes[ig] = best.code();
          radius[ig] = static_cast<T>(best.radius(a2, e2max, Eps<T>::value));
        });
  }
}

// Re-quantizes m rows of G group vectors (the requantize operator on raw arrays).
template <typename T>
void requantize_rows(const RequantizeInputs<T>& in, int64_t m, int64_t* cp, T* radp, bool* sp,
                     const double* norms = nullptr) {
  // The certified-radius checks (each reads and writes its own group vector only), then the group vectors
  // (i * G + g) outside their radius, in order.
  for_each_row(m * in.G, 3 * in.gd, [] { return 0; }, [&](int64_t ig, int) { sp[ig] = must_search(ig, in, cp, radp); });
  std::vector<int64_t> todo;
  for (int64_t ig = 0; ig < m * in.G; ++ig) {
    if (sp[ig]) todo.push_back(ig);
  }
  search_groups(todo, in, cp, radp, norms);
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
                                                  double scale, const std::optional<Tensor>& sink_s,
                                                  const std::optional<Tensor>& sink_v) {
  VQT_CHECK_CPU(q);
  const Heads L = check_attention_rows(q, pos_q, k, v, pos_k);
  check_sink(sink_s, sink_v, q.size(0), L, q.scalar_type(), q.device());
  Tensor U, Z, M;
  std::tie(U, Z, M) = empty_accumulators(q, L);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vqt_attention_rows_cpu", [&] {
    using T = scalar_t;
    const auto in = rows_inputs<T>(q, pos_q, k, v, pos_k, L, window, scale, sink_s, sink_v);
    const KeyBlock keys(in.keys, L, visible_to_any(in.keys.pos, sorted_keys(in.keys), in.pos_q, q.size(0), in.w));
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

std::tuple<Tensor, Tensor, Tensor> requantize(const Tensor& a, const Tensor& codebook, const Tensor& codes,
                                              const Tensor& a_old, const Tensor& radius) {
  VQT_CHECK_CPU(a);
  check_requantize(a, codebook, codes, a_old, radius);
  const int64_t m = a.size(0), G = a.size(1);
  Tensor codes2 = at::empty_like(codes), radius2 = at::empty_like(radius);
  Tensor searched = at::empty({m, G}, codes.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "vqt_requantize_cpu", [&] {
    using T = scalar_t;
    const auto in = requantize_inputs<T>(a, codebook, codes, a_old, radius);
    requantize_rows(in, m, codes2.data_ptr<int64_t>(), radius2.data_ptr<T>(), searched.data_ptr<bool>());
  });
  return {codes2, radius2, searched};
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


// ------------------------------------------------------------------------------------------------
// layer_attend: one layer's attention step of an incremental update, on the engine's slot tables, in
// one call. Semantics and argument meanings: vqt/ops/composite.py layer_attend. Rows are gathered
// from the tables into the row kernels above and scattered back; nothing else is copied.

struct Slots {  // a list of slot indices, checked against the table capacity
  const int64_t* p;
  int64_t n;
  int64_t operator[](int64_t i) const { return p[i]; }
};

inline Slots slots_of(const Tensor& t, const char* name, int64_t capacity) {
  check_tensor(t, name, 1, torch::kLong, t.device());
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < capacity, name, " holds slot ", p[i], " outside [0, ", capacity, ")");
  }
  return {p, t.numel()};
}

// dst[i] = src[idx[i]] for rows of `width` elements.
template <typename T>
void gather_rows(const T* src, const std::vector<int64_t>& idx, int64_t width, T* dst) {
  for (size_t i = 0; i < idx.size(); ++i) std::copy_n(src + idx[i] * width, width, dst + i * width);
}

template <typename T>
void scatter_rows(const T* src, const std::vector<int64_t>& idx, int64_t width, T* dst) {
  for (size_t i = 0; i < idx.size(); ++i) std::copy_n(src + i * width, width, dst + idx[i] * width);
}

// What one layer step did (vqt.ops.tables.LayerCounts, by field name).
struct Counts {
  int64_t dirty = 0, affected = 0, flipped = 0, code_flips = 0, searches = 0, skips = 0, refreshes = 0,
          delta_pairs = 0, full_pairs = 0, full_rows = 0, skip_checks = 0, mlp_rows = 0;

  py::dict to_dict() const {
    py::dict d;
    d["dirty"] = dirty, d["affected"] = affected, d["flipped"] = flipped, d["code_flips"] = code_flips;
    d["searches"] = searches, d["skips"] = skips, d["refreshes"] = refreshes, d["delta_pairs"] = delta_pairs;
    d["full_pairs"] = full_pairs, d["full_rows"] = full_rows, d["skip_checks"] = skip_checks;
    d["mlp_rows"] = mlp_rows;
    return d;
  }
};

// fn(c) for each index covered by one of the spans [lo, hi), once each and in ascending order.
template <typename F>
void for_each_covered(std::vector<std::pair<int64_t, int64_t>> spans, F&& fn) {
  std::sort(spans.begin(), spans.end());
  int64_t done = 0;
  for (const auto& [lo, hi] : spans) {
    for (int64_t c = std::max(lo, done); c < hi; ++c) fn(c);
    done = std::max(done, hi);
  }
}

// Named fields of the Python records (vqt/ops/tables.py): the seam is by name, never by position.
Tensor field(const py::handle& o, const char* name) { return o.attr(name).cast<Tensor>(); }
std::optional<Tensor> optional_field(const py::handle& o, const char* name) {
  const py::object a = o.attr(name);
  return a.is_none() ? std::nullopt : std::optional<Tensor>(a.cast<Tensor>());
}
std::optional<double> optional_number(const py::handle& o, const char* name) {
  const py::object a = o.attr(name);
  return a.is_none() ? std::nullopt : std::optional<double>(a.cast<double>());
}

// layer_attend with, optionally, the codebook's codeword norms precomputed by codebook_norms, and an
// attention sink: the per-slot sink scores (C, H), the dirty rows' new ones (m, H) and the value each
// query head reads (H, hdv).
std::tuple<Tensor, Tensor, Counts> attend_impl(
    Tensor q, Tensor k, Tensor v, Tensor U, Tensor Z, Tensor M, Tensor codes, Tensor radius,
    const Tensor& q_new, const Tensor& k_new, const Tensor& v_new, const Tensor& dirty_t, const Tensor& deleted_t,
    const Tensor& order_t, const Tensor& pos_t, const Tensor& old_pos_t, const Tensor& is_new_t,
    const std::optional<Tensor>& codebook, const std::optional<Tensor>& table, std::optional<double> window,
    double scale, double tau, const std::optional<Tensor>& norms, const std::optional<Tensor>& sink,
    const std::optional<Tensor>& s_new, const std::optional<Tensor>& sink_v, const std::optional<Tensor>& pos_order_t,
    const std::optional<Tensor>& drift, double drift_budget) {
  VQT_CHECK_CPU(q);
  const auto dt = q.scalar_type();
  const auto dev = q.device();
  check_float(q, "q");
  const int64_t C = q.size(0);
  for (const auto& [t, name, dims] : {std::tuple{&q, "q", 3}, {&k, "k", 3}, {&v, "v", 3}, {&U, "U", 3}, {&Z, "Z", 2},
                                      {&M, "M", 2}, {&radius, "radius", 2}}) {
    check_tensor(*t, name, dims, dt, dev);
    TORCH_CHECK(t->size(0) == C, name, " must have one row per slot (", C, "), got ", t->sizes());
  }
  const Heads L{q.size(1), k.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(L.Hkv > 0 && L.H % L.Hkv == 0, "query heads (", L.H, ") must be a multiple of key/value heads (", L.Hkv,
              ")");
  check_tensor(codes, "codes", 2, torch::kLong, dev);
  check_tensor(pos_t, "pos", 1, torch::kDouble, dev);
  check_tensor(old_pos_t, "old_pos", 1, torch::kDouble, dev);
  check_tensor(is_new_t, "is_new", 1, torch::kBool, dev);
  TORCH_CHECK(pos_t.size(0) == C && old_pos_t.size(0) == C && is_new_t.size(0) == C && codes.size(0) == C,
              "pos, old_pos, is_new and codes must have one entry per slot (", C, ")");
  const Slots dirty = slots_of(dirty_t, "dirty", C), deleted = slots_of(deleted_t, "deleted", C);
  // The order is only read where an edit reaches (each slot read is checked there), not scanned.
  check_tensor(order_t, "order", 1, torch::kLong, dev);
  const int64_t n_order = order_t.numel();
  const int64_t* order_p = order_t.data_ptr<int64_t>();
  const auto order_at = [&](int64_t c) {
    const int64_t s = order_p[c];
    TORCH_CHECK(s >= 0 && s < C, "order holds slot ", s, " outside [0, ", C, ")");
    return s;
  };
  if (pos_order_t) {
    check_tensor(*pos_order_t, "pos_order", 1, torch::kDouble, torch::Device(torch::kCPU));
    TORCH_CHECK(pos_order_t->size(0) == n_order, "pos_order must have one entry per token of order (", n_order,
                "), got ", pos_order_t->size(0));
  }
  if (drift) {
    check_tensor(*drift, "drift", 2, dt, dev);
    TORCH_CHECK(drift->size(0) == C && drift->size(1) == L.H, "drift must be (", C, ", ", L.H, "), got ",
                drift->sizes());
  }
  const int64_t m = dirty.n, G = radius.size(1), gd = G > 0 ? L.H * L.hdv / G : 0;
  TORCH_CHECK(k.size(2) == L.hd && v.size(1) == L.Hkv && U.size(1) == L.H && U.size(2) == L.hdv &&
                  Z.size(1) == L.H && M.size(1) == L.H,
              "the slot tables disagree on head shapes: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ", U ",
              U.sizes(), ", Z ", Z.sizes(), ", M ", M.sizes());
  TORCH_CHECK(G * gd == L.H * L.hdv && codes.size(1) == G && radius.size(1) == G,
              "codes and radius must split the attention output into (G, gd) groups");
  for (const auto& [t, table_t, name] :
       {std::tuple{&q_new, &q, "q_new"}, {&k_new, &k, "k_new"}, {&v_new, &v, "v_new"}}) {
    check_tensor(*t, name, 3, dt, dev);
    TORCH_CHECK(t->size(0) == m && t->sizes().slice(1) == table_t->sizes().slice(1), name, " must be (", m,
                ", ", table_t->sizes().slice(1), ") (one row per dirty slot), got ", t->sizes());
  }
  TORCH_CHECK(codebook.has_value() == table.has_value(), "codebook and table come together (or neither)");
  if (codebook) {
    const Tensor no_rows = at::empty({0, G, gd}, q.options());
    check_requantize(no_rows, *codebook, codes.narrow(0, 0, 0), no_rows, radius.narrow(0, 0, 0));
    check_tensor(*table, "table", 3, dt, dev);
    TORCH_CHECK(table->size(0) == G && table->size(1) == codebook->size(1), "table must be (G, K, d)");
    if (norms) {
      check_tensor(*norms, "codebook_norms", 2, torch::kDouble, dev);
      TORCH_CHECK(norms->size(0) == G && norms->size(1) == codebook->size(1), "codebook_norms must be (G, K)");
    }
  }
  TORCH_CHECK(sink.has_value() == s_new.has_value() && sink.has_value() == sink_v.has_value(),
              "the sink table, the new sink scores and the sink values come together (or none)");
  if (sink) {
    check_tensor(*sink, "sink", 2, dt, dev);
    TORCH_CHECK(sink->size(0) == C && sink->size(1) == L.H, "sink must be (", C, ", ", L.H, "), got ", sink->sizes());
    check_sink(s_new, sink_v, m, L, dt, dev);
  }
  const Window w = window_of(window);
  const double* P = pos_t.data_ptr<double>();
  const double* P0 = old_pos_t.data_ptr<double>();
  const bool* is_new = is_new_t.data_ptr<bool>();
  const int64_t qw = L.H * L.hd, kw = L.Hkv * L.hd, vw = L.Hkv * L.hdv, uw = L.H * L.hdv;

  Tensor post_t, attn_out;
  Counts stats;
  AT_DISPATCH_FLOATING_TYPES(dt, "vqt_layer_attend_cpu", [&] {
    using T = scalar_t;
    T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *Up = U.data_ptr<T>(),
      *Zp = Z.data_ptr<T>(), *Mp = M.data_ptr<T>();
    // Removed keys (deleted slots, then the old entries of existing dirty ones) are copied before the
    // new rows overwrite them; added keys are the new rows.
    std::vector<int64_t> rem(deleted.p, deleted.p + deleted.n);
    for (int64_t i = 0; i < m; ++i) {
      if (!is_new[dirty[i]]) rem.push_back(dirty[i]);
    }
    const KeyBlock removed(Keys<T>{kp, vp, P0, C}, L, sorted_subset(P0, rem));
    std::vector<double> pos_add(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t s = dirty[i];
      std::copy_n(q_new.data_ptr<T>() + i * qw, qw, qp + s * qw);
      std::copy_n(k_new.data_ptr<T>() + i * kw, kw, kp + s * kw);
      std::copy_n(v_new.data_ptr<T>() + i * vw, vw, vp + s * vw);
      if (sink) std::copy_n(s_new->data_ptr<T>() + i * L.H, L.H, sink->data_ptr<T>() + s * L.H);
      pos_add[i] = P[s];
    }
    const KeyBlock added(Keys<T>{k_new.data_ptr<T>(), v_new.data_ptr<T>(), pos_add.data(), m}, L);
    phase_clock.mark(kChangedKeys);

    // Clean queries whose visible key set changed, in document order. Positions along order are sorted
    // (the plan's pos_order; gathered here, O(n), when the plan has none). With a window, a query at p
    // can see a key at r only if r <= p < r + window, so only the queries in those index spans are
    // checked: O(edit) work. (With a window every query whose position changed is dirty.) Without one,
    // every query after the first changed key is checked.
    std::vector<double> gathered;
    const double* po = pos_order_t ? pos_order_t->data_ptr<double>() : nullptr;
    if (!po) {
      gathered.resize(n_order);
      for (int64_t c = 0; c < n_order; ++c) gathered[c] = P[order_at(c)];
      po = gathered.data();
    }
    const auto first_after = [&](double x) { return std::upper_bound(po, po + n_order, x) - po; };
    std::vector<int64_t> dirty_sorted(dirty.p, dirty.p + m);
    std::sort(dirty_sorted.begin(), dirty_sorted.end());
    const auto is_dirty = [&](int64_t s) { return std::binary_search(dirty_sorted.begin(), dirty_sorted.end(), s); };
    std::vector<std::pair<int64_t, int64_t>> reach;
    if (w.on) {
      for (const KeyBlock* keys : {&removed, &added}) {
        for (const double r : keys->pos) {
          const int64_t lo = std::lower_bound(po, po + n_order, r) - po, hi = first_after(r + 2 * w.width);
          if (lo < hi) reach.emplace_back(lo, hi);
        }
      }
    } else {
      reach.emplace_back(0, n_order);
    }
    // A delta update costs one (query, key) pair per removed or added key the query sees, a full row
    // one per key it sees now: a query that sees more changed keys than keys is recomputed in full
    // (the cheaper path; both are exact). The others (upd) get the delta update.
    std::vector<int64_t> aff, upd, cheaper;
    int64_t delta_pairs = 0;
    for_each_covered(std::move(reach), [&](int64_t c) {
      const int64_t s = order_at(c);
      if (is_dirty(s)) return;
      const auto [rlo, rhi] = removed.visible(P0[s], w);
      const auto [alo, ahi] = added.visible(P[s], w);
      const int64_t hits = (rhi - rlo) + (ahi - alo);
      if (hits > 0) {
        aff.push_back(s);
        const int64_t sees = first_after(P[s]) - (w.on ? first_after(P[s] - w.width) : 0);
        if (hits > sees) {
          cheaper.push_back(s);
        } else {
          upd.push_back(s);
          delta_pairs += hits;
        }
      }
    });
    const int64_t na = static_cast<int64_t>(upd.size()), n_aff = static_cast<int64_t>(aff.size());
    phase_clock.mark(kAffectedRows);

    // The rows whose attention output changes (dirty ones, then the affected ones) and their output
    // a = U / Z, here before the change (the certified radii shrink by how far it moves) and at the end after.
    std::vector<int64_t> rows(dirty.p, dirty.p + m);
    rows.insert(rows.end(), aff.begin(), aff.end());
    const int64_t nr = static_cast<int64_t>(rows.size());
    const auto outputs = [&] {
      Buffer<T> a(nr * uw);
      for_each_row(nr, uw, [] { return 0; }, [&](int64_t r, int) {
        const int64_t s = rows[r];
        for (int64_t h = 0; h < L.H; ++h) {
          for (int64_t d = 0; d < L.hdv; ++d) a[(r * L.H + h) * L.hdv + d] = Up[(s * L.H + h) * L.hdv + d] / Zp[s * L.H + h];
        }
      });
      return a;
    };
    const Buffer<T> a_old = codebook ? outputs() : Buffer<T>();

    // Exact delta updates of the affected rows, in place in the slot tables: row i's inputs and outputs are
    // the slot's own (delta_row reads each head's accumulators before it writes them), so nothing is
    // gathered or scattered. The drift bound of each row (as vqt/ops/layer.py drift_after_delta) is formed
    // from its old (Z, M), kept in the row's scratch, and its new ones.
    std::vector<int64_t> refresh;
    if (na) {
      std::vector<char> flags(na);
      T* dp = drift ? drift->data_ptr<T>() : nullptr;
      const double eps = std::numeric_limits<T>::epsilon();
      for_each_row(
          na, (removed.n + added.n) * L.H * (L.hd + L.hdv),
          [&] { return std::pair{RowScratch(std::max(removed.n, added.n), L), std::vector<T>(2 * L.H)}; },
          [&](int64_t i, auto& scratch) {
            const int64_t s = upd[i];
            T *Us = Up + s * uw, *Zs = Zp + s * L.H, *Ms = Mp + s * L.H;
            T* old = scratch.second.data();  // (Z, M) before the update: what the drift bound rescales
            if (dp) std::copy_n(Zs, L.H, old), std::copy_n(Ms, L.H, old + L.H);
            const DeltaInputs<T> in{qp + s * qw, Us, Zs, Ms, P0 + s, P + s,
                                    Keys<T>{nullptr, nullptr, nullptr, removed.n},
                                    Keys<T>{nullptr, nullptr, nullptr, added.n}, L, w, scale, tau};
            bool flag = delta_row(0, in, removed, added, Us, Zs, Ms, scratch.first);
            if (dp) {
              for (int64_t h = 0; h < L.H; ++h) {
                T& bound = dp[s * L.H + h];
                const double carried = static_cast<double>(old[h]) *
                                       std::exp(static_cast<double>(old[L.H + h]) - static_cast<double>(Ms[h])) /
                                       static_cast<double>(Zs[h]);
                bound = static_cast<T>(static_cast<double>(bound) * std::abs(carried) + eps);
                if (!(static_cast<double>(bound) <= drift_budget)) flag = true;
              }
            }
            flags[i] = flag;
          });
      for (int64_t i = 0; i < na; ++i) {
        if (flags[i]) refresh.push_back(upd[i]);
      }
    }

    phase_clock.mark(kDeltaRows);
    // Full rows (dirty queries, guarded refreshes and the cheaper ones) against the band of keys they can see.
    std::vector<int64_t> full(dirty.p, dirty.p + m);
    full.insert(full.end(), refresh.begin(), refresh.end());
    full.insert(full.end(), cheaper.begin(), cheaper.end());
    const int64_t nf = static_cast<int64_t>(full.size());
    int64_t full_pairs = 0;
    if (nf) {
      Buffer<double> pf(nf);
      for (int64_t i = 0; i < nf; ++i) pf[i] = P[full[i]];
      // The band of keys some full row can see: the union of their visible index spans along order.
      std::vector<std::pair<int64_t, int64_t>> seen;
      for (int64_t i = 0; i < nf; ++i) {
        if (pf[i] != pf[i]) continue;  // a NaN query sees nothing
        const int64_t hi = first_after(pf[i]), lo = w.on ? std::min(hi, first_after(pf[i] - w.width)) : 0;
        full_pairs += hi - lo;
        if (lo < hi) seen.emplace_back(lo, hi);
      }
      std::vector<int64_t> band_slots;
      for_each_covered(std::move(seen), [&](int64_t c) { band_slots.push_back(order_at(c)); });
      const KeyBlock band(Keys<T>{kp, vp, P, C}, L, band_slots);
      if (drift) {
        for (const int64_t s : full) std::fill_n(drift->data_ptr<T>() + s * L.H, L.H, T(0));
      }
      // Each row reads its query (and sink scores) from its slot and writes its accumulators there.
      const T* sp = sink ? sink->data_ptr<T>() : nullptr;
      for_each_row(
          nf, band.n * L.H * (L.hd + L.hdv), [&] { return RowScratch(band.n, L); },
          [&](int64_t i, RowScratch& S) {
            const int64_t s = full[i];
            const RowsInputs<T> in{qp + s * qw, pf.data() + i, Keys<T>{nullptr, nullptr, nullptr, band.n}, L, w,
                                   scale, sp ? sp + s * L.H : nullptr, sink ? sink_v->data_ptr<T>() : nullptr};
            attention_row(0, in, band, Up + s * uw, Zp + s * L.H, Mp + s * L.H, S);
          });
    }

    phase_clock.mark(kFullRows);
    // Re-quantize every row whose attention output changed.
    Buffer<T> a = outputs();
    std::vector<int64_t> post(dirty.p, dirty.p + m);
    if (!codebook) {  // a dense twin's layer: every updated output moved; they are returned for W_o
      post.insert(post.end(), aff.begin(), aff.end());
      stats.flipped = stats.code_flips = n_aff;
      attn_out = at::empty({nr, uw}, q.options());
      std::copy(a.begin(), a.end(), attn_out.data_ptr<T>());
    } else {
      T* radp = radius.data_ptr<T>();
      int64_t* cp = codes.data_ptr<int64_t>();
      for (int64_t i = 0; i < m; ++i) {
        if (is_new[dirty[i]]) std::fill_n(radp + dirty[i] * G, G, -std::numeric_limits<T>::infinity());
      }
      std::vector<int64_t> codes_r(nr * G), codes2(nr * G);
      std::vector<T> rad_r(nr * G), rad2(nr * G);
      std::unique_ptr<bool[]> searched(new bool[nr * G]);
      gather_rows(cp, rows, G, codes_r.data());
      gather_rows(radp, rows, G, rad_r.data());
      const RequantizeInputs<T> in{a.data(), codebook->data_ptr<T>(), a_old.data(), rad_r.data(), codes_r.data(),
                                   G, codebook->size(1), gd};
      requantize_rows(in, nr, codes2.data(), rad2.data(), searched.get(), norms ? norms->data_ptr<double>() : nullptr);
      scatter_rows(codes2.data(), rows, G, cp);
      scatter_rows(rad2.data(), rows, G, radp);
      int64_t n_searched = 0, skips = 0, existing = 0, code_flips = 0;
      for (int64_t r = 0; r < nr; ++r) {
        const bool old_row = !is_new[rows[r]];
        existing += old_row;
        for (int64_t g = 0; g < G; ++g) {
          n_searched += searched[r * G + g] != 0;
          skips += old_row && !searched[r * G + g];
        }
      }
      for (int64_t i = 0; i < n_aff; ++i) {
        int64_t changed = 0;
        for (int64_t g = 0; g < G; ++g) changed += codes2[(m + i) * G + g] != codes_r[(m + i) * G + g];
        code_flips += changed;
        if (changed) post.push_back(aff[i]);
      }
      stats.flipped = static_cast<int64_t>(post.size()) - m, stats.code_flips = code_flips;
      stats.searches = n_searched, stats.skips = skips, stats.skip_checks = existing * G;
      const int64_t K = table->size(1), d = table->size(2);
      attn_out = at::empty({static_cast<int64_t>(post.size()), d}, table->options());
      const T* tp = table->data_ptr<T>();
      T* op = attn_out.data_ptr<T>();
      for (size_t i = 0; i < post.size(); ++i) {
        for (int64_t g = 0; g < G; ++g) TORCH_CHECK(cp[post[i] * G + g] >= 0 && cp[post[i] * G + g] < K, "code out of range");
        lookup_row(0, tp, cp + post[i] * G, G, K, d, op + i * d);
      }
    }
    stats.dirty = m, stats.affected = n_aff, stats.refreshes = static_cast<int64_t>(refresh.size());
    stats.delta_pairs = delta_pairs, stats.full_pairs = full_pairs, stats.full_rows = nf;
    post_t = at::empty({static_cast<int64_t>(post.size())}, dirty_t.options());
    std::copy(post.begin(), post.end(), post_t.data_ptr<int64_t>());
  });
  return {post_t, attn_out, stats};
}

// layer_attend on named records: w (LayerWeights), t (LayerTables), plan (EditPlan); see
// vqt/ops/composite.py layer_attend. Returns (post, attn_out or None, counts by name).
py::tuple layer_attend(const py::object& w, const py::object& t, const Tensor& q_new, const Tensor& k_new,
                       const Tensor& v_new, const std::optional<Tensor>& s_new, const Tensor& dirty,
                       const py::object& plan) {
  const auto sink_v = optional_field(w, "sink_v");  // (H, hdv), one row per query head
  auto [post, attn_out, counts] = attend_impl(
      field(t, "q"), field(t, "k"), field(t, "v"), field(t, "U"), field(t, "Z"), field(t, "M"), field(t, "codes"), field(t, "radius"), q_new, k_new, v_new, dirty, field(plan, "deleted"), field(plan, "order"),
      field(plan, "pos"), field(plan, "old_pos"), field(plan, "is_new"), optional_field(w, "codebook"),
      optional_field(w, "table"), optional_number(plan, "window"), w.attr("scale").cast<double>(),
      plan.attr("tau").cast<double>(), optional_field(w, "codebook_norms"), optional_field(t, "sink"), s_new, sink_v,
      optional_field(plan, "pos_order"), optional_field(t, "drift"), plan.attr("drift_budget").cast<double>());
  return py::make_tuple(post, attn_out.defined() ? py::cast(attn_out) : py::none(), counts.to_dict());
}

// (G, K) float64 |e_k|^2 of a (G, K, gd) codebook, as layer_attend computes them for its searches.
Tensor codebook_norms(const Tensor& codebook) {
  VQT_CHECK_CPU(codebook);
  check_float(codebook, "codebook");
  check_tensor(codebook, "codebook", 3, codebook.scalar_type(), codebook.device());
  const int64_t G = codebook.size(0), K = codebook.size(1), gd = codebook.size(2);
  Tensor out = at::empty({G, K}, codebook.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(codebook.scalar_type(), "vqt_codebook_norms_cpu", [&] {
    for (int64_t g = 0; g < G; ++g) {
      codeword_norms(codebook.data_ptr<scalar_t>() + g * K * gd, K, gd, out.data_ptr<double>() + g * K);
    }
  });
  return out;
}

// layer_commit (semantics: vqt/ops/composite.py layer_commit): stores the recomputed rows and returns
// the slots whose row changed bitwise, or that are new or forced.
Tensor commit_impl(Tensor target, const Tensor& post_t, const Tensor& x_next, const Tensor& is_new_t,
                   const Tensor& is_forced_t) {
  VQT_CHECK_CPU(target);
  check_float(target, "target");
  const int64_t C = target.size(0);
  check_tensor(target, "target", 2, target.scalar_type(), target.device());
  const Slots post = slots_of(post_t, "post", C);
  const int64_t d = target.size(1);
  check_tensor(x_next, "x_next", 2, target.scalar_type(), target.device());
  TORCH_CHECK(x_next.size(0) == post.n && x_next.size(1) == d, "x_next must be (", post.n, ", ", d, "), got ",
              x_next.sizes());
  check_tensor(is_new_t, "is_new", 1, torch::kBool, target.device());
  check_tensor(is_forced_t, "is_forced", 1, torch::kBool, target.device());
  TORCH_CHECK(is_new_t.size(0) == C && is_forced_t.size(0) == C, "is_new and is_forced must have one entry per slot (",
              C, ")");
  const bool *is_new = is_new_t.data_ptr<bool>(), *is_forced = is_forced_t.data_ptr<bool>();
  std::vector<int64_t> next;
  AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "vqt_layer_commit_cpu", [&] {
    using T = scalar_t;
    T* tp = target.data_ptr<T>();
    const T* xp = x_next.data_ptr<T>();
    for (int64_t i = 0; i < post.n; ++i) {
      const int64_t s = post[i];
      T* row = tp + s * d;
      const T* x = xp + i * d;
      bool moved = is_new[s];
      for (int64_t c = 0; c < d; ++c) moved |= !(row[c] == x[c]);  // (as x != row: NaN always differs)
      std::copy_n(x, d, row);
      if (moved || is_forced[s]) next.push_back(s);
    }
  });
  Tensor out = at::empty({static_cast<int64_t>(next.size())}, post_t.options());
  std::copy(next.begin(), next.end(), out.data_ptr<int64_t>());
  return out;
}

// The last layer's commit (semantics: vqt/ops/composite.py finish_outputs), with the same ATen operators
// in the same order, so the hidden states and pooled sum are bitwise those of the composite: final
// RMSNorm of the recomputed rows x_last of slots rows, stored where it changed bitwise (new rows always),
// the pooled sum kept up to date. final: a FinalNorm, plan: an EditPlan. Returns the changed slots.
Tensor finish_outputs(const py::object& final, const Tensor& rows, const Tensor& x_last, const py::object& plan) {
  Tensor hidden = field(final, "hidden"), pooled_sum = field(final, "pooled_sum");
  const Tensor weight = field(final, "weight"), is_new = field(plan, "is_new"), deleted = field(plan, "deleted");
  VQT_CHECK_CPU(hidden);
  const Slots post = slots_of(rows, "rows", hidden.size(0));
  if (post.n == 0 && deleted.numel() == 0) return rows;  // nothing changed (the composite adds and subtracts zeros)
  const Tensor new_at = is_new.index({rows}), before = hidden.index({rows});
  const Tensor after = at::rms_norm(x_last, weight.sizes(), weight, final.attr("eps").cast<double>());
  const Tensor changed = at::logical_or(after.ne(before).any(-1), new_at);
  pooled_sum.sub_(hidden.index({deleted}).sum(0) + before.index({at::logical_and(changed, at::logical_not(new_at))}).sum(0));
  pooled_sum.add_(after.index({changed}).sum(0));
  const Tensor out = rows.index({changed});
  hidden.index_put_({out}, after.index({changed}));
  return out;
}

// layer_commit (semantics: vqt/ops/composite.py layer_commit): records the recomputed slots in the plan
// (plan.posts), then stores the rows into the next layer's input table, or after the last layer into a
// FinalNorm (finish_outputs).
Tensor layer_commit(const py::object& target, const Tensor& post, const Tensor& x_next, const py::object& plan) {
  plan.attr("posts").attr("append")(post);
  if (py::hasattr(target, "pooled_sum")) return finish_outputs(target, post, x_next, plan);
  return commit_impl(target.cast<Tensor>(), post, x_next, field(plan, "is_new"), field(plan, "is_forced"));
}

// RoPE of the dirty rows (vqt/ops/layer.py rope: x * cos + cat(-x2, x1) * sin, rotate-half) without
// ATen's per-op overhead, bitwise: each product and the sum are rounded separately as the three ATen
// ops round them (no fused multiply-add: this function is compiled without contraction). qk: (m, heads,
// hd) rows of a wider tensor (qkv: the first H heads are q, the next Hkv k); cos, sin: (m, 1, hd), one row
// per row of qkv, or null (no RoPE: q and k are copied). Writes q (m, H, hd) and k (m, Hkv, hd).
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rope_rows(const T* qkv, int64_t row_stride, int64_t m, int64_t H,
                                                              int64_t Hkv, int64_t hd, const T* cos, const T* sin,
                                                              T* q, T* k) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < m; ++i) {
    const T* c = cos ? cos + i * hd : nullptr;
    const T* s = sin ? sin + i * hd : nullptr;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      const T* x = qkv + i * row_stride + h * hd;
      T* o = h < H ? q + (i * H + h) * hd : k + (i * Hkv + h - H) * hd;
      if (!c) {
        std::copy_n(x, hd, o);
        continue;
      }
      for (int64_t d = 0; d < half; ++d) o[d] = x[d] * c[d] + (-x[d + half]) * s[d];
      for (int64_t d = half; d < hd; ++d) o[d] = x[d] * c[d] + x[d - half] * s[d];
    }
  }
}

// out[i] = a[rows[i]] + b[i] for rows of width d (as ATen's index_select then add: one rounding each);
// rows null: out[i] = a[i] + b[i].
template <typename T>
void gather_add(const T* a, const int64_t* rows, const T* b, int64_t n, int64_t d, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* ar = a + (rows ? rows[i] : i) * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = ar[c] + b[i * d + c];
  }
}

// The row count a bfloat16 product of m rows runs at (vqt.ops.layer.product_rows: the same buckets).
inline int64_t product_rows(int64_t m) {
  const int64_t step = m <= 64 ? 8 : m <= 256 ? 16 : 64;
  return m <= 8 ? m : (m + step - 1) / step * step;
}

// As vqt.ops.layer.linear: the product in w's dtype (bfloat16 weights: x rounded to it, its rows padded with
// zeros to product_rows, the result returned in x's dtype). For float32 rows and bfloat16 weights (the
// shipped models) the two conversions run here, one pass each, with ATen's roundings (float to bfloat16 to
// nearest even, bfloat16 to float exactly), in place of ATen's convert, pad, slice and convert operators.
Tensor project(const Tensor& x, const Tensor& w) {
  if (w.scalar_type() == x.scalar_type()) return at::linear(x, w);
  const int64_t m = x.size(0), padded = product_rows(m);
  if (w.scalar_type() != torch::kBFloat16 || x.scalar_type() != torch::kFloat || x.dim() != 2) {
    Tensor rows = x.to(w.scalar_type());
    if (padded != m) rows = at::cat({rows, at::zeros({padded - m, rows.size(1)}, rows.options())});
    return at::linear(rows, w).narrow(0, 0, m).to(x.scalar_type());
  }
  const Tensor xc = x.contiguous();
  const int64_t k = xc.size(1);
  Tensor rows = at::empty({padded, k}, xc.options().dtype(torch::kBFloat16));
  const float* xp = xc.data_ptr<float>();
  c10::BFloat16* rp = rows.data_ptr<c10::BFloat16>();
  at::parallel_for(0, m * k, 1 << 15, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) rp[i] = c10::BFloat16(xp[i]);
  });
  std::fill(rp + m * k, rp + padded * k, c10::BFloat16(0.0f));
  const Tensor product = at::linear(rows, w).contiguous();
  Tensor out = at::empty({m, product.size(1)}, xc.options());
  const c10::BFloat16* pp = product.data_ptr<c10::BFloat16>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 1 << 15, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) op[i] = static_cast<float>(pp[i]);
  });
  return out;
}

// layer_step: a whole quantized layer of an incremental update in one call, for the Llama-style block
// of vqt/modeling/model.py: RMSNorm -> fused q/k/v projection -> sink scores from the raw queries ->
// RoPE (rotate-half, of the dirty rows' positions) on the dirty rows, layer_attend, then y = x +
// lookup (+ W_corr RMSNorm(x) for quantize-then-correct), x' = y + W_down(silu(gate) * up) of RMSNorm(y) on the rows it returns, and layer_commit.
// The dense matmuls and elementwise ops are the same ATen operators, in the same order, as
// vqt/ops/layer.py, so the rows are bitwise those of the composite path. w, t, plan: LayerWeights,
// LayerTables, EditPlan (by field name). Returns (the next layer's dirty slots, counts by name).
py::tuple layer_step(const py::object& w, const py::object& t, const py::object& target, const Tensor& dirty,
                     const py::object& plan) {
  phase_clock.start();
  const Tensor x = field(t, "x");
  VQT_CHECK_CPU(x);
  const int64_t H = w.attr("n_heads").cast<int64_t>(), Hkv = w.attr("n_kv_heads").cast<int64_t>();
  const int64_t d = x.size(1), hd = w.attr("head_dim").cast<int64_t>();
  const double scale = w.attr("scale").cast<double>();
  const int64_t m = dirty.numel();
  const auto opts = x.options();
  // q/k/v (and sink scores) of the dirty rows; with none, empty ones without running a single operator.
  Tensor q_new = at::empty({m, H, hd}, opts), k_new = at::empty({m, Hkv, hd}, opts), v_new = at::empty({m, Hkv, hd}, opts);
  std::optional<Tensor> s_new;
  const auto sink_k = optional_field(w, "sink_k");
  if (m == 0) {
    if (sink_k) s_new = at::empty({0, H}, opts);
  } else {
    const Tensor xd = x.index_select(0, dirty);
    const Tensor attn_norm = field(w, "attn_norm");
    const Tensor qkv =
        project(at::rms_norm(xd, {d}, attn_norm, w.attr("attn_eps").cast<double>()), field(w, "w_qkv"))
            .view({m, H + 2 * Hkv, hd});
    if (sink_k) {  // as vqt.ops.layer.sink_scores (one row per query head), from the raw queries
      s_new = ((qkv.slice(1, 0, H) * *sink_k).sum(-1) * scale + field(w, "sink_logit")).contiguous();
    }
    phase_clock.mark(kQkv);
    Tensor c, s;
    const py::object rope = plan.attr("rope");
    if (!rope.is_none()) {  // the dirty rows' angles as vqt.ops.layer.rope_angles forms them (same operators)
      const Tensor freq = rope.cast<Tensor>();
      TORCH_CHECK(freq.dim() == 1 && freq.size(0) * 2 == hd && freq.scalar_type() == torch::kDouble,
                  "the RoPE frequencies must be (", hd / 2, ",) float64, got ", freq.sizes(), " ", freq.scalar_type());
      Tensor ang = field(plan, "pos").index_select(0, dirty).to(torch::kDouble).unsqueeze(-1) * freq;
      ang = at::cat({ang, ang}, -1).unsqueeze(-2);
      c = ang.cos().to(x.scalar_type()).contiguous(), s = ang.sin().to(x.scalar_type()).contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vqt_qkv_rows_cpu", [&] {
      using T = scalar_t;
      const T* src = qkv.data_ptr<T>();
      rope_rows(src, qkv.stride(0), m, H, Hkv, hd, c.defined() ? c.data_ptr<T>() : nullptr,
                s.defined() ? s.data_ptr<T>() : nullptr, q_new.data_ptr<T>(), k_new.data_ptr<T>());
      T* vp = v_new.data_ptr<T>();
      for (int64_t i = 0; i < m; ++i) std::copy_n(src + i * qkv.stride(0) + (H + Hkv) * hd, Hkv * hd, vp + i * Hkv * hd);
    });
  }
  phase_clock.mark(kRope);
  const py::tuple attended = layer_attend(w, t, q_new, k_new, v_new, s_new, dirty, plan);
  const Tensor post = attended[0].cast<Tensor>();
  Tensor attn_out = attended[1].cast<Tensor>();
  py::dict counts = attended[2];
  phase_clock.mark(kRequantize);
  // y = x + attention output, x' = y + SwiGLU(RMSNorm(y)) of the rows it returned (none: no operator runs).
  const int64_t np = post.numel();
  Tensor out = at::empty({np, d}, opts);
  if (np > 0) {
    TORCH_CHECK(attn_out.is_contiguous() && attn_out.size(0) == np && attn_out.size(1) == d,
                "layer_attend returned an attention output of shape ", attn_out.sizes());
    if (const auto w_corr = optional_field(w, "w_corr")) {
      // quantize-then-correct: + W_corr RMSNorm(x) of the rows' inputs (vqt.ops.layer.corrected, same operators)
      const Tensor h = at::rms_norm(x.index_select(0, post), {d}, field(w, "attn_norm"), w.attr("attn_eps").cast<double>());
      attn_out = (attn_out + project(h, *w_corr)).contiguous();
    }
    phase_clock.mark(kCorrection);
    Tensor y = at::empty({np, d}, opts);
    const Tensor mlp_norm = field(w, "mlp_norm");
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vqt_residual_cpu", [&] {
      gather_add(x.data_ptr<scalar_t>(), post.data_ptr<int64_t>(), attn_out.data_ptr<scalar_t>(), np, d,
                 y.data_ptr<scalar_t>());
    });
    const auto gate_up =
        project(at::rms_norm(y, {d}, mlp_norm, w.attr("mlp_eps").cast<double>()), field(w, "w_gate_up")).chunk(2, -1);
    const Tensor mlp = project(at::silu(gate_up[0]) * gate_up[1], field(w, "w_down")).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vqt_residual_cpu", [&] {
      gather_add(y.data_ptr<scalar_t>(), nullptr, mlp.data_ptr<scalar_t>(), np, d, out.data_ptr<scalar_t>());
    });
  }
  phase_clock.mark(kMlp);
  Tensor next = layer_commit(target, post, out, plan);
  phase_clock.mark(kCommit, true);
  counts["mlp_rows"] = post.numel();
  return py::make_tuple(next, counts);
}

void set_phase_timing(bool on) { phase_clock = PhaseClock{on}; }  // and zeroes the times

py::dict phase_times() {
  py::dict d;
  for (int p = 0; p < kPhases; ++p) d[kPhaseNames[p]] = phase_clock.ms[p];
  d["calls"] = phase_clock.calls;
  return d;
}
}  // namespace
}  // namespace vqt

VQT_DEFINE_MODULE("vqt fused CPU operators (semantics: vqt/ops/reference.py)",
                  m.def("layer_attend", &vqt::layer_attend, "one layer's attention step (vqt/ops/composite.py)");
                  m.def("layer_commit", &vqt::layer_commit, "store recomputed rows (or the final norm), return the next dirty slots");
                  m.def("layer_step", &vqt::layer_step, "a whole layer of an incremental update");
                  m.def("codebook_norms", &vqt::codebook_norms, "|e_k|^2 of every codeword, float64");
                  m.def("set_phase_timing", &vqt::set_phase_timing, "switch layer_step's phase clock on or off (and zero it)");
                  m.def("phase_times", &vqt::phase_times, "{phase: milliseconds} of layer_step while timed, and 'calls'");)
