// attnkit's `tiled` kernel over a BlockLayout: forward and backward as C++ loops over the tiles, in float32 or bf16
// (bf16 operands on the CPU's matrix units, float32 accumulation and softmax statistics).
//
// Forward, for a work item (batch b, head unit u, query block r) with key tiles T(r) = kv_ids[lh, r, :]:
//
//   S_c = mod(scale Q_r K_c^T)  (+ -inf where the tile mask, the selection or the key padding says no)
//                                                                           c: a chunk of T(r); mod: softcap, ALiBi
//   m   = max(m, rowmax S_c);   l = l e^{m_old - m} + rowsum e^{S_c - m};   O = O e^{m_old - m} + e^{S_c - m} V_c
//   out = O / l,  lse = m + log l       (a row that saw no key: out = 0, lse = -inf)
//
// Under another normaliser the weights are elementwise, p = f(S_c) (sigmoid(s + b), softplus(log(n_i) s)), so the
// chunks simply add up: l += rowsum p, O += p V_c; out = O (sigmoid) or O / l (softplus), lse = log l.
//
// Backward (FlashAttention-2's, over the same tiles, recomputing P from the saved lse), delta = rowsum(dO * O):
//
//   P_c = exp(S_c - lse);   dV_c += P_c^T dO;   dS_c = P_c * (dO V_c^T - delta) * mod'(S_c);
//   dQ_r += scale dS_c K_c;   dK_c += scale dS_c^T Q_r
//
// (other normalisers: P_c the weights in the output, dS_c from f', see weights_grad_row).
//
// The K and V rows of a chunk (at most `max_keys` keys) are read in place when its tiles are one run of consecutive
// key blocks, else copied into a per-thread buffer (a run at a time), so every product is one BLAS call on cache-resident operands and no tensor the size of
// the selection is ever made. In bf16 the products take bf16 operands (Q, K, V, dO as given; P and dS rounded to
// bf16 once, as torch's CPU flash attention does) into float32 results (MKL's gemm_bf16bf16f32); the softmax, its
// statistics and every accumulator stay float32. Work items are taken from a shared counter, longest rows first,
// because the rows of a dynamic selection differ in length by an order of magnitude. The backward's items are
// (batch, kv head) groups cut into ranges of query blocks: a range owns the dK, dV rows it adds to (its own slab
// when a group is cut into several, summed at the end), so no two threads add to the same row.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTNKIT_AVX2 1
#endif

// Fortran BLAS as exported by libtorch_cpu (MKL, 32-bit integers): the same sgemm torch's own CPU matmul calls,
// and MKL's bf16 x bf16 -> float32 product (MKL_BF16 is the bf16 bit pattern in a uint16).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
extern "C" void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const float* alpha, const uint16_t* a, const int* lda, const uint16_t* b,
                                  const int* ldb, const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count: each worker's small products run on that worker alone (MKL would otherwise
// start its own team inside every call and oversubscribe the cores). Returns the previous setting.
extern "C" int MKL_Set_Num_Threads_Local(int n);

namespace {

using bf16 = uint16_t;  // the bits of a c10::BFloat16
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Row-major C (M x N) = alpha op(A) op(B) + beta C, with op(A) (M x K) and op(B) (K x N); `ta`/`tb` say that A is
// stored as (K x M) / B as (N x K). Column-major BLAS sees the transposes: C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  sgemm_(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const bf16* A, int lda, const bf16* B, int ldb,
                 float beta, float* C, int ldc) {
  gemm_bf16bf16f32_(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// Whether any of the n values holds a NaN or inf (a branch-free reduction over the exponent bits, vectorised).
inline bool any_nonfinite(const float* x, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
  uint32_t all = 0;
  for (int64_t i = 0; i < n; ++i) all |= ((bits[i] & 0x7f800000u) == 0x7f800000u);
  return all != 0;
}
inline bool any_nonfinite(const bf16* x, int64_t n) {
  uint32_t all = 0;
  for (int64_t i = 0; i < n; ++i) all |= ((x[i] & 0x7f80u) == 0x7f80u);
  return all != 0;
}

// float32 -> bf16, round to nearest even; branch-free so that the loops over a chunk vectorise (a quiet NaN stays
// NaN; the scores it rounds are finite or already marked bad).
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The operand of a product taken from float32 scores: the scores themselves in float32, rounded into `buf` in bf16.
template <typename T>
const T* as_operand(const float* x, int64_t n, std::vector<bf16>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_bf16(x[i]);
    return buf.data();
  }
}

#ifdef ATTNKIT_AVX2
// exp(x) for x <= 0 (the argument is always S - rowmax or S - lse): Cephes' expf (2^n e^r, |r| <= ln2 / 2, a
// degree-5 polynomial, about 1 ulp), and exactly 0 below -87.3 where float underflows (this is where -inf lands).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(dead, y);
}

// The sum of the 8 lanes.
inline float hsum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  float s = 0.f;
  for (float x : t) s += x;
  return s;
}
#endif

// The elementwise functions of the score mods and normalisers (attnkit.scores), each as a scalar and, with AVX2,
// an 8-wide form. All are built on exp of a non-positive argument, so none overflows.
inline float tanh1(float x) { return std::tanh(x); }
// sigmoid(x) and 1 - sigmoid(x) from e = exp(-|x|), with no cancellation on either side.
inline void sigmoid1(float x, float& p, float& q) {
  const float e = std::exp(-std::fabs(x)), inv = 1.f / (1.f + e);
  p = x >= 0.f ? inv : e * inv;
  q = x >= 0.f ? e * inv : inv;
}
inline float softplus1(float z) { return std::max(z, 0.f) + std::log1p(std::exp(-std::fabs(z))); }

#ifdef ATTNKIT_AVX2
inline __m256 abs_v(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

// tanh: Cephes' odd polynomial below |x| = 0.625 (where 1 - e^{-2|x|} would cancel), (1 - e) / (1 + e) with
// e = e^{-2|x|} above, the sign put back. A NaN stays NaN (it takes the polynomial).
inline __m256 tanh_v(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f), a = abs_v(x);
  const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.f), a));
  __m256 big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  big = _mm256_or_ps(big, _mm256_and_ps(x, _mm256_set1_ps(-0.f)));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(-5.70498872745e-3f);
  y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(2.06390887954e-2f));
  y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(-5.37397155531e-2f));
  y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(1.33314422036e-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(y, z), x, x);
  return _mm256_blendv_ps(small, big, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_GE_OQ));
}

