// The forward of attnkit's `tiled` kernel for plain softmax, as one C++ loop over the tiles of a BlockLayout.
//
// For a work item (batch b, head unit u, query block r) with key tiles T(r) = kv_ids[lh, r, :]:
//
//   S_c = (scale Q_r) K_c^T  (+ -inf where the tile mask or the key padding says no)     c: a chunk of T(r)
//   m   = max(m, rowmax S_c);   l = l e^{m_old - m} + rowsum e^{S_c - m};   O = O e^{m_old - m} + e^{S_c - m} V_c
//   out = O / l,  lse = m + log l       (a row that saw no key: out = 0, lse = -inf)
//
// The K and V rows of a chunk are copied into a per-thread buffer of at most `max_keys` keys (a run of consecutive
// key blocks is one copy), so both products are single BLAS calls on cache-resident operands and no tensor the
// size of the selection is ever made. Work items are taken from a shared counter, longest rows first, because the
// rows of a dynamic selection differ in length by an order of magnitude.
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

// Fortran BLAS as exported by libtorch_cpu (MKL, 32-bit integers): the same sgemm torch's own CPU matmul calls.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count: each worker's small products run on that worker alone (MKL would otherwise
// start its own team inside every call and oversubscribe the cores). Returns the previous setting.
extern "C" int MKL_Set_Num_Threads_Local(int n);

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Row-major C (M x N) = A (M x K) B^T, B given as (N x K): column-major C^T = B A^T.
void gemm_abt(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("T", "N", &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

// Row-major C (M x N) += A (M x K) B, B given as (K x N): column-major C^T += B^T A^T.
void gemm_ab_acc(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  const float one = 1.f;
  sgemm_("N", "N", &N, &M, &K, &one, B, &ldb, A, &lda, &one, C, &ldc);
}

#ifdef ATTNKIT_AVX2
// exp(x) for x <= 0 (the argument is always S - rowmax): Cephes' expf (2^n e^r, |r| <= ln2 / 2, a degree-5
// polynomial, about 1 ulp), and exactly 0 below -87.3 where float underflows (this is where -inf lands).
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
  alignas(32) float t[8];
  _mm256_store_ps(t, vs);
  for (float v : t) s += v;
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
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

struct Problem {
  const float *q, *k, *v;
  const int64_t *kv_ids, *mask_ids, *units;
  const bool *tile_masks, *kpm;  // kpm: (B, nk), true for real keys; null when every key is real
  float *out, *lse;
  int64_t Hq, Hkv, nq, nk, D, Dv, nqb, S, bq, bk, G;
  float scale;
  int64_t max_keys;
  Select select;
};

struct Scratch {
  std::vector<float> q, k, v, s, o, m, l;
  std::vector<char> bad;  // (M,): a non-finite q or logit reached the row; its output becomes NaN
  std::vector<int> dead_cols;
  std::vector<char> allow;  // (bq, bk): the pairs of one tile that interact
  explicit Scratch(const Problem& p) {
    const int64_t M = p.G * p.bq, L = std::max<int64_t>(p.bk, (p.max_keys / p.bk) * p.bk);
    q.resize(M * p.D);
    k.resize(L * p.D);
    v.resize(L * p.Dv);
    s.resize(M * L);
    o.resize(M * p.Dv);
    m.resize(M);
    l.resize(M);
    bad.resize(M);
    allow.resize(p.bq * p.bk);
  }
};

int64_t row_slots(const Problem& p, int64_t lh, int64_t r) {
  const int64_t* ids = p.kv_ids + (lh * p.nqb + r) * p.S;
  int64_t n = 0;
  while (n < p.S && ids[n] >= 0) ++n;
  return n;
}

// Query block r of unit u, whose layout row has n_slots key tiles.
void run_item(const Problem& p, int64_t u, int64_t r, int64_t n_slots, Scratch& w) {
  const int64_t b = p.units[4 * u], lh = p.units[4 * u + 1], hk = p.units[4 * u + 2], h0 = p.units[4 * u + 3];
  if (n_slots == 0) return;  // out stays 0, lse -inf
  const int64_t* ids = p.kv_ids + (lh * p.nqb + r) * p.S;
  const int64_t* mids = p.mask_ids + (lh * p.nqb + r) * p.S;
  const int64_t bq = p.bq, bk = p.bk, D = p.D, Dv = p.Dv, M = p.G * bq;
  const int64_t cap = std::max<int64_t>(1, p.max_keys / bk);

  std::fill(w.bad.begin(), w.bad.begin() + M, 0);
  for (int64_t g = 0; g < p.G; ++g) {
    const float* src = p.q + ((b * p.Hq + h0 + g) * p.nq + r * bq) * D;
    float* dst = w.q.data() + g * bq * D;
    for (int64_t i = 0; i < bq * D; ++i) dst[i] = src[i] * p.scale;
    for (int64_t i = 0; i < bq; ++i)
      for (int64_t d = 0; d < D; ++d)
        if (!std::isfinite(src[i * D + d])) w.bad[g * bq + i] = 1;
  }
  std::fill(w.m.begin(), w.m.begin() + M, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + M, 0.f);
  std::fill(w.o.begin(), w.o.begin() + M * Dv, 0.f);
  const float* kb = p.k + (b * p.Hkv + hk) * p.nk * D;
  const float* vb = p.v + (b * p.Hkv + hk) * p.nk * Dv;
  const bool* keep = p.kpm ? p.kpm + b * p.nk : nullptr;

  for (int64_t s0 = 0; s0 < n_slots; s0 += cap) {
    const int64_t n = std::min(cap, n_slots - s0);
    const int L = static_cast<int>(n * bk);
    // Gather the chunk's keys and values; consecutive key blocks are one copy.
    for (int64_t t = 0; t < n;) {
      int64_t e = t + 1;
      while (e < n && ids[s0 + e] == ids[s0 + e - 1] + 1) ++e;
      const int64_t key0 = ids[s0 + t] * bk, len = (e - t) * bk;
      std::memcpy(w.k.data() + t * bk * D, kb + key0 * D, sizeof(float) * len * D);
      std::memcpy(w.v.data() + t * bk * Dv, vb + key0 * Dv, sizeof(float) * len * Dv);
      t = e;
    }
    float* S = w.s.data();
    gemm_abt(static_cast<int>(M), L, static_cast<int>(D), w.q.data(), static_cast<int>(D), w.k.data(),
             static_cast<int>(D), S, L);
    // A non-finite key can give a logit of -inf, which would read as masked: its column becomes NaN before the
    // masks, so a row that may see it is marked bad (row_max) and a row that may not is masked as usual.
    for (int c = 0; c < L; ++c) {
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(w.k.data() + c * D);
      uint32_t all = 0;
      for (int64_t d = 0; d < D; ++d) all |= ((bits[d] & 0x7f800000u) == 0x7f800000u);
      if (all)
        for (int64_t i = 0; i < M; ++i) S[i * L + c] = std::numeric_limits<float>::quiet_NaN();
    }
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
    if (keep) {
      w.dead_cols.clear();
      for (int64_t t = 0; t < n; ++t)
        for (int64_t c = 0; c < bk; ++c)
          if (!keep[ids[s0 + t] * bk + c]) w.dead_cols.push_back(static_cast<int>(t * bk + c));
      for (int64_t i = 0; i < M; ++i)
        for (int c : w.dead_cols) S[i * L + c] = kNegInf;
    }
    for (int64_t i = 0; i < M; ++i) {
      float* x = S + i * L;
      bool nan = false;
      const float mx = std::max(w.m[i], row_max(x, L, nan));
      if (nan || mx == kPosInf) w.bad[i] = 1;
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
    gemm_ab_acc(static_cast<int>(M), static_cast<int>(Dv), L, S, L, w.v.data(), static_cast<int>(Dv), w.o.data(),
                static_cast<int>(Dv));
  }

  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t row = g * bq + i, head = h0 + g, pos = r * bq + i;
      float* dst = p.out + ((b * p.Hq + head) * p.nq + pos) * Dv;
      if (w.bad[row]) {  // the caller's finite check on the output names the input
        std::fill(dst, dst + Dv, std::numeric_limits<float>::quiet_NaN());
        p.lse[(b * p.Hq + head) * p.nq + pos] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (w.l[row] == 0.f) continue;  // no visible key: out 0, lse -inf as initialised
      const float inv = 1.f / w.l[row];
      const float* o = w.o.data() + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = o[d] * inv;
      p.lse[(b * p.Hq + head) * p.nq + pos] = w.m[row] + std::log(w.l[row]);
    }
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_ids, const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                                const c10::optional<at::Tensor>& kpm, const at::Tensor& units, int64_t G, int64_t bq,
                                int64_t bk, double scale, int64_t max_keys, const std::vector<at::Tensor>& select,
                                int64_t q_offset, int64_t kv_len) {
  check(q, "q", at::kFloat, 4);
  check(k, "k", at::kFloat, 4);
  check(v, "v", at::kFloat, 4);
  check(kv_ids, "kv_ids", at::kLong, 3);
  check(mask_ids, "mask_ids", at::kLong, 3);
  check(tile_masks, "tile_masks", at::kBool, 3);
  check(units, "units", at::kLong, 2);
  TORCH_CHECK_VALUE(kv_ids.sizes() == mask_ids.sizes(), "mask_ids: expected the shape of kv_ids");
  Problem p{};
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.kv_ids = kv_ids.data_ptr<int64_t>();
  p.mask_ids = mask_ids.data_ptr<int64_t>();
  p.units = units.data_ptr<int64_t>();
  p.tile_masks = tile_masks.numel() ? tile_masks.data_ptr<bool>() : nullptr;
  p.kpm = nullptr;
  if (kpm.has_value()) {
    check(*kpm, "key_padding_mask", at::kBool, 2);
    p.kpm = kpm->data_ptr<bool>();
  }
  // select: [] or [rows, cols, diags, q_labels, k_labels, q_positions, k_positions], an empty tensor for an absent term.
  TORCH_CHECK_VALUE(select.empty() || select.size() == 7, "select: expected 0 or 7 tensors, got ", select.size());
  if (!select.empty()) {
    const int64_t groups = kv_ids.size(0);
    auto term = [&](int i, at::ScalarType dtype, int64_t dim, const char* name) -> const at::Tensor* {
      const at::Tensor& t = select[i];
      if (t.numel() == 0) return nullptr;
      check(t, name, dtype, dim);
      TORCH_CHECK_VALUE(t.size(0) == groups, name, ": expected ", groups, " groups, got ", t.size(0));
      return &t;
    };
    Select& sel = p.select;
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
  }
  p.Hq = q.size(1), p.nq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.nk = k.size(2), p.Dv = v.size(3);
  p.nqb = kv_ids.size(1), p.S = kv_ids.size(2);
  p.G = G;
  p.bq = bq, p.bk = bk;
  p.scale = static_cast<float>(scale);
  p.max_keys = max_keys;
  TORCH_CHECK_VALUE(p.nqb * p.bq == p.nq, "q: expected ", p.nqb, " whole query blocks of ", bq, ", got ", p.nq, " rows");
  TORCH_CHECK_VALUE(p.nk % bk == 0, "k: expected whole key blocks of ", bk, ", got ", p.nk, " rows");
  TORCH_CHECK_VALUE(tile_masks.numel() == 0 || (tile_masks.size(1) == bq && tile_masks.size(2) == bk),
              "tile_masks: expected (T, ", bq, ", ", bk, ")");
  TORCH_CHECK_VALUE(units.size(1) == 4, "units: expected (U, 4) rows of (batch, layout row, kv head, first q head)");
  auto out = at::zeros({q.size(0), p.Hq, p.nq, p.Dv}, q.options());
  auto lse = at::full({q.size(0), p.Hq, p.nq}, kNegInf, q.options());
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();

  const int64_t U = units.size(0), items = U * p.nqb;
  std::vector<int64_t> cost(items), order(items);
  const int64_t groups = kv_ids.size(0), nkb = p.nk / bk, masks = tile_masks.size(0);
  for (int64_t u = 0; u < U; ++u) {
    const int64_t b = p.units[4 * u], lh = p.units[4 * u + 1], hk = p.units[4 * u + 2], h0 = p.units[4 * u + 3];
    TORCH_CHECK_VALUE(b >= 0 && b < q.size(0) && lh >= 0 && lh < groups && hk >= 0 && hk < p.Hkv && h0 >= 0 &&
                    h0 + G <= p.Hq,
                "units: row ", u, " is out of range");
    for (int64_t r = 0; r < p.nqb; ++r) {
      const int64_t n = row_slots(p, lh, r), *ids = p.kv_ids + (lh * p.nqb + r) * p.S;
      const int64_t* mids = p.mask_ids + (lh * p.nqb + r) * p.S;
      for (int64_t s = 0; s < n; ++s)
        TORCH_CHECK_VALUE(ids[s] < nkb && mids[s] < masks && mids[s] >= -1, "kv_ids/mask_ids: slot (", lh, ", ",
                          r, ", ", s, ") points outside the keys or the tile masks");
      cost[u * p.nqb + r] = n;
    }
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch w(p);
    const int before = MKL_Set_Num_Threads_Local(1);
    for (int64_t i = next++; i < items; i = next++) run_item(p, order[i] / p.nqb, order[i] % p.nqb, cost[order[i]], w);
    MKL_Set_Num_Threads_Local(before);
  });
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Block-sparse softmax attention forward over a BlockLayout (and its TokenSelect): (out, lse)",
        py::call_guard<py::gil_scoped_release>());
}
