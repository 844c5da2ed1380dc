// CUDA kernels of the sparse-recomputation operators (semantics: vqt/ops/reference.py). One block
// per (query row, head) for attention, per (row, group) for re-quantization and per row for the
// lookup; threads stride over keys or codewords and combine through shared-memory reductions.
// Sums are accumulated in double for float and double inputs. CUDA headers only (no torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vqt_ops_common.h"
#include "vqt_ops_cuda.h"

namespace vqt {
namespace gpu {

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double shfl_xor(double v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}

__device__ __forceinline__ Top2 shfl_xor(const Top2& t, int lane_mask) {
  return Top2{__shfl_xor_sync(kFullMask, t.d1, lane_mask), __shfl_xor_sync(kFullMask, t.d2, lane_mask),
              static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(t.i1), lane_mask)),
              static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(t.i2), lane_mask))};
}

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct NanMax {
  __device__ double operator()(double a, double b) const { return nan_max(a, b); }
};
struct Merge {
  __device__ Top2 operator()(Top2 a, const Top2& b) const {
    a.merge(b);
    return a;
  }
};

// Combines v over the whole block with op; every thread gets the result. red: kWarps shared slots.
// Must be reached by all threads of the block.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V* red) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, shfl_xor(v, offset));
  __syncthreads();  // everyone has read the previous reduction's slots
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, red[w]);
  return v;
}

template <typename T>
__device__ __forceinline__ double dot(const double* q, const T* k, int64_t n) {
  double acc = 0;
  for (int64_t d = 0; d < n; ++d) acc += q[d] * static_cast<double>(k[d]);
  return acc;
}

template <typename T>
__device__ __forceinline__ double squared_distance(const double* a, const T* e, int64_t n) {
  double acc = 0;
  for (int64_t d = 0; d < n; ++d) {
    const double diff = a[d] - static_cast<double>(e[d]);
    acc += diff * diff;
  }
  return acc;
}

// What an attention block works on: its query (in shared memory), the kv head it reads, its position.
struct Query {
  const double* q;
  int64_t kv_head;
  double pos;
};

template <typename T>
__device__ __forceinline__ double score(const Query& qr, const Keys<T>& K, const Heads& L, int64_t j, double scale) {
  return dot(qr.q, K.k + (j * L.Hkv + qr.kv_head) * L.hd, L.hd) * scale;
}

// nan_max of init and every visible key's score, over the block.
template <typename T>
__device__ double max_score(const Query& qr, const Keys<T>& K, const Heads& L, const Window& w, double scale,
                            double init, double* red) {
  double mx = init;
  for (int64_t j = threadIdx.x; j < K.n; j += kThreads) {
    if (w.visible(qr.pos, K.pos[j])) mx = nan_max(mx, score(qr, K, L, j, scale));
  }
  return block_reduce(mx, NanMax(), red);
}

// acc[d] += sum_j p_j v_{j, kv}[d] with p_j = exp(score_j - m) over the visible keys, in chunks of kThreads
// keys: each thread computes one weight into p_sh, then threads split the value dimension. Returns
// sum_j p_j over the block. acc[d] belongs to thread d % kThreads.
template <typename T>
__device__ double accumulate(const Query& qr, const Keys<T>& K, const Heads& L, const Window& w, double scale,
                             double m, double* acc, double* p_sh, double* red) {
  double z = 0;
  for (int64_t base = 0; base < K.n; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    double p = 0;
    if (j < K.n && w.visible(qr.pos, K.pos[j])) p = exp(score(qr, K, L, j, scale) - m);
    z += p;
    __syncthreads();  // the previous chunk's weights are no longer read
    p_sh[threadIdx.x] = p;
    __syncthreads();
    const int64_t n = K.n - base < kThreads ? K.n - base : kThreads;
    const T* v = K.v + (base * L.Hkv + qr.kv_head) * L.hdv;
    for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) {
      double a = acc[d];
      for (int64_t c = 0; c < n; ++c) {
        if (p_sh[c] != 0) a += p_sh[c] * static_cast<double>(v[c * L.Hkv * L.hdv + d]);
      }
      acc[d] = a;
    }
  }
  return block_reduce(z, Sum(), red);
}