inline void sigmoid_v(__m256 x, __m256& p, __m256& q) {
  const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), abs_v(x)));
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ), ei = _mm256_mul_ps(e, inv);
  p = _mm256_blendv_ps(ei, inv, pos);
  q = _mm256_blendv_ps(inv, ei, pos);
}

// log(u) for u in [1, 2]: Cephes' logf on the reduced argument (u / 2 above sqrt 2).
inline __m256 log_1to2(__m256 u) {
  const __m256 hi = _mm256_cmp_ps(u, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  const __m256 x = _mm256_sub_ps(_mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(0.5f)), hi), _mm256_set1_ps(1.f));
  const __m256 k = _mm256_and_ps(hi, _mm256_set1_ps(1.f));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(k, _mm256_set1_ps(0.693359375f), _mm256_add_ps(x, y));
}

// softplus(z) = max(z, 0) + log1p(e^{-|z|}); log1p(e) = log(u) e / (u - 1) with u = 1 + e (Goldberg's form: u - 1
// is exact, so the small e keep their relative accuracy), and e itself where u rounds to 1.
inline __m256 softplus_v(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), abs_v(z)));
  const __m256 u = _mm256_add_ps(one, e), um1 = _mm256_sub_ps(u, one);
  const __m256 exact = _mm256_cmp_ps(um1, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 safe = _mm256_blendv_ps(um1, one, exact);
  const __m256 l1p = _mm256_blendv_ps(_mm256_div_ps(_mm256_mul_ps(log_1to2(u), e), safe), e, exact);
  return _mm256_add_ps(_mm256_max_ps(z, _mm256_setzero_ps()), l1p);
}
#endif

// The row's max, and whether it holds a NaN (max ignores NaN, and the exp below would turn it into a number:
// a NaN logit is a non-finite q or k reaching this row, which must reach the output as NaN).
float row_max(const float* x, int n, bool& nan) {
  float m = kNegInf;
  int i = 0;
#ifdef ATTNKIT_AVX2
  __m256 vm = _mm256_set1_ps(kNegInf), vn = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vm = _mm256_max_ps(vm, v);
    vn = _mm256_or_ps(vn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, vm);
  for (float v : t) m = std::max(m, v);
  nan = nan || _mm256_movemask_ps(vn) != 0;
#endif
  for (; i < n; ++i) {
    m = std::max(m, x[i]);
    nan = nan || std::isnan(x[i]);
  }
  return m;
}

// x <- exp(x - m) in place; returns the sum.
float exp_shift_sum(float* x, int n, float m) {
  float s = 0.f;
  int i = 0;
#ifdef ATTNKIT_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, p);
    vs = _mm256_add_ps(vs, p);
  }
  s = hsum(vs);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// dS = P * (dP - delta) in place in dp (p, dp: n values of one row).
void softmax_grad(const float* p, float* dp, int n, float delta) {
  int i = 0;
#ifdef ATTNKIT_AVX2
  const __m256 vd = _mm256_set1_ps(delta);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dp + i, _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_sub_ps(_mm256_loadu_ps(dp + i), vd)));
#endif
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

// A token-grain selection inside the tiles (attnkit.layout.TokenSelect): a pair of a tile interacts where the tile
// mask allows it and any present term does. Every index is clamped to its tensor, as the Python side does (the
// clamped pairs lie in padding that the tile masks already remove).
struct Select {
  const bool *rows = nullptr, *cols = nullptr, *diags = nullptr;  // (g, q, key block), (g, query block, k), (g, 2 nk)
  const int64_t *q_lab = nullptr, *k_lab = nullptr, *q_pos = nullptr, *k_pos = nullptr;  // (g, q), (g, k)
  int64_t rows_q = 0, rows_k = 0, cols_q = 0, cols_k = 0, diags_n = 0, lab_q = 0, lab_k = 0, pos_q = 0, pos_k = 0;
  int64_t q_offset = 0, kv_len = 0;
  bool any() const { return rows || cols || diags || q_lab; }
};

inline int64_t clamp_to(int64_t i, int64_t n) { return std::min(std::max<int64_t>(i, 0), n - 1); }

bool selected(const Select& t, int64_t g, int64_t qi, int64_t kj, int64_t qb, int64_t kb) {
  if (t.rows && t.rows[(g * t.rows_q + clamp_to(qi, t.rows_q)) * t.rows_k + clamp_to(kb, t.rows_k)]) return true;
  if (t.cols && t.cols[(g * t.cols_q + clamp_to(qb, t.cols_q)) * t.cols_k + clamp_to(kj, t.cols_k)]) return true;
  if (t.diags && t.diags[g * t.diags_n + clamp_to(t.q_offset + qi - kj + t.kv_len - 1, t.diags_n)]) return true;
  if (t.q_lab && t.q_lab[g * t.lab_q + clamp_to(qi, t.lab_q)] == t.k_lab[g * t.lab_k + clamp_to(kj, t.lab_k)])
    return !t.q_pos || t.k_pos[g * t.pos_k + clamp_to(kj, t.pos_k)] <= t.q_pos[g * t.pos_q + clamp_to(qi, t.pos_q)];
  return false;
}

// What stands in for plain softmax (attnkit.scores): a score mod applied to the scaled logits before the masks
// (Softcap: cap tanh(s / cap); ALiBi: s - m_h |i - j| with i = q_offset + the query's row), and the normaliser
// that turns a row's logits into weights (Sigmoid: sigmoid(s + bias), no row sum; Softplus: softplus(log(n_i) s),
// n_i the row's visible keys, divided by the row's sum). The derivatives are taken from the modified logit, so
// the backward keeps no raw copy: d softcap / ds = 1 - (s' / cap)^2.
enum Mod : int64_t { kNoMod = 0, kSoftcap = 1, kAlibi = 2 };
enum Norm : int64_t { kSoftmax = 0, kSigmoid = 1, kSoftplus = 2 };
struct Elementwise {
  int64_t mod = kNoMod, norm = kSoftmax;
  float cap = 1.f;
  const float* slopes = nullptr;  // (Hq,)
  int64_t q_offset = 0;
  float bias = 0.f;
  bool length_scale = false;
  bool counts() const { return norm == kSoftplus && length_scale; }
};

