// Scalar rules shared by the CPU and CUDA backends, so that both follow vqt/ops/reference.py in
// the same way: key visibility, NaN-propagating max, nearest/second-nearest codeword selection
// and the certified radius of vqt.quantize.nearest. Plain C++ (host and device), no torch.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define VQT_HD __host__ __device__ __forceinline__
#else
#define VQT_HD inline
#endif

namespace vqt {

// Query head h reads key/value head h / (H / Hkv) (GQA; MHA when Hkv == H).
struct Heads {
  int64_t H, Hkv, hd, hdv;  // query heads, key/value heads, key width, value width
  VQT_HD int64_t kv(int64_t h) const { return h / (H / Hkv); }
};

// Key j is visible to query i iff pos_i - window < pos_j <= pos_i (no lower bound without a window).
struct Window {
  bool on;
  double width;
  VQT_HD bool visible(double pos_q, double pos_k) const { return pos_k <= pos_q && (!on || pos_k > pos_q - width); }
};

// One set of keys: k (n, Hkv, hd), v (n, Hkv, hdv), positions (n,) in float64.
template <typename T>
struct Keys {
  const T* k;
  const T* v;
  const double* pos;
  int64_t n;
};

// Inputs of attention_rows: queries q (m, H, hd) at pos_q (m,) against one key set and, when sink_s
// is not null, an attention sink: one more key, always visible, with score sink_s (m, H) and value
// sink_v (H, hdv) for each query head.
template <typename T>
struct RowsInputs {
  const T* q;
  const double* pos_q;
  Keys<T> keys;
  Heads L;
  Window w;
  double scale;
  const T* sink_s;
  const T* sink_v;
};

// Inputs of attention_delta: accumulators U (m, H, hdv), Z and M (m, H) of queries q (m, H, hd);
// removed keys are judged visible at pos_q_old, added ones at pos_q.
template <typename T>
struct DeltaInputs {
  const T *q, *U, *Z, *M;
  const double *pos_q_old, *pos_q;
  Keys<T> rem, add;
  Heads L;
  Window w;
  double scale, tau;
};

// Inputs of requantize: group vectors a and a_old (where they were before they moved; m, G, gd), codebook
// (G, K, gd), codes and the radius certifying each around a_old (m, G).
template <typename T>
struct RequantizeInputs {
  const T *a, *codebook, *a_old, *radius;
  const int64_t* codes;
  int64_t G, K, gd;
};

// max that propagates NaN from either side, like torch.maximum and amax.
VQT_HD double nan_max(double a, double b) { return (a > b || a != a) ? a : b; }

template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr double value = FLT_EPSILON;
};
template <>
struct Eps<double> {
  static constexpr double value = DBL_EPSILON;
};

// One step down from x, towards -inf (NaN and -inf stay).
VQT_HD float step_down(float x) { return nextafterf(x, -INFINITY); }
VQT_HD double step_down(double x) { return nextafter(x, -INFINITY); }

// The certified radius around a that a certified radius around a_old implies for the code whose codeword
// is e (vqt.ops.reference.remaining_radius), from the squared distances |a - a_old|^2, |a_old - e|^2 and
// |a - e|^2: (|a_old - e| + 2 radius - |a - a_old| - |a - e|) / 2, distances shrunk or enlarged by 2^-40
// and the result rounded down. NaN-safe: NaN in, NaN out (which certifies nothing).
template <typename T>
VQT_HD T remaining_radius(T radius, double moved2, double old2, double new2) {
  const double up = 1 + 0x1p-40, down = 1 - 0x1p-40;
  return step_down(
      static_cast<T>((sqrt(old2) * down + 2 * static_cast<double>(radius) - sqrt(moved2) * up - sqrt(new2) * up) / 2));
}

// Nearest and second-nearest codeword by squared distance under the total order (distance, index):
// ties go to the lower index and NaN never wins. Pushing codewords in any order, or merging partial
// results, gives the same answer as one ascending scan with strict '<'.
// An aggregate (no constructor) so that it can live in CUDA shared memory; start from Top2::none().
struct Top2 {
  static constexpr int64_t kNone = INT64_MAX;
  double d1, d2;
  int64_t i1, i2;

  VQT_HD static Top2 none() { return Top2{INFINITY, INFINITY, kNone, kNone}; }

  VQT_HD static bool before(double da, int64_t ia, double db, int64_t ib) { return da < db || (da == db && ia < ib); }
  VQT_HD void push(double d, int64_t i) {
    if (before(d, i, d1, i1)) {
      d2 = d1, i2 = i1, d1 = d, i1 = i;
    } else if (before(d, i, d2, i2)) {
      d2 = d, i2 = i;
    }
  }
  VQT_HD void merge(const Top2& o) {
    push(o.d1, o.i1);
    push(o.d2, o.i2);
  }
  // Code to store: the nearest one, or 0 when every distance was NaN.
  VQT_HD int64_t code() const { return i1 == kNone ? 0 : i1; }
  // (d2 - d1) / 2 - sqrt(32 eps (|a|^2 + max_k |e_k|^2)), with d1, d2 Euclidean: vqt.quantize.nearest's radius.
  // A single codeword counts as its own runner-up, as in nearest().
  VQT_HD double radius(double a2, double e2max, double eps) const {
    const double n1 = sqrt(d1), n2 = i2 == kNone ? n1 : sqrt(d2);
    return (n2 - n1) / 2 - sqrt(32 * eps * (a2 + e2max));
  }
};

}  // namespace vqt