// Shared memory of an attention block: query (hd), accumulator (hdv), weights (kThreads); loads the query.
template <typename T>
__device__ Query load_query(const T* q, int64_t h, double pos, const Heads& L, double* smem) {
  for (int64_t d = threadIdx.x; d < L.hd; d += kThreads) smem[d] = static_cast<double>(q[d]);
  for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) smem[L.hd + d] = 0;
  __syncthreads();
  return Query{smem, L.kv(h), pos};
}

template <typename T>
__device__ __forceinline__ double stored(double x) {
  return static_cast<double>(static_cast<T>(x));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_rows_kernel(RowsInputs<T> in, T* U, T* Z, T* M) {
  extern __shared__ double smem[];
  __shared__ double red[kWarps];
  const Heads& L = in.L;
  const int64_t i = blockIdx.x, h = blockIdx.y, ih = i * L.H + h;
  const Query qr = load_query(in.q + ih * L.hd, h, in.pos_q[i], L, smem);
  double* acc = smem + L.hd;
  const double sink = in.sink_s ? static_cast<double>(in.sink_s[ih]) : -INFINITY;
  const double m = stored<T>(max_score(qr, in.keys, L, in.w, in.scale, sink, red));
  double z = accumulate(qr, in.keys, L, in.w, in.scale, m, acc, acc + L.hdv, red);
  if (in.sink_s) {  // the sink: one more always-visible key (acc[d] belongs to thread d % kThreads)
    const double p = exp(sink - m);
    z += p;
    for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) acc[d] += p * static_cast<double>(in.sink_v[h * L.hdv + d]);
  }
  const bool none = m == -INFINITY;  // no finite score: the reference's softmax is NaN, and so is ours
  for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) U[ih * L.hdv + d] = static_cast<T>(none ? NAN : acc[d]);
  if (threadIdx.x == 0) {
    Z[ih] = static_cast<T>(none ? NAN : z);
    M[ih] = static_cast<T>(m);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(DeltaInputs<T> in, T* U, T* Z, T* M, bool* refresh_heads) {
  extern __shared__ double smem[];
  __shared__ double red[kWarps];
  const Heads& L = in.L;
  const int64_t i = blockIdx.x, h = blockIdx.y, ih = i * L.H + h;
  Query qr = load_query(in.q + ih * L.hd, h, in.pos_q_old[i], L, smem);
  double* acc = smem + L.hd;
  double* p_sh = acc + L.hdv;
  double m = static_cast<double>(in.M[ih]);
  // Removed keys, subtracted at the current stabilizer; then the cancellation guard.
  double z = static_cast<double>(in.Z[ih]) - accumulate(qr, in.rem, L, in.w, in.scale, m, acc, p_sh, red);
  for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) acc[d] = static_cast<double>(in.U[ih * L.hdv + d]) - acc[d];
  if (threadIdx.x == 0) refresh_heads[ih] = static_cast<T>(z) < static_cast<T>(in.tau) * in.Z[ih];
  // Added keys, raising the stabilizer (and rescaling what is there) where a new score exceeds it.
  if (in.add.n > 0) {
    qr.pos = in.pos_q[i];
    const double m_new = stored<T>(max_score(qr, in.add, L, in.w, in.scale, m, red));
    const double rescale = exp(m - m_new);
    for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) acc[d] *= rescale;
    z = z * rescale + accumulate(qr, in.add, L, in.w, in.scale, m_new, acc, p_sh, red);
    m = m_new;
  }
  for (int64_t d = threadIdx.x; d < L.hdv; d += kThreads) U[ih * L.hdv + d] = static_cast<T>(acc[d]);
  if (threadIdx.x == 0) {
    Z[ih] = static_cast<T>(z);
    M[ih] = static_cast<T>(m);
  }
}