// What both directions read: the inputs, the layout and its units. T: float or bf16.
template <typename T>
struct Problem {
  const T *q, *k, *v;
  const int64_t *kv_ids, *mask_ids, *units;
  const bool *tile_masks, *kpm;  // kpm: (B, nk), true for real keys; null when every key is real
  int64_t Hq, Hkv, nq, nk, D, Dv, nqb, S, bq, bk, G;
  float scale;
  int64_t max_keys;
  Select select;
  Elementwise ew;
  // forward
  float *out = nullptr, *lse = nullptr;
  // backward: dout (B, Hq, nq, Dv) in T; lse and delta (B, Hq, nq); dq (B, Hq, nq, D), dk, dv (B, Hkv, nk, .)
  const T* dout = nullptr;
  const float *lse_in = nullptr, *delta = nullptr;
  float *dq = nullptr, *dk = nullptr, *dv = nullptr;
};

template <typename T>
struct Scratch {
  std::vector<T> q, k, v, dout;
  const T *kc = nullptr, *vc = nullptr;  // the chunk's K and V rows: the inputs themselves, or the copies in k, v
  std::vector<float> s, dp, o, m, l;  // o: the forward's accumulator, or the backward's dQ
  std::vector<float> grad_mod, logn;  // the backward's d mod / ds (softcap); log of each query row's visible keys
  std::vector<bf16> p16, ds16;        // P and dS rounded for the bf16 products
  std::vector<char> bad;              // (M,): a non-finite q or logit reached the row; its output becomes NaN
  std::vector<int> dead_cols;
  std::vector<char> allow;  // (bq, bk): the pairs of one tile that interact
  Scratch(const Problem<T>& p, bool backward) {
    const int64_t M = p.G * p.bq, L = std::max<int64_t>(p.bk, (p.max_keys / p.bk) * p.bk);
    q.resize(M * p.D);
    k.resize(L * p.D);
    v.resize(L * p.Dv);
    s.resize(M * L);
    o.resize(M * std::max(p.D, p.Dv));
    m.resize(M);
    l.resize(M);
    bad.resize(M);
    allow.resize(p.bq * p.bk);
    if (p.ew.counts()) logn.resize(p.bq);
    if (backward && p.ew.mod == kSoftcap) grad_mod.resize(M * L);
    if (!std::is_same_v<T, float>) p16.resize(M * L);
    if (backward) {
      dout.resize(M * p.Dv);
      dp.resize(M * L);
      if (!std::is_same_v<T, float>) ds16.resize(M * L);
    }
  }
};

template <typename T>
int64_t row_slots(const Problem<T>& p, int64_t lh, int64_t r) {
  const int64_t* ids = p.kv_ids + (lh * p.nqb + r) * p.S;
  int64_t n = 0;
  while (n < p.S && ids[n] >= 0) ++n;
  return n;
}

// Runs of consecutive key blocks in slots [s0, s0 + n): f(first slot offset t, its key row, rows in the run).
template <typename F>
void for_runs(const int64_t* ids, int64_t s0, int64_t n, int64_t bk, F f) {
  for (int64_t t = 0; t < n;) {
    int64_t e = t + 1;
    while (e < n && ids[s0 + e] == ids[s0 + e - 1] + 1) ++e;
    f(t, ids[s0 + t] * bk, (e - t) * bk);
    t = e;
  }
}

// The rows of the G folded heads of unit (b, h0), query block r, into dst (G * bq rows of `width`).
template <typename T, typename U>
void load_rows(const U* src, int64_t b, int64_t h0, int64_t r, const Problem<T>& p, int64_t width, U* dst) {
  for (int64_t g = 0; g < p.G; ++g)
    std::memcpy(dst + g * p.bq * width, src + ((b * p.Hq + h0 + g) * p.nq + r * p.bq) * width,
                sizeof(U) * p.bq * width);
}

// The scale of S = scale Q K^T: folded into the copy of Q in float32 (MKL's sgemm is markedly slower on these
// small products with alpha != 1), applied by the product in bf16 (where a scaled copy would round Q again).
template <typename T>
constexpr bool kScaledQ = std::is_same_v<T, float>;

template <typename T>
void load_q(const Problem<T>& p, int64_t b, int64_t h0, int64_t r, Scratch<T>& w) {
  load_rows(p.q, b, h0, r, p, p.D, w.q.data());
  if constexpr (kScaledQ<T>)
    for (int64_t i = 0; i < p.G * p.bq * p.D; ++i) w.q[i] *= p.scale;
}

// The score mod on a chunk's logits S (M x L, M = G folded heads x bq rows; `ids`: its key tiles).
template <typename T>
void apply_mod(const Problem<T>& p, float* S, int M, int L, const int64_t* ids, int64_t h0, int64_t r) {
  const Elementwise& e = p.ew;
  if (e.mod == kSoftcap) {
    const float cap = e.cap;
    int64_t i = 0;
#ifdef ATTNKIT_AVX2
    const __m256 vc = _mm256_set1_ps(cap);
    for (; i + 8 <= int64_t(M) * L; i += 8)
      _mm256_storeu_ps(S + i, _mm256_mul_ps(tanh_v(_mm256_div_ps(_mm256_loadu_ps(S + i), vc)), vc));
#endif
    for (; i < int64_t(M) * L; ++i) S[i] = tanh1(S[i] / cap) * cap;
  } else if (e.mod == kAlibi) {
    const int64_t bq = p.bq, bk = p.bk;
    for (int64_t row = 0; row < M; ++row) {
      const float slope = e.slopes[h0 + row / bq];
      const int64_t pos = e.q_offset + r * bq + row % bq;
      for (int64_t t = 0; t < L / bk; ++t) {
        float* x = S + row * L + t * bk;
        const int64_t d = pos - ids[t] * bk;  // pos - key position of the tile's first column
        for (int64_t c = 0; c < bk; ++c) x[c] -= slope * std::fabs(static_cast<float>(d - c));
      }
    }
  }
}

// Gathers the chunk's K and V rows (slots [s0, s0 + n)) and computes its masked logits S (M x L).
template <typename T>
void chunk_scores(const Problem<T>& p, Scratch<T>& w, int64_t b, int64_t lh, int64_t hk, int64_t h0, int64_t r,
                  int64_t s0, int64_t n) {
  const int64_t* ids = p.kv_ids + (lh * p.nqb + r) * p.S;
  const int64_t* mids = p.mask_ids + (lh * p.nqb + r) * p.S;
  const int64_t bq = p.bq, bk = p.bk, D = p.D, Dv = p.Dv, M = p.G * bq;
  const int L = static_cast<int>(n * bk);
  const T* kb = p.k + (b * p.Hkv + hk) * p.nk * D;
  const T* vb = p.v + (b * p.Hkv + hk) * p.nk * Dv;
  // One run of consecutive key blocks (a window, a neighbourhood's interior) is read in place; a scattered
  // selection is copied, a run at a time.
  bool one_run = true;
  for (int64_t t = 1; t < n && one_run; ++t) one_run = ids[s0 + t] == ids[s0 + t - 1] + 1;
  if (one_run) {
    w.kc = kb + ids[s0] * bk * D, w.vc = vb + ids[s0] * bk * Dv;
  } else {
    for_runs(ids, s0, n, bk, [&](int64_t t, int64_t key0, int64_t len) {
      std::memcpy(w.k.data() + t * bk * D, kb + key0 * D, sizeof(T) * len * D);
      std::memcpy(w.v.data() + t * bk * Dv, vb + key0 * Dv, sizeof(T) * len * Dv);
    });
    w.kc = w.k.data(), w.vc = w.v.data();
  }
  float* S = w.s.data();
  gemm(false, true, static_cast<int>(M), L, static_cast<int>(D), kScaledQ<T> ? 1.f : p.scale, w.q.data(), static_cast<int>(D),
       w.kc, static_cast<int>(D), 0.f, S, L);
  apply_mod(p, S, static_cast<int>(M), L, ids + s0, h0, r);
  // A non-finite key can give a logit of -inf, which would read as masked: its column becomes NaN before the
  // masks, so a row that may see it is marked bad (row_max) and a row that may not is masked as usual.
  for (int c = 0; c < L; ++c)
    if (any_nonfinite(w.kc + c * D, D))
      for (int64_t i = 0; i < M; ++i) S[i * L + c] = kNaN;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t mid = mids[s0 + t], J = ids[s0 + t];
    if (mid < 0 && !p.select.any()) continue;  // a full tile
    char* allow = w.allow.data();
    for (int64_t i = 0; i < bq; ++i)
      for (int64_t c = 0; c < bk; ++c) {
        bool ok = mid < 0 || p.tile_masks[(mid * bq + i) * bk + c];
        if (ok && p.select.any()) ok = selected(p.select, lh, r * bq + i, J * bk + c, r, J);
        allow[i * bk + c] = ok;
      }
    for (int64_t g = 0; g < p.G; ++g)
      for (int64_t i = 0; i < bq; ++i) {
        float* row = S + (g * bq + i) * L + t * bk;
        for (int64_t c = 0; c < bk; ++c)
          if (!allow[i * bk + c]) row[c] = kNegInf;
      }
  }
  if (const bool* keep = p.kpm ? p.kpm + b * p.nk : nullptr) {
    w.dead_cols.clear();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < bk; ++c)
        if (!keep[ids[s0 + t] * bk + c]) w.dead_cols.push_back(static_cast<int>(t * bk + c));
    for (int64_t i = 0; i < M; ++i)
      for (int c : w.dead_cols) S[i * L + c] = kNegInf;
  }
}

// log n_i for the bq query rows of block r: the keys each row sees by the tile masks and the key padding (the
// count Softplus scales by; a token-grain selection never comes with a normaliser). At least log 1 = 0.
template <typename T>
void row_log_counts(const Problem<T>& p, int64_t b, int64_t lh, int64_t r, int64_t n_slots, float* logn) {
  const int64_t *ids = p.kv_ids + (lh * p.nqb + r) * p.S, *mids = p.mask_ids + (lh * p.nqb + r) * p.S;
  const bool* keep = p.kpm ? p.kpm + b * p.nk : nullptr;
  std::vector<int64_t> n(p.bq, 0);
  for (int64_t t = 0; t < n_slots; ++t)
    for (int64_t c = 0; c < p.bk; ++c) {
      if (keep && !keep[ids[t] * p.bk + c]) continue;
      for (int64_t i = 0; i < p.bq; ++i) n[i] += mids[t] < 0 || p.tile_masks[(mids[t] * p.bq + i) * p.bk + c];
    }
  for (int64_t i = 0; i < p.bq; ++i) logn[i] = std::log(static_cast<float>(std::max<int64_t>(n[i], 1)));
}

// A row's weights in place of its logits x (n values; -inf marks a pair that does not interact, weight 0) under
// a normaliser other than the softmax; returns their sum. `scale`: log n_i for a length-scaled Softplus, else 1.
inline float weights_row(float* x, int n, const Elementwise& e, float scale) {
  float sum = 0.f;
  int j = 0;
#ifdef ATTNKIT_AVX2
  const __m256 ninf = _mm256_set1_ps(kNegInf), vb = _mm256_set1_ps(e.bias), vs = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 s = _mm256_loadu_ps(x + j), live = _mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ);
    __m256 w, unused;
    if (e.norm == kSigmoid)
      sigmoid_v(_mm256_add_ps(s, vb), w, unused);
    else
      w = softplus_v(_mm256_mul_ps(_mm256_and_ps(s, live), vs));  // masked: softplus(0), zeroed below
    w = _mm256_and_ps(w, live);
    _mm256_storeu_ps(x + j, w);
    acc = _mm256_add_ps(acc, w);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) {
    float w = 0.f, unused;
    if (x[j] != kNegInf) {
      if (e.norm == kSigmoid)
        sigmoid1(x[j] + e.bias, w, unused);
      else
        w = softplus1(x[j] * scale);
    }
    x[j] = w;
    sum += w;
  }
  return sum;
}

// The backward of weights_row on one row: from the logits x and dP = dO V^T in dp, x <- the weight each value was
// given in the output (p, or p / den with the row sum den = e^lse for Softplus) and dp <- dS. Sigmoid:
// dS = dP p (1 - p). Softplus (l1): dS = (dP - delta) / den * sigmoid(z) dz/ds, z = scale s.
inline void weights_grad_row(float* x, float* dp, int n, const Elementwise& e, float scale, float inv_den,
                             float delta) {
  int j = 0;
#ifdef ATTNKIT_AVX2
  const __m256 ninf = _mm256_set1_ps(kNegInf), vb = _mm256_set1_ps(e.bias), vs = _mm256_set1_ps(scale);
  const __m256 vinv = _mm256_set1_ps(inv_den), vd = _mm256_set1_ps(delta);
  for (; j + 8 <= n; j += 8) {
    const __m256 s = _mm256_loadu_ps(x + j), live = _mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ);
    const __m256 g = _mm256_loadu_ps(dp + j);
    __m256 w, ds, sp, sq;
    if (e.norm == kSigmoid) {
      sigmoid_v(_mm256_add_ps(s, vb), sp, sq);
      w = sp;
      ds = _mm256_mul_ps(g, _mm256_mul_ps(sp, sq));
    } else {
      const __m256 z = _mm256_mul_ps(_mm256_and_ps(s, live), vs);
      w = _mm256_mul_ps(softplus_v(z), vinv);
      sigmoid_v(z, sp, sq);
      ds = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(g, vd), vinv), _mm256_mul_ps(sp, vs));
    }
    _mm256_storeu_ps(x + j, _mm256_and_ps(w, live));
    _mm256_storeu_ps(dp + j, _mm256_and_ps(ds, live));
  }