// e2max[g] = max_k |e_{g,k}|^2; one block per group.
template <typename T>
__global__ void __launch_bounds__(kThreads) codebook_norm_kernel(const T* codebook, int64_t K, int64_t gd,
                                                                 double* e2max) {
  __shared__ double red[kWarps];
  const int64_t g = blockIdx.x;
  double mx = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const T* e = codebook + (g * K + k) * gd;
    double e2 = 0;
    for (int64_t d = 0; d < gd; ++d) e2 += static_cast<double>(e[d]) * static_cast<double>(e[d]);
    mx = nan_max(mx, e2);
  }
  mx = block_reduce(mx, NanMax(), red);
  if (threadIdx.x == 0) e2max[g] = mx;
}

// Group (i, g): keep the code while the radius it implies around a stays positive (certified), else search all K.
template <typename T>
__global__ void __launch_bounds__(kThreads) requantize_kernel(RequantizeInputs<T> in, const double* e2max,
                                                              int64_t* codes, T* radius, bool* searched) {
  extern __shared__ double a_sh[];  // the group vector (gd)
  __shared__ double red[kWarps];
  __shared__ Top2 red_top[kWarps];
  const int64_t g = blockIdx.y, ig = blockIdx.x * in.G + g, gd = in.gd;
  const T* a = in.a + ig * gd;
  const T* old = in.a_old + ig * gd;
  const int64_t code = in.codes[ig];
  const bool valid = code >= 0 && code < in.K;  // (a code outside [0, K) is searched)
  const T* e = in.codebook + (g * in.K + (valid ? code : 0)) * gd;
  double dist2 = 0, a2 = 0, old2 = 0, new2 = 0;
  for (int64_t d = threadIdx.x; d < gd; d += kThreads) {
    const double x = static_cast<double>(a[d]), o = static_cast<double>(old[d]), c = static_cast<double>(e[d]);
    a_sh[d] = x;
    dist2 += (x - o) * (x - o);
    old2 += (o - c) * (o - c);
    new2 += (x - c) * (x - c);
    a2 += x * x;
  }
  dist2 = block_reduce(dist2, Sum(), red);  // also makes a_sh visible to the whole block
  old2 = block_reduce(old2, Sum(), red);
  new2 = block_reduce(new2, Sum(), red);
  a2 = block_reduce(a2, Sum(), red);
  const T left = valid ? remaining_radius(in.radius[ig], dist2, old2, new2) : T(NAN);
  if (left > 0) {  // the same decision in every thread of the block; NaN-safe: anything uncertain is searched
    if (threadIdx.x == 0) {
      codes[ig] = in.codes[ig];
      radius[ig] = left;
      searched[ig] = false;
    }
    return;
  }
  Top2 best = Top2::none();
  const T* cb = in.codebook + g * in.K * gd;
  for (int64_t k = threadIdx.x; k < in.K; k += kThreads) best.push(squared_distance(a_sh, cb + k * gd, gd), k);
  best = block_reduce(best, Merge(), red_top);
  if (threadIdx.x == 0) {
    codes[ig] = best.code();
    radius[ig] = static_cast<T>(best.radius(a2, e2max[g], Eps<T>::value));
    searched[ig] = true;
  }
}

// out[i] = sum_g table[g, codes[i, g]], summed in group order from the first term, in T, as the reference does.
template <typename T>
__global__ void __launch_bounds__(kThreads) lookup_kernel(const T* table, const int64_t* codes, int64_t G, int64_t K,
                                                          int64_t d, T* out) {
  const int64_t i = blockIdx.x;
  const int64_t* ci = codes + i * G;
  for (int64_t c = threadIdx.x; c < d; c += kThreads) {
    T acc = table[ci[0] * d + c];
    for (int64_t g = 1; g < G; ++g) acc += table[(g * K + ci[g]) * d + c];
    out[i * d + c] = acc;
  }
}

}  // namespace gpu
}  // namespace vqt