#endif
  for (; j < n; ++j) {
    float w = 0.f, ds = 0.f, sp, sq;
    if (x[j] != kNegInf) {
      if (e.norm == kSigmoid) {
        sigmoid1(x[j] + e.bias, sp, sq);
        w = sp, ds = dp[j] * sp * sq;
      } else {
        const float z = x[j] * scale;
        sigmoid1(z, sp, sq);
        w = softplus1(z) * inv_den, ds = (dp[j] - delta) * inv_den * sp * scale;
      }
    }
    x[j] = w, dp[j] = ds;
  }
}

// Forward of query block r of unit u, whose layout row has n_slots key tiles.
template <typename T>
void forward_item(const Problem<T>& p, int64_t u, int64_t r, int64_t n_slots, Scratch<T>& w) {
  const int64_t b = p.units[4 * u], lh = p.units[4 * u + 1], hk = p.units[4 * u + 2], h0 = p.units[4 * u + 3];
  if (n_slots == 0) return;  // out stays 0, lse -inf
  const int64_t bq = p.bq, D = p.D, Dv = p.Dv, M = p.G * bq;
  const int64_t cap = std::max<int64_t>(1, p.max_keys / p.bk);

  load_q(p, b, h0, r, w);
  for (int64_t i = 0; i < M; ++i) w.bad[i] = any_nonfinite(w.q.data() + i * D, D);
  std::fill(w.m.begin(), w.m.begin() + M, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + M, 0.f);
  std::fill(w.o.begin(), w.o.begin() + M * Dv, 0.f);
  const Elementwise& ew = p.ew;
  if (ew.counts()) row_log_counts(p, b, lh, r, n_slots, w.logn.data());

  for (int64_t s0 = 0; s0 < n_slots; s0 += cap) {
    const int64_t n = std::min(cap, n_slots - s0);
    const int L = static_cast<int>(n * p.bk);
    chunk_scores(p, w, b, lh, hk, h0, r, s0, n);
    float* S = w.s.data();
    for (int64_t i = 0; i < M; ++i) {
      float* x = S + i * L;
      bool nan = false;
      const float mx = std::max(w.m[i], row_max(x, L, nan));
      if (nan || mx == kPosInf) w.bad[i] = 1;
      if (ew.norm != kSoftmax) {  // weights that add up across chunks: no running max, no rescale
        if (w.bad[i])
          std::fill(x, x + L, 0.f);
        else
          w.l[i] += weights_row(x, L, ew, ew.counts() ? w.logn[i % bq] : 1.f);
        continue;
      }
      if (mx == kNegInf || w.bad[i]) {  // nothing visible yet (or a poisoned row): add nothing
        std::fill(x, x + L, 0.f);
        continue;
      }
      const float alpha = std::exp(w.m[i] - mx);  // 0 on the first visible chunk (m = -inf)
      w.l[i] = w.l[i] * alpha + exp_shift_sum(x, L, mx);
      if (alpha != 1.f) {
        float* o = w.o.data() + i * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
      }
      w.m[i] = mx;
    }
    gemm(false, false, static_cast<int>(M), static_cast<int>(Dv), L, 1.f, as_operand<T>(S, M * L, w.p16), L,
         w.vc, static_cast<int>(Dv), 1.f, w.o.data(), static_cast<int>(Dv));
  }

  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t row = g * bq + i, head = h0 + g, pos = r * bq + i;
      float* dst = p.out + ((b * p.Hq + head) * p.nq + pos) * Dv;
      if (w.bad[row]) {  // the caller's finite check on the output names the input
        std::fill(dst, dst + Dv, kNaN);
        p.lse[(b * p.Hq + head) * p.nq + pos] = kNaN;
        continue;
      }
      if (w.l[row] == 0.f) continue;  // no visible key (or no weight): out 0, lse -inf as initialised
      const float inv = ew.norm == kSigmoid ? 1.f : 1.f / w.l[row];  // Sigmoid's weights are not normalised
      const float* o = w.o.data() + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = o[d] * inv;
      p.lse[(b * p.Hq + head) * p.nq + pos] = (ew.norm == kSoftmax ? w.m[row] : 0.f) + std::log(w.l[row]);
    }
}

// Backward of query block r of unit u into dq (its own rows) and the slabs dk, dv of the unit's (batch, kv head).
template <typename T>
void backward_item(const Problem<T>& p, int64_t u, int64_t r, int64_t n_slots, Scratch<T>& w, float* dk, float* dv) {
  const int64_t b = p.units[4 * u], lh = p.units[4 * u + 1], hk = p.units[4 * u + 2], h0 = p.units[4 * u + 3];
  if (n_slots == 0) return;  // dq stays 0
  const int64_t bq = p.bq, bk = p.bk, D = p.D, Dv = p.Dv, M = p.G * bq;
  const int64_t cap = std::max<int64_t>(1, p.max_keys / bk);
  const int64_t* ids = p.kv_ids + (lh * p.nqb + r) * p.S;
  load_q(p, b, h0, r, w);
  load_rows(p.dout, b, h0, r, p, Dv, w.dout.data());
  load_rows(p.lse_in, b, h0, r, p, 1, w.m.data());
  load_rows(p.delta, b, h0, r, p, 1, w.l.data());
  for (int64_t i = 0; i < M; ++i)
    if (w.m[i] == kNegInf) w.m[i] = kPosInf;  // a row with no key: P = exp(S - inf) = 0 (Softplus: 1 / den = 0)
  float* dq = w.o.data();
  std::fill(dq, dq + M * D, 0.f);
  const int iM = static_cast<int>(M), iD = static_cast<int>(D), iDv = static_cast<int>(Dv);
  const Elementwise& ew = p.ew;
  if (ew.counts()) row_log_counts(p, b, lh, r, n_slots, w.logn.data());

  for (int64_t s0 = 0; s0 < n_slots; s0 += cap) {
    const int64_t n = std::min(cap, n_slots - s0);
    const int L = static_cast<int>(n * bk);
    chunk_scores(p, w, b, lh, hk, h0, r, s0, n);
    float *P = w.s.data(), *dS = w.dp.data();
    float* gm = w.grad_mod.data();
    if (ew.mod == kSoftcap)  // from the capped logit, before P overwrites it; a masked pair's dS is 0 anyway
      for (int64_t j = 0; j < M * L; ++j) {
        const float t = P[j] / ew.cap;
        gm[j] = P[j] == kNegInf ? 0.f : 1.f - t * t;
      }
    gemm(false, true, iM, L, iDv, 1.f, w.dout.data(), iDv, w.vc, iDv, 0.f, dS, L);  // dP = dO V^T
    for (int64_t i = 0; i < M; ++i) {
      if (ew.norm == kSoftmax) {
        exp_shift_sum(P + i * L, L, w.m[i]);
        softmax_grad(P + i * L, dS + i * L, L, w.l[i]);
      } else {
        weights_grad_row(P + i * L, dS + i * L, L, ew, ew.counts() ? w.logn[i % bq] : 1.f, std::exp(-w.m[i]),
                         w.l[i]);
      }
    }
    if (ew.mod == kSoftcap)
      for (int64_t j = 0; j < M * L; ++j) dS[j] *= gm[j];
    const T* Pt = as_operand<T>(P, M * L, w.p16);
    const T* dSt = as_operand<T>(dS, M * L, w.ds16);
    for_runs(ids, s0, n, bk, [&](int64_t t, int64_t key0, int64_t len) {
      const int rows = static_cast<int>(len);
      gemm(true, false, rows, iDv, iM, 1.f, Pt + t * bk, L, w.dout.data(), iDv, 1.f, dv + key0 * Dv, iDv);
      gemm(true, false, rows, iD, iM, kScaledQ<T> ? 1.f : p.scale, dSt + t * bk, L, w.q.data(), iD, 1.f,
           dk + key0 * D, iD);
    });
    gemm(false, false, iM, iD, L, p.scale, dSt, L, w.kc, iD, 1.f, dq, iD);
  }
  for (int64_t g = 0; g < p.G; ++g)
    std::memcpy(p.dq + ((b * p.Hq + h0 + g) * p.nq + r * bq) * D, dq + g * bq * D, sizeof(float) * bq * D);
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// select: [] or [rows, cols, diags, q_labels, k_labels, q_positions, k_positions], an empty tensor for an absent term.
Select parse_select(const std::vector<at::Tensor>& select, int64_t groups, int64_t q_offset, int64_t kv_len) {
  Select sel;
  TORCH_CHECK_VALUE(select.empty() || select.size() == 7, "select: expected 0 or 7 tensors, got ", select.size());
  if (select.empty()) return sel;
  auto term = [&](int i, at::ScalarType dtype, int64_t dim, const char* name) -> const at::Tensor* {
    const at::Tensor& t = select[i];
    if (t.numel() == 0) return nullptr;
    check(t, name, dtype, dim);
    TORCH_CHECK_VALUE(t.size(0) == groups, name, ": expected ", groups, " groups, got ", t.size(0));
    return &t;
  };
  if (auto t = term(0, at::kBool, 3, "select.rows")) sel.rows = t->data_ptr<bool>(), sel.rows_q = t->size(1), sel.rows_k = t->size(2);
  if (auto t = term(1, at::kBool, 3, "select.cols")) sel.cols = t->data_ptr<bool>(), sel.cols_q = t->size(1), sel.cols_k = t->size(2);
  if (auto t = term(2, at::kBool, 2, "select.diags")) sel.diags = t->data_ptr<bool>(), sel.diags_n = t->size(1);
  auto ql = term(3, at::kLong, 2, "select.q_labels"), kl = term(4, at::kLong, 2, "select.k_labels");
  TORCH_CHECK_VALUE(!ql == !kl, "select: expected both labels or neither");
  if (ql) sel.q_lab = ql->data_ptr<int64_t>(), sel.lab_q = ql->size(1), sel.k_lab = kl->data_ptr<int64_t>(), sel.lab_k = kl->size(1);
  auto qp = term(5, at::kLong, 2, "select.q_positions"), kp = term(6, at::kLong, 2, "select.k_positions");
  TORCH_CHECK_VALUE(!qp == !kp && (!qp || ql), "select: expected both positions, with labels, or neither");
  if (qp) sel.q_pos = qp->data_ptr<int64_t>(), sel.pos_q = qp->size(1), sel.k_pos = kp->data_ptr<int64_t>(), sel.pos_k = kp->size(1);
  sel.q_offset = q_offset, sel.kv_len = kv_len;
  return sel;
}

// elementwise: (mod, cap, slopes, q_offset, norm, bias, length_scale) as attnkit.backends.tiled._native packs them.
Elementwise parse_elementwise(int64_t mod, double cap, const at::Tensor& slopes, int64_t q_offset, int64_t norm,
                              double bias, bool length_scale, int64_t heads) {
  TORCH_CHECK_VALUE(mod >= kNoMod && mod <= kAlibi, "mod: expected 0 (none), 1 (softcap) or 2 (ALiBi), got ", mod);
  TORCH_CHECK_VALUE(norm >= kSoftmax && norm <= kSoftplus,
                    "norm: expected 0 (softmax), 1 (sigmoid) or 2 (softplus), got ", norm);
  Elementwise e;
  e.mod = mod, e.norm = norm, e.q_offset = q_offset, e.length_scale = length_scale;
  e.cap = static_cast<float>(cap), e.bias = static_cast<float>(bias);
  TORCH_CHECK_VALUE(mod != kSoftcap || cap > 0, "cap: expected a positive number, got ", cap);
  if (mod == kAlibi) {
    check(slopes, "slopes", at::kFloat, 1);
    TORCH_CHECK_VALUE(slopes.size(0) == heads, "slopes: expected one per query head (", heads, "), got ",
                      slopes.size(0));
    e.slopes = slopes.data_ptr<float>();
  }
  return e;
}

template <typename T>
const T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    return t.data_ptr<float>();
  } else {
    return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
  }
}

// The checks and the problem both directions share. Returns per-item costs (key tiles per layout row).
template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_ids,
                   const at::Tensor& mask_ids, const at::Tensor& tile_masks, const c10::optional<at::Tensor>& kpm,
                   const at::Tensor& units, int64_t G, int64_t bq, int64_t bk, double scale, int64_t max_keys,
                   const std::vector<at::Tensor>& select, int64_t q_offset, int64_t kv_len,
                   const Elementwise& ew, std::vector<int64_t>& cost) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16, "q: expected float32 or bfloat16, got ", dt);
  check(q, "q", dt, 4);
  check(k, "k", dt, 4);
  check(v, "v", dt, 4);
  check(kv_ids, "kv_ids", at::kLong, 3);
  check(mask_ids, "mask_ids", at::kLong, 3);
  check(tile_masks, "tile_masks", at::kBool, 3);
  check(units, "units", at::kLong, 2);
  TORCH_CHECK_VALUE(kv_ids.sizes() == mask_ids.sizes(), "mask_ids: expected the shape of kv_ids");
  Problem<T> p{};
  p.q = data<T>(q);
  p.k = data<T>(k);
  p.v = data<T>(v);
  p.kv_ids = kv_ids.data_ptr<int64_t>();
  p.mask_ids = mask_ids.data_ptr<int64_t>();
  p.units = units.data_ptr<int64_t>();
  p.tile_masks = tile_masks.numel() ? tile_masks.data_ptr<bool>() : nullptr;
  p.kpm = nullptr;
  if (kpm.has_value()) {
    check(*kpm, "key_padding_mask", at::kBool, 2);
    p.kpm = kpm->data_ptr<bool>();
  }
  p.select = parse_select(select, kv_ids.size(0), q_offset, kv_len);
  p.ew = ew;
  p.Hq = q.size(1), p.nq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.nk = k.size(2), p.Dv = v.size(3);
  p.nqb = kv_ids.size(1), p.S = kv_ids.size(2);
  p.G = G;
  p.bq = bq, p.bk = bk;
  p.scale = static_cast<float>(scale);
  p.max_keys = max_keys;
  TORCH_CHECK_VALUE(p.nqb * p.bq == p.nq, "q: expected ", p.nqb, " whole query blocks of ", bq, ", got ", p.nq, " rows");
  TORCH_CHECK_VALUE(p.nk % bk == 0, "k: expected whole key blocks of ", bk, ", got ", p.nk, " rows");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == p.Hkv && v.size(2) == p.nk &&
                        k.size(3) == p.D,
                    "k, v: expected (", q.size(0), ", Hkv, nk, ", p.D, ") and (", q.size(0), ", Hkv, nk, Dv)");
  TORCH_CHECK_VALUE(tile_masks.numel() == 0 || (tile_masks.size(1) == bq && tile_masks.size(2) == bk),
              "tile_masks: expected (T, ", bq, ", ", bk, ")");
  TORCH_CHECK_VALUE(units.size(1) == 4, "units: expected (U, 4) rows of (batch, layout row, kv head, first q head)");
  const int64_t U = units.size(0), groups = kv_ids.size(0), nkb = p.nk / bk, masks = tile_masks.size(0);
  cost.assign(U * p.nqb, 0);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t b = p.units[4 * u], lh = p.units[4 * u + 1], hk = p.units[4 * u + 2], h0 = p.units[4 * u + 3];
    TORCH_CHECK_VALUE(b >= 0 && b < q.size(0) && lh >= 0 && lh < groups && hk >= 0 && hk < p.Hkv && h0 >= 0 &&
                    h0 + G <= p.Hq,
                "units: row ", u, " is out of range");
    for (int64_t r = 0; r < p.nqb; ++r) {
      const int64_t n = row_slots(p, lh, r), *ids = p.kv_ids + (lh * p.nqb + r) * p.S;
      const int64_t* mids = p.mask_ids + (lh * p.nqb + r) * p.S;
      for (int64_t s = 0; s < n; ++s)
        TORCH_CHECK_VALUE(ids[s] >= 0 && ids[s] < nkb && mids[s] < masks && mids[s] >= -1, "kv_ids/mask_ids: slot (",
                          lh, ", ", r, ", ", s, ") points outside the keys or the tile masks");
      cost[u * p.nqb + r] = n;
    }
  }
  return p;
}

// Runs f(task, scratch) for tasks [0, n) on torch's threads, each worker with its own scratch and MKL on one thread.
template <typename T, typename F>
void parallel_tasks(const Problem<T>& p, int64_t n, bool backward, F f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch<T> w(p, backward);
    const int before = MKL_Set_Num_Threads_Local(1);
    for (int64_t i = next++; i < n; i = next++) f(i, w);
    MKL_Set_Num_Threads_Local(before);
  });
}

template <typename T>
std::vector<at::Tensor> forward_t(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_ids, const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                                  const c10::optional<at::Tensor>& kpm, const at::Tensor& units, int64_t G, int64_t bq,
                                  int64_t bk, double scale, int64_t max_keys, const std::vector<at::Tensor>& select,
                                  int64_t q_offset, int64_t kv_len, const Elementwise& ew) {
  std::vector<int64_t> cost;
  Problem<T> p = problem<T>(q, k, v, kv_ids, mask_ids, tile_masks, kpm, units, G, bq, bk, scale, max_keys, select,
                            q_offset, kv_len, ew, cost);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({q.size(0), p.Hq, p.nq, p.Dv}, f32);
  at::Tensor lse = at::full({q.size(0), p.Hq, p.nq}, kNegInf, f32);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  parallel_tasks(p, static_cast<int64_t>(order.size()), false, [&](int64_t i, Scratch<T>& w) {
    forward_item(p, order[i] / p.nqb, order[i] % p.nqb, cost[order[i]], w);
  });
  return {out, lse};
}

template <typename T>
std::vector<at::Tensor> backward_t(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                                   const at::Tensor& kv_ids, const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                                   const c10::optional<at::Tensor>& kpm, const at::Tensor& units, int64_t G,
                                   int64_t bq, int64_t bk, double scale, int64_t max_keys,
                                   const std::vector<at::Tensor>& select, int64_t q_offset, int64_t kv_len,
                                   const Elementwise& ew) {
  std::vector<int64_t> cost;
  Problem<T> p = problem<T>(q, k, v, kv_ids, mask_ids, tile_masks, kpm, units, G, bq, bk, scale, max_keys, select,
                            q_offset, kv_len, ew, cost);
  check(dout, "dout", q.scalar_type(), 4);
  check(lse, "lse", at::kFloat, 3);
  check(delta, "delta", at::kFloat, 3);
  TORCH_CHECK_VALUE(dout.size(0) == q.size(0) && dout.size(1) == p.Hq && dout.size(2) == p.nq && dout.size(3) == p.Dv,
                    "dout: expected the output's shape (", q.size(0), ", ", p.Hq, ", ", p.nq, ", ", p.Dv, ")");
  TORCH_CHECK_VALUE(lse.sizes() == delta.sizes() && lse.size(0) == q.size(0) && lse.size(1) == p.Hq &&
                        lse.size(2) == p.nq,
                    "lse, delta: expected (", q.size(0), ", ", p.Hq, ", ", p.nq, ")");
  p.dout = data<T>(dout);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros({q.size(0), p.Hq, p.nq, p.D}, f32);
  at::Tensor dk = at::zeros({q.size(0), p.Hkv, p.nk, p.D}, f32);
  at::Tensor dv = at::zeros({q.size(0), p.Hkv, p.nk, p.Dv}, f32);
  p.dq = dq.data_ptr<float>(), p.dk = dk.data_ptr<float>(), p.dv = dv.data_ptr<float>();

  // Items (unit, query block) grouped by the (batch, kv head) whose dK, dV they add to; a group is cut into `cuts`
  // ranges of near-equal cost so that every thread has work even with few groups.
  const int64_t U = units.size(0), B = q.size(0), n_groups = B * p.Hkv;
  std::vector<std::vector<int64_t>> items(n_groups);
  std::vector<int64_t> group_cost(n_groups, 0);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t gid = p.units[4 * u] * p.Hkv + p.units[4 * u + 2];
    for (int64_t r = 0; r < p.nqb; ++r)
      if (cost[u * p.nqb + r] > 0) items[gid].push_back(u * p.nqb + r), group_cost[gid] += cost[u * p.nqb + r];
  }
  const int64_t threads = at::get_num_threads();
  const int64_t cuts = std::max<int64_t>(1, (2 * threads + n_groups - 1) / n_groups);
  struct Task {
    int64_t group, begin, end, cost;
  };
  std::vector<Task> tasks;
  for (int64_t gid = 0; gid < n_groups; ++gid) {
    const auto& it = items[gid];
    int64_t begin = 0, acc = 0, c = 1;
    for (int64_t i = 0; i < static_cast<int64_t>(it.size()); ++i) {
      acc += cost[it[i]];
      if (acc * cuts >= c * group_cost[gid] || i + 1 == static_cast<int64_t>(it.size())) {
        tasks.push_back({gid, begin, i + 1, 0});
        for (int64_t j = begin; j <= i; ++j) tasks.back().cost += cost[it[j]];
        begin = i + 1, ++c;
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::vector<int64_t> per_group(n_groups, 0);
  for (const Task& t : tasks) ++per_group[t.group];
  // A group of one task adds straight into dk, dv; the tasks of a cut group each into a zeroed slab of their own.
  const int64_t slab = p.nk * (p.D + p.Dv);
  std::vector<int64_t> slab_of(tasks.size(), -1);
  int64_t n_slabs = 0;
  for (size_t i = 0; i < tasks.size(); ++i)
    if (per_group[tasks[i].group] > 1) slab_of[i] = n_slabs++;
  std::vector<float> slabs(n_slabs * slab, 0.f);
  parallel_tasks(p, static_cast<int64_t>(tasks.size()), true, [&](int64_t i, Scratch<T>& w) {
    const Task& t = tasks[i];
    float *dkg = p.dk + t.group * p.nk * p.D, *dvg = p.dv + t.group * p.nk * p.Dv;
    if (slab_of[i] >= 0) dkg = slabs.data() + slab_of[i] * slab, dvg = dkg + p.nk * p.D;
    for (int64_t j = t.begin; j < t.end; ++j) {
      const int64_t item = items[t.group][j];
      backward_item(p, item / p.nqb, item % p.nqb, cost[item], w, dkg, dvg);
    }
  });
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (slab_of[i] < 0) continue;
    const float* s = slabs.data() + slab_of[i] * slab;
    float *dkg = p.dk + tasks[i].group * p.nk * p.D, *dvg = p.dv + tasks[i].group * p.nk * p.Dv;
    for (int64_t j = 0; j < p.nk * p.D; ++j) dkg[j] += s[j];
    for (int64_t j = 0; j < p.nk * p.Dv; ++j) dvg[j] += s[p.nk * p.D + j];
  }
  return {dq, dk, dv};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_ids, const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                                const c10::optional<at::Tensor>& kpm, const at::Tensor& units, int64_t G, int64_t bq,
                                int64_t bk, double scale, int64_t max_keys, const std::vector<at::Tensor>& select,
                                int64_t q_offset, int64_t kv_len, int64_t mod, double cap, const at::Tensor& slopes,
                                int64_t mod_q_offset, int64_t norm, double bias, bool length_scale) {
  const Elementwise ew = parse_elementwise(mod, cap, slopes, mod_q_offset, norm, bias, length_scale, q.size(1));
  auto run = q.scalar_type() == at::kBFloat16 ? forward_t<bf16> : forward_t<float>;
  return run(q, k, v, kv_ids, mask_ids, tile_masks, kpm, units, G, bq, bk, scale, max_keys, select, q_offset, kv_len,
             ew);
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& kv_ids,
                                 const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                                 const c10::optional<at::Tensor>& kpm, const at::Tensor& units, int64_t G, int64_t bq,
                                 int64_t bk, double scale, int64_t max_keys, const std::vector<at::Tensor>& select,
                                 int64_t q_offset, int64_t kv_len, int64_t mod, double cap, const at::Tensor& slopes,
                                 int64_t mod_q_offset, int64_t norm, double bias, bool length_scale) {
  const Elementwise ew = parse_elementwise(mod, cap, slopes, mod_q_offset, norm, bias, length_scale, q.size(1));
  auto run = q.scalar_type() == at::kBFloat16 ? backward_t<bf16> : backward_t<float>;
  return run(dout, q, k, v, lse, delta, kv_ids, mask_ids, tile_masks, kpm, units, G, bq, bk, scale, max_keys, select,
             q_offset, kv_len, ew);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward,
        "Block-sparse attention forward over a BlockLayout (and its TokenSelect), float32 or bf16, softmax or "
        "another normaliser, with or without a score mod: (out, lse) in float32",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward,
        "Its backward from the saved lse and delta = rowsum(dout * out): (dq, dk, dv) in float32",
        py::call_guard<py::gil_scoped_release>());
}
