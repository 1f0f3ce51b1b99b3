// Fused CPU kernel for the Subset-Norm update (one pass over each tensor where the
// layout allows). The readable definition is snsm.optimizer.sn_step_; this kernel
// must match it within float tolerance (tests/test_kernels.py).
//
//   m <- beta1 m + (1 - beta1) g                  (if m is given; else n = g)
//   v_i <- v_decay v_i + v_gain sum_{j in S_i} g_j^2   (if update_v)
//   p <- (p - step * n / (sqrt(v_i) + eps)) * decay    (n / 1 when v is empty)
//
// Layouts: 0 coordinate-wise (v shaped like p), 1 rows (subsets are contiguous
// runs of `row_len` elements), 2 columns (p viewed as rows x row_len, one subset
// per column).
//
// The one-pass Subspace-Momentum step of a dense-basis matrix, block by block of the
// tall frame's rows (see its comment below).
// fused_step: both for lists of tensors in one parallel region, the memory-bound
// passes beside the compute-bound GEMM blocks (what the optimizer calls once a step),
// and the step counters moved by one; every argument is checked before anything changes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

// The BLAS that torch's CPU build exports (MKL or OpenBLAS, Fortran interface). Weak:
// where a build has none, sm_step_available() is false and the caller takes the
// unfused subspace step.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// built with -O3 -fno-math-errno (lets sqrt vectorize; results unchanged) -fopenmp -march=native

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task

// sum_j g_j^2 in kLanes independent partial sums (four 8-wide vectors on AVX2): one
// accumulator would make every add wait for the one before, and a 512-wide row then
// costs as long in adds as its bytes take to arrive.
constexpr int64_t kLanes = 32;

inline float square_sum(const float* __restrict g, int64_t len) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += g[j + k] * g[j + k];
  }
  float s = 0.f;
  for (; j < len; ++j) s += g[j] * g[j];
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

void check(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
  if (numel >= 0) TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

// Column-major C <- alpha op(A) op(B) + beta C (the BLAS convention; a row-major
// matrix is its column-major transpose).
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int m_ = m, n_ = n, k_ = k, lda_ = lda, ldb_ = ldb, ldc_ = ldc;
  sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
}

#if defined(__AVX2__) && defined(__FMA__)
#define SNSM_MICRO_GEMM 1
#include <immintrin.h>
// The rank-r products of the one-pass subspace step, register-blocked for AVX2 + FMA. Their
// operands are thin (r wide) and the gradient streams from memory, which a general sgemm
// called block by block handles poorly: measured on a 2-core AVX2 machine in the one-pass step
// of a 32000 x 256 matrix (rank 64), about 57 GFLOP/s a core with the BLAS torch ships, 74
// with these tiles and their prefetches (the core's FMA peak is about 100). A wide frame's
// block is first transposed into cache (8 x 8 tiles in registers), then runs on them as a
// tall one's does. One micro-tile is MR x 16 outputs in 2 MR vector accumulators:
//
//   acc = A[MR x K] B[K x 16];   C = acc   or   C += alpha acc   (a partial tile: its first `valid` columns)
//
// with its operands in one of two layouts (`ld` their one stride):
//   Packed  A row-major, element (i, k) at A + i ld + k; B packed, its row k at B + 16 k (the
//           subspace step's products);
//   Gram    both are rows of one row-major matrix: element (i, k) of A at A + k ld + i, row k
//           of B at B + k ld (A^T A, see gram).
enum class Layout { Packed, Gram };

template <int MR, Layout L>
inline void micro_tile(int64_t K, const float* __restrict A, int64_t ld, const float* __restrict B,
                       float* __restrict C, int64_t ldc, float alpha, bool accumulate, int64_t valid) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
#pragma GCC unroll 4  // 5-10% faster than one k a turn (LLaMA-20M/60M shapes, 2 threads)
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = L == Layout::Gram ? B + k * ld : B + 16 * k;
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(L == Layout::Gram ? A + k * ld + i : A + i * ld + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  if (valid == 16) {
    const __m256 al = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* c = C + i * ldc;
      if (accumulate) {
        _mm256_storeu_ps(c, _mm256_fmadd_ps(al, c0[i], _mm256_loadu_ps(c)));
        _mm256_storeu_ps(c + 8, _mm256_fmadd_ps(al, c1[i], _mm256_loadu_ps(c + 8)));
      } else {
        _mm256_storeu_ps(c, c0[i]);
        _mm256_storeu_ps(c + 8, c1[i]);
      }
    }
    return;
  }
  alignas(32) float tile[MR * 16];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tile + 16 * i, c0[i]);
    _mm256_store_ps(tile + 16 * i + 8, c1[i]);
  }
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < valid; ++j)
      C[i * ldc + j] = accumulate ? C[i * ldc + j] + alpha * tile[16 * i + j] : tile[16 * i + j];
}

// micro_tile for a strip of `mr` rows (1 to 6; six is the full tile).
template <Layout L>
inline void strip_tile(int64_t mr, int64_t K, const float* A, int64_t ld, const float* B, float* C, int64_t ldc,
                       float alpha, bool accumulate, int64_t valid) {
  switch (mr) {
    case 6: micro_tile<6, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
    case 5: micro_tile<5, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
    case 4: micro_tile<4, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
    case 3: micro_tile<3, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
    case 2: micro_tile<2, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
    default: micro_tile<1, L>(K, A, ld, B, C, ldc, alpha, accumulate, valid); break;
  }
}

// Asks for the cache lines of p[0, len) ahead of use: into L1 (near) or L2.
inline void prefetch_lines(const float* p, int64_t len, bool near) {
  for (int64_t j = 0; j < len; j += 16)
    _mm_prefetch(reinterpret_cast<const char*>(p + j), near ? _MM_HINT_T0 : _MM_HINT_T1);
}

// Prefetches (into L2) elements [e0, e1) of a region of rows `len` long (row stride ld),
// counted row by row.
inline void prefetch_region(const float* p, int64_t len, int64_t ld, int64_t e0, int64_t e1) {
  while (e0 < e1) {
    const int64_t row = e0 / len, col = e0 % len, end = std::min(e1 - row * len, len);
    prefetch_lines(p + row * ld + col, end - col, false);
    e0 = row * len + end;
  }
}

// C[rows x cols] (+)= A[rows x K] Bp, Bp packed in 16-column tiles (tile t at Bp + 16 K t, the
// last one possibly partial), six rows of A at a time. While a strip of six rows runs, the next
// strip of A is fetched into L1 and, if W is given, a share of the region W (W_rows rows of
// W_len values, row stride ldw) into L2, spread over the strip's tiles: the block's gradient
// then arrives while the FMAs run, and the parameter is in cache for the update that follows.
void micro_gemm(int64_t rows, int64_t K, int64_t cols, const float* A, int64_t lda, const float* Bp, float* C,
                int64_t ldc, float alpha, bool accumulate, const float* W = nullptr, int64_t W_rows = 0,
                int64_t W_len = 0, int64_t ldw = 0) {
  const int64_t tiles = (cols + 15) / 16, strips = (rows + 5) / 6;
  for (int64_t s = 0, i = 0; i < rows; ++s, i += 6) {
    const float* a = A + i * lda;
    float* c = C + i * ldc;
    const int64_t next = std::max<int64_t>(0, std::min<int64_t>(6, rows - i - 6)) * lda;  // next strip of A
    const int64_t w0 = W ? s * W_rows / strips * W_len : 0, wl = W ? (s + 1) * W_rows / strips * W_len - w0 : 0;
    const int64_t na = (next + tiles - 1) / tiles, nw = (wl + tiles - 1) / tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      if (next) prefetch_lines(a + 6 * lda + t * na, std::min(na, next - t * na), true);
      if (wl) prefetch_region(W, W_len, ldw, w0 + std::min(wl, t * nw), w0 + std::min(wl, (t + 1) * nw));
      const float* b = Bp + t * K * 16;
      const int64_t valid = std::min<int64_t>(16, cols - 16 * t);
      strip_tile<Layout::Packed>(std::min<int64_t>(6, rows - i), K, a, lda, b, c + 16 * t, ldc, alpha, accumulate,
                                 valid);
    }
  }
}

// The 8 x 8 tile at s (row stride lds), transposed into t[0..8): t[i] holds column i.
inline void transpose8(const float* s, int64_t lds, __m256 t[8]) {
  __m256 r[8], u[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * lds);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    u[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    u[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u: rows a, b interleaved, (a0 b0 a1 b1 | a4 b4 a5 b5) and (a2 b2 a3 b3 | a6 b6 a7 b7); then
  // r: four rows' columns i and i + 4, (a0 b0 c0 d0 | a4 b4 c4 d4) for i = 0; t: the halves joined
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256* a = u + 4 * h;
    r[4 * h] = _mm256_shuffle_ps(a[0], a[2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 1] = _mm256_shuffle_ps(a[0], a[2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * h + 2] = _mm256_shuffle_ps(a[1], a[3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 3] = _mm256_shuffle_ps(a[1], a[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
}

// T[j, k] = A[k, j] for k < K, j < B (A row stride lda, T row stride ldt).
void transpose_into(const float* A, int64_t lda, int64_t K, int64_t B, float* T, int64_t ldt) {
  const int64_t K8 = K / 8 * 8, B8 = B / 8 * 8;
  __m256 c[8];
  for (int64_t k = 0; k < K8; k += 8) {
    for (int64_t j = 0; j < B8; j += 8) {
      transpose8(A + k * lda + j, lda, c);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(T + (j + i) * ldt + k, c[i]);
    }
    for (int64_t i = k; i < k + 8; ++i)
      for (int64_t j = B8; j < B; ++j) T[j * ldt + i] = A[i * lda + j];
  }
  for (int64_t i = K8; i < K; ++i)
    for (int64_t j = 0; j < B; ++j) T[j * ldt + i] = A[i * lda + j];
}

// W[k, j] = W[k, j] decay + U[j, k] for k < K, j < B (W row stride ldw, U row stride ldu).
void add_transposed(const float* U, int64_t ldu, int64_t B, int64_t K, float* W, int64_t ldw, float decay) {
  const int64_t K8 = K / 8 * 8, B8 = B / 8 * 8;
  const __m256 dc = _mm256_set1_ps(decay);
  __m256 c[8];
  for (int64_t k = 0; k < K8; k += 8) {
    for (int64_t j = 0; j < B8; j += 8) {
      transpose8(U + j * ldu + k, ldu, c);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        float* w = W + (k + i) * ldw + j;
        _mm256_storeu_ps(w, _mm256_fmadd_ps(_mm256_loadu_ps(w), dc, c[i]));
      }
    }
    for (int64_t i = k; i < k + 8; ++i)
      for (int64_t j = B8; j < B; ++j) W[i * ldw + j] = W[i * ldw + j] * decay + U[j * ldu + i];
  }
  for (int64_t i = K8; i < K; ++i)
    for (int64_t j = 0; j < B; ++j) W[i * ldw + j] = W[i * ldw + j] * decay + U[j * ldu + i];
}

#else
#define SNSM_MICRO_GEMM 0
#endif

}  // namespace

void sn_accumulate(at::Tensor g, at::Tensor v, int64_t layout, int64_t row_len, double v_decay, double v_gain);

namespace {

// One tensor's sn_step, checked and ready to run over any range of its units: elements
// (coordinate-wise or no v) or rows (subsets by row; by column, with the column
// denominators computed beforehand). A deferred column task is one unit, the whole
// matrix on one thread: the column sums row by row, then the update while the
// gradient is still in cache (what fused_step does with a matrix of at most
// kDeferMax elements, instead of a strided pass over it before everything else).
struct SnTask {
  float* P;
  const float* G;
  float* M;
  float* V;
  bool has_m, has_v, update_v, deferred = false;
  int64_t layout, row_len, units, unit_len, rows = 0;
  std::vector<float> denom;  // layout 2: step / (sqrt(v_j) + eps) per column
  float b1, c1, vd, vg, e, st, dc;
};

constexpr int64_t kDeferMax = 1 << 21;

SnTask prepare(at::Tensor p, at::Tensor g, at::Tensor m, at::Tensor v, int64_t layout, int64_t row_len, double beta1,
               double v_decay, double v_gain, bool update_v, double eps, double step, double decay,
               bool defer_columns = false) {
  const int64_t numel = p.numel();
  check(p, "param", -1);
  check(g, "grad", numel);
  SnTask t;
  t.has_m = m.defined() && m.numel() > 0;
  t.has_v = v.defined() && v.numel() > 0;
  if (t.has_m) check(m, "exp_avg", numel);
  if (t.has_v) check(v, "exp_avg_sq", -1);
  t.P = p.data_ptr<float>();
  t.G = g.data_ptr<float>();
  t.M = t.has_m ? m.data_ptr<float>() : nullptr;
  t.V = t.has_v ? v.data_ptr<float>() : nullptr;
  t.update_v = update_v;
  t.b1 = beta1, t.c1 = 1.0 - beta1, t.vd = v_decay, t.vg = v_gain, t.e = eps, t.st = step, t.dc = decay;
  t.layout = (!t.has_v || layout == 0) ? 0 : layout;
  t.row_len = row_len;
  if (t.layout == 0) {
    if (t.has_v) TORCH_CHECK(v.numel() == numel, "coordinate-wise exp_avg_sq must be shaped like the parameter");
    t.units = numel, t.unit_len = 1;
    return t;
  }
  TORCH_CHECK(row_len > 0 && numel % row_len == 0, "row_len must divide numel");
  t.units = numel / row_len, t.unit_len = row_len;
  if (t.layout == 1) {
    TORCH_CHECK(v.numel() == t.units, "exp_avg_sq must hold one value per row");
    return t;
  }
  TORCH_CHECK(t.layout == 2, "layout must be 0, 1 or 2");
  TORCH_CHECK(v.numel() == row_len, "exp_avg_sq must hold one value per column");
  if (update_v && defer_columns && numel <= kDeferMax) {
    t.deferred = true;
    t.rows = t.units, t.units = 1, t.unit_len = numel;
    return t;
  }
  if (update_v) sn_accumulate(g, v, 2, row_len, v_decay, v_gain);
  t.denom.resize(row_len);
  for (int64_t j = 0; j < row_len; ++j) t.denom[j] = t.st / (std::sqrt(t.V[j]) + t.e);
  return t;
}

// A deferred column task's denominators: v_j <- v_decay v_j + v_gain sum_i g_ij^2 (rows in
// order, as sn_accumulate sums them), then step / (sqrt(v_j) + eps).
std::vector<float> column_denominators(const SnTask& t) {
  const int64_t cols = t.row_len;
  std::vector<float> sd(cols, 0.f);
  float* __restrict acc = sd.data();
  for (int64_t i = 0; i < t.rows; ++i) {
    const float* __restrict g_ = t.G + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) acc[j] += g_[j] * g_[j];
  }
  for (int64_t j = 0; j < cols; ++j) {
    const float vj = t.vd * t.V[j] + t.vg * acc[j];
    t.V[j] = vj;
    acc[j] = t.st / (std::sqrt(vj) + t.e);
  }
  return sd;
}

// The update of units [lo, hi) of a prepared tensor:
//   m <- beta1 m + (1 - beta1) g;  v_S <- v_decay v_S + v_gain sum_S g^2;  p <- (p - step n / (sqrt(v_S) + eps)) decay
void run(const SnTask& t, int64_t lo, int64_t hi) {
  const float b1 = t.b1, c1 = t.c1, vd = t.vd, vg = t.vg, e = t.e, st = t.st, dc = t.dc;
  const bool has_m = t.has_m, has_v = t.has_v, update_v = t.update_v;
  std::vector<float> deferred;
  if (t.deferred) {  // the one unit is every row
    deferred = column_denominators(t);
    lo = 0, hi = t.rows;
  }
  if (t.layout == 0) {
    const int64_t len = hi - lo;
    float* __restrict p_ = t.P + lo;
    const float* __restrict g_ = t.G + lo;
    float* __restrict m_ = has_m ? t.M + lo : nullptr;
    float* __restrict v_ = has_v ? t.V + lo : nullptr;
    if (has_m && has_v && update_v) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float mj = b1 * m_[j] + c1 * g_[j];
        const float vj = vd * v_[j] + vg * (g_[j] * g_[j]);
        m_[j] = mj;
        v_[j] = vj;
        p_[j] = (p_[j] - st * (mj / (std::sqrt(vj) + e))) * dc;
      }
    } else if (has_m && has_v) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float mj = b1 * m_[j] + c1 * g_[j];
        m_[j] = mj;
        p_[j] = (p_[j] - st * (mj / (std::sqrt(v_[j]) + e))) * dc;
      }
    } else if (has_m) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float mj = b1 * m_[j] + c1 * g_[j];
        m_[j] = mj;
        p_[j] = (p_[j] - st * mj) * dc;
      }
    } else if (has_v && update_v) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float vj = vd * v_[j] + vg * (g_[j] * g_[j]);
        v_[j] = vj;
        p_[j] = (p_[j] - st * (g_[j] / (std::sqrt(vj) + e))) * dc;
      }
    } else if (has_v) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) p_[j] = (p_[j] - st * (g_[j] / (std::sqrt(v_[j]) + e))) * dc;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) p_[j] = (p_[j] - st * g_[j]) * dc;
    }
    return;
  }
  const int64_t len = t.row_len;
  float next_sum = 0.f;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t off = i * len;
    float* __restrict p_ = t.P + off;
    const float* __restrict g_ = t.G + off;
    if (t.layout == 1) {  // one subset per contiguous row
      // software-pipelined: the next row's square sum is taken in the same loop that
      // updates this row, so all streams (g of the next row, p and m of this one) are in flight
      if (update_v && i == lo) next_sum = square_sum(g_, len);
      float vi = t.V[i];
      if (update_v) {
        vi = vd * vi + vg * next_sum;
        t.V[i] = vi;
      }
      const float sd = st / (std::sqrt(vi) + e);  // one division per row, not per element
      const bool ahead = update_v && i + 1 < hi;
      const float* __restrict gn = g_ + len;
      float acc[kLanes] = {};
      float* __restrict m_ = has_m ? t.M + off : nullptr;
      int64_t j0 = 0;
      if (ahead) {
        if (has_m) {
          for (; j0 + kLanes <= len; j0 += kLanes) {
#pragma omp simd
            for (int64_t k = 0; k < kLanes; ++k) {
              const int64_t j = j0 + k;
              const float mj = b1 * m_[j] + c1 * g_[j];
              m_[j] = mj;
              p_[j] = (p_[j] - sd * mj) * dc;
              acc[k] += gn[j] * gn[j];
            }
          }
        } else {
          for (; j0 + kLanes <= len; j0 += kLanes) {
#pragma omp simd
            for (int64_t k = 0; k < kLanes; ++k) {
              const int64_t j = j0 + k;
              p_[j] = (p_[j] - sd * g_[j]) * dc;
              acc[k] += gn[j] * gn[j];
            }
          }
        }
      }
      // the rest of the row (all of it when no sum is taken ahead)
      if (has_m) {
#pragma omp simd
        for (int64_t j = j0; j < len; ++j) {
          const float mj = b1 * m_[j] + c1 * g_[j];
          m_[j] = mj;
          p_[j] = (p_[j] - sd * mj) * dc;
        }
      } else {
#pragma omp simd
        for (int64_t j = j0; j < len; ++j) p_[j] = (p_[j] - sd * g_[j]) * dc;
      }
      if (ahead) {
        float sum = 0.f;
        for (int64_t j = j0; j < len; ++j) sum += gn[j] * gn[j];
        for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
        next_sum = sum;
      }
    } else {  // one subset per column
      const float* __restrict SD = t.deferred ? deferred.data() : t.denom.data();
      if (has_m) {
        float* __restrict m_ = t.M + off;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float mj = b1 * m_[j] + c1 * g_[j];
          m_[j] = mj;
          p_[j] = (p_[j] - SD[j] * mj) * dc;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) p_[j] = (p_[j] - SD[j] * g_[j]) * dc;
      }
    }
  }
}

}  // namespace

void sn_step(at::Tensor p, at::Tensor g, at::Tensor m, at::Tensor v, int64_t layout, int64_t row_len,
             double beta1, double v_decay, double v_gain, bool update_v, double eps, double step, double decay) {
  const SnTask t = prepare(p, g, m, v, layout, row_len, beta1, v_decay, v_gain, update_v, eps, step, decay);
  const int64_t grain = std::max<int64_t>(1, kGrain / t.unit_len);
  at::parallel_for(0, t.units, grain, [&](int64_t lo, int64_t hi) { run(t, lo, hi); });
}

// v_i <- v_decay v_i + v_gain sum_{j in S_i} g_j^2 only (the subspace path needs v
// before it can apply the rank-r part of the update).
void sn_accumulate(at::Tensor g, at::Tensor v, int64_t layout, int64_t row_len, double v_decay, double v_gain) {
  check(g, "grad", -1);
  check(v, "exp_avg_sq", -1);
  const int64_t numel = g.numel();
  const float* G = g.data_ptr<float>();
  float* V = v.data_ptr<float>();
  const float vd = v_decay, vg = v_gain;
  if (layout == 0) {
    TORCH_CHECK(v.numel() == numel, "coordinate-wise exp_avg_sq must be shaped like the parameter");
    at::parallel_for(0, numel, kGrain, [&](int64_t lo, int64_t hi) {
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) V[j] = vd * V[j] + vg * (G[j] * G[j]);
    });
    return;
  }
  TORCH_CHECK(row_len > 0 && numel % row_len == 0, "row_len must divide numel");
  const int64_t rows = numel / row_len;
  if (layout == 1) {
    TORCH_CHECK(v.numel() == rows, "exp_avg_sq must hold one value per row");
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / row_len), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) V[i] = vd * V[i] + vg * square_sum(G + i * row_len, row_len);
    });
    return;
  }
  TORCH_CHECK(layout == 2, "layout must be 0, 1 or 2");
  const int64_t cols = row_len, block = 64;
  TORCH_CHECK(v.numel() == cols, "exp_avg_sq must hold one value per column");
  at::parallel_for(0, (cols + block - 1) / block, 1, [&](int64_t lo, int64_t hi) {
    float acc[64];
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t c0 = b * block, w = std::min(cols, c0 + block) - c0;
      for (int64_t j = 0; j < w; ++j) acc[j] = 0.f;
      for (int64_t i = 0; i < rows; ++i) {
        const float* __restrict g_ = G + i * cols + c0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) acc[j] += g_[j] * g_[j];
      }
      for (int64_t j = 0; j < w; ++j) V[c0 + j] = vd * V[c0 + j] + vg * acc[j];
    }
  });
}

// The Subspace-Momentum step of one matrix with a dense basis and one Subset-Norm
// subset per row of the tall frame (subset_size "auto"; or no second moment), in one
// pass. With A the tall frame of the gradient (M x N: G if G is tall, G^T if wide),
// Q the basis (N x r), Mo the momentum (M x r, stored transposed for a wide G):
//
//   R = A Q;  Mo <- b1 Mo + (1 - b1) R;  v_i <- v_decay v_i + v_gain |A_i|^2
//   X = (Mo - R) / D,  D_i = sqrt(v_i) + eps   (D = 1 without v)
//   W <- (W - step A / D) decay - step decay X Q^T
//
// Every row of the tall frame is independent, so the work goes block by block of
// rows (of G when tall, columns of G when wide): the block's two small GEMMs and
// the elementwise update run while it is in cache, and G, W are read once and W is
// written once (the unfused path reads G twice and W twice). Threads take blocks;
// the BLAS inside a block runs single-threaded (called from a parallel region).
bool sm_step_available() { return sgemm_ != nullptr; }

namespace {

// One matrix's one-pass subspace step, checked and ready to run block by block.
struct SmTask {
  float* P;
  const float* G;
  float* Mo;
  const float* Q;
  float* V;
  bool has_v, tall;
  int64_t n, rows, cols, r, block, blocks;
  float b1, c1, vd, vg, e, st, dc, alpha;
  // the micro-kernel's packed copies of Q (AVX2 + FMA builds; null otherwise): qp for
  // R = A Q (r in 16-wide tiles, zero-padded to ldr), qt for X Q^T (Q^T in 16-wide tiles,
  // zero-padded to ldt)
  std::unique_ptr<float[]> qp, qt;
  int64_t ldr = 0;  // row stride of a block's R: r, or r rounded up to 16 with qp
  int64_t ldt = 0;  // width of a wide block's transposed copy: cols rounded up to 16
  int64_t ldu = 0;  // its row stride: ldt and a cache line more (a power-of-two stride would
                    // put a strip's rows in a few L1 sets)
};

// Fills a task's qp and qt (one pass over Q each; Q is small: cols x r). Both are written
// whole, padding included, so they start uninitialized.
void pack_projector(SmTask& t) {
#if SNSM_MICRO_GEMM
  const int64_t r = t.r, cols = t.cols, rt = (r + 15) / 16, ct = (cols + 15) / 16;
  t.ldr = 16 * rt;
  t.ldt = 16 * ct;
  t.ldu = t.ldt + 16;
  t.qp.reset(new float[rt * cols * 16]);
  t.qt.reset(new float[ct * r * 16]);
  // qp, tile j: columns 16 j .. 16 j + 15 of Q, row by row (16 values per row of Q)
  for (int64_t j = 0; j < rt; ++j) {
    const int64_t w = std::min<int64_t>(16, r - 16 * j);
    float* dst = t.qp.get() + j * cols * 16;
    const float* src = t.Q + 16 * j;
    for (int64_t k = 0; k < cols; ++k, dst += 16, src += r) {
      std::memcpy(dst, src, w * sizeof(float));
      std::fill(dst + w, dst + 16, 0.f);
    }
  }
  // qt, tile c: rows 16 c .. 16 c + 15 of Q transposed (r rows of 16 values), 8 x 8 at a time
  float* qt = t.qt.get();
  const int64_t r8 = r / 8 * 8, c8 = cols / 8 * 8;
  __m256 v[8];
  for (int64_t c = 0; c < c8; c += 8) {
    float* tile = qt + (c / 16) * r * 16 + c % 16;
    for (int64_t k = 0; k < r8; k += 8) {
      transpose8(t.Q + c * r + k, r, v);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(tile + (k + i) * 16, v[i]);
    }
    for (int64_t k = r8; k < r; ++k)
      for (int64_t i = 0; i < 8; ++i) tile[k * 16 + i] = t.Q[(c + i) * r + k];
  }
  for (int64_t c = c8; c < 16 * ct; ++c)  // the last rows of Q, then zeros up to the tile's 16
    for (int64_t k = 0; k < r; ++k) qt[((c / 16) * r + k) * 16 + c % 16] = c < cols ? t.Q[c * r + k] : 0.f;
#else
  (void)t;
#endif
}

// `tall`: whether the tall frame is the matrix itself (its rows are the frame's rows) or its
// transpose; m >= n for a whole matrix, and also for a rank's rows of a tall one, however few.
SmTask prepare_sm(at::Tensor p, at::Tensor g, at::Tensor mom, at::Tensor q, at::Tensor v, int64_t m, int64_t n,
                  bool tall, double beta1, double v_decay, double v_gain, double eps, double step, double decay) {
  TORCH_CHECK(sm_step_available(), "one-pass subspace step: no BLAS in this torch build");
  TORCH_CHECK(m > 0 && n > 0 && p.numel() == m * n, "param must hold the m x n matrix it is stepped as");
  SmTask t;
  t.tall = tall;
  t.n = n;
  t.rows = t.tall ? m : n, t.cols = t.tall ? n : m;  // the tall frame, rows x cols
  check(p, "param", -1);
  check(g, "grad", m * n);
  check(q, "proj", -1);
  check(mom, "exp_avg", -1);
  t.r = q.dim() == 2 ? q.size(1) : 0;
  TORCH_CHECK(q.dim() == 2 && q.size(0) == t.cols && t.r > 0, "proj must be ", t.cols, " x r");
  TORCH_CHECK(mom.numel() == t.rows * t.r, "exp_avg must hold ", t.rows, " x ", t.r, " values");
  t.has_v = v.defined() && v.numel() > 0;
  if (t.has_v) {
    check(v, "exp_avg_sq", -1);
    TORCH_CHECK(v.numel() == t.rows, "exp_avg_sq must hold one value per row of the tall frame");
  }
  t.P = p.data_ptr<float>();
  t.G = g.data_ptr<float>();
  t.Mo = mom.data_ptr<float>();
  t.Q = q.data_ptr<float>();
  t.V = t.has_v ? v.data_ptr<float>() : nullptr;
  t.b1 = beta1, t.c1 = 1.0 - beta1, t.vd = v_decay, t.vg = v_gain, t.e = eps, t.st = step, t.dc = decay;
  t.alpha = -step * decay;
  // About 256 KiB of gradient per block (a block's G and W stay in L2 through both GEMMs), in a
  // number of blocks that the threads share evenly
  const int64_t target = std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(t.cols, 1), 16, 512);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t count = (t.rows + target - 1) / target;
  if (t.rows >= 16 * threads) count = (count + threads - 1) / threads * threads;
  t.block = (t.rows + count - 1) / count;
  t.blocks = (t.rows + t.block - 1) / t.block;
  t.ldr = t.r;
  return t;
}

// Block b of a prepared matrix (R, D, T: scratch, grown as needed).
void run_block(const SmTask& t, int64_t b, std::vector<float>& R, std::vector<float>& D, std::vector<float>& T) {
  const int64_t r = t.r, cols = t.cols, n = t.n;
  const float b1 = t.b1, c1 = t.c1, vd = t.vd, vg = t.vg, e = t.e, st = t.st, dc = t.dc;
  const int64_t ldr = t.ldr;
  const bool micro = t.qp != nullptr;
  if (static_cast<int64_t>(R.size()) < t.block * ldr) R.resize(t.block * ldr);  // ldr >= r
  if (static_cast<int64_t>(D.size()) < t.block) D.resize(t.block);
  const int64_t i0 = b * t.block, B = std::min(t.rows, i0 + t.block) - i0;
  float* V = t.V;
  if (t.tall) {
    // rows i0.. of G, W (row-major B x N), of Mo (B x r); R row-major B x r
    const float* A = t.G + i0 * cols;
    float* W = t.P + i0 * cols;
    float* Mb = t.Mo + i0 * r;
#if SNSM_MICRO_GEMM
    if (micro)
      micro_gemm(B, cols, ldr, A, cols, t.qp.get(), R.data(), ldr, 1.f, false, W, B, cols, cols);  // R = A Q
    else
#endif
      gemm('N', 'N', r, B, cols, 1.f, t.Q, r, A, cols, 0.f, R.data(), r);  // R = A Q
    for (int64_t i = 0; i < B; ++i) {
      const float* a = A + i * cols;
      float inv = 1.f;  // 1 / D_i
      if (t.has_v) {
        const float vi = vd * V[i0 + i] + vg * square_sum(a, cols);
        V[i0 + i] = vi;
        inv = 1.f / (std::sqrt(vi) + e);
      }
      float* mo = Mb + i * r;
      float* x = R.data() + i * ldr;
#pragma omp simd
      for (int64_t j = 0; j < r; ++j) {
        const float mj = b1 * mo[j] + c1 * x[j];
        mo[j] = mj;
        x[j] = (mj - x[j]) * inv;
      }
      float* w = W + i * cols;
      const float sd = st * inv;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) w[j] = (w[j] - sd * a[j]) * dc;
    }
#if SNSM_MICRO_GEMM
    if (micro)
      micro_gemm(B, r, cols, R.data(), ldr, t.qt.get(), W, cols, t.alpha, true);  // W += alpha X Q^T
    else
#endif
      gemm('T', 'N', cols, B, r, t.alpha, t.Q, r, R.data(), r, 1.f, W, cols);  // W += alpha X Q^T
    return;
  }
  // columns i0.. of G, W (m x B, row stride n), of Mo (r x B, row stride n)
  const float* A = t.G + i0;
  float* W = t.P + i0;
  float* Mb = t.Mo + i0;
#if SNSM_MICRO_GEMM
  if (micro) {
    // The block transposed into cache (U = G[:, block]^T, B x cols, row stride ldt) makes it a
    // tall frame's block for the tiles: R = U Q (B x r, row stride ldr); then U's rows become
    // -step decay G_j / D_j, U += alpha X Q^T, and W[:, block] = W decay + U^T.
    const int64_t ldt = t.ldt, ldu = t.ldu;
    if (static_cast<int64_t>(T.size()) < t.block * ldu) T.resize(t.block * ldu);
    float* U = T.data();
    transpose_into(A, n, cols, B, U, ldu);
    micro_gemm(B, cols, ldr, U, ldu, t.qp.get(), R.data(), ldr, 1.f, false, W, cols, B, n);  // R = U Q
    for (int64_t j = 0; j < B; ++j) {
      float* u = U + j * ldu;
      float inv = 1.f;  // 1 / D_j
      if (t.has_v) {
        const float vj = vd * V[i0 + j] + vg * square_sum(u, cols);
        V[i0 + j] = vj;
        inv = 1.f / (std::sqrt(vj) + e);
      }
      float* x = R.data() + j * ldr;
      for (int64_t k = 0; k < r; ++k) {
        float& mo = Mb[k * n + j];
        const float mk = b1 * mo + c1 * x[k];
        mo = mk;
        x[k] = (mk - x[k]) * inv;
      }
      const float s = -st * inv * dc;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) u[k] *= s;
    }
    micro_gemm(B, r, ldt, R.data(), ldr, t.qt.get(), U, ldu, t.alpha, true);  // U += alpha X Q^T
    add_transposed(U, ldu, B, cols, W, n, dc);
    return;
  }
#endif
  // R row-major r x B
  gemm('N', 'T', B, r, cols, 1.f, A, n, t.Q, r, 0.f, R.data(), B);  // R^T = Q^T G[:, block]
  if (t.has_v) {
    for (int64_t j = 0; j < B; ++j) D[j] = 0.f;
    for (int64_t k = 0; k < cols; ++k) {
      const float* a = A + k * n;
#pragma omp simd
      for (int64_t j = 0; j < B; ++j) D[j] += a[j] * a[j];
    }
    for (int64_t j = 0; j < B; ++j) {
      const float vj = vd * V[i0 + j] + vg * D[j];
      V[i0 + j] = vj;
      D[j] = 1.f / (std::sqrt(vj) + e);  // 1 / D_j
    }
  } else {
    for (int64_t j = 0; j < B; ++j) D[j] = 1.f;
  }
  const float* __restrict Dp = D.data();
  for (int64_t k = 0; k < r; ++k) {
    float* mo = Mb + k * n;
    float* x = R.data() + k * B;
#pragma omp simd
    for (int64_t j = 0; j < B; ++j) {
      const float mj = b1 * mo[j] + c1 * x[j];
      mo[j] = mj;
      x[j] = (mj - x[j]) * Dp[j];
    }
  }
  for (int64_t j = 0; j < B; ++j) D[j] *= st;  // step / D_j
  for (int64_t k = 0; k < cols; ++k) {
    const float* a = A + k * n;
    float* w = W + k * n;
#pragma omp simd
    for (int64_t j = 0; j < B; ++j) w[j] = (w[j] - Dp[j] * a[j]) * dc;
  }
  gemm('N', 'N', B, cols, r, t.alpha, R.data(), B, t.Q, r, 1.f, W, n);  // W[:, block] += alpha Q X^T
}

}  // namespace

// C = A^T A for a row-major M x N float32 A (the Gram matrix of a tall frame, what an "svd"
// refresh factors). On the AVX2 tiles: only the tiles on and above the diagonal (half the
// products of a general GEMM), chunk by chunk of A's rows (at most 128, about 256 KiB), so a
// chunk is reused from cache by every tile; strips of six rows of C are dealt round-robin to
// the threads. Every entry is summed in the same order (rows of A ascending) whatever the
// number of threads. Elsewhere: the BLAS. Either way the lower triangle is then copied from
// the upper one, so C is exactly symmetric.
at::Tensor gram(at::Tensor a) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.dim() == 2 && a.is_contiguous(),
              "gram: A must be a contiguous 2-D float32 CPU tensor");
  const int64_t M = a.size(0), N = a.size(1);
  at::Tensor c = at::empty({N, N}, a.options());
  float* C = c.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  if (N == 0) return c;
  if (M == 0) return c.zero_();
#if SNSM_MICRO_GEMM
  // a chunk of rows is copied (by each thread, into its own cache) at a row stride one cache
  // line past a multiple of 16 floats: at A's own power-of-two strides the rows a tile walks
  // down would share a few L1 sets and evict each other. The copy's columns past N stay zero
  // (the buffer starts zeroed; only N values a row are written), what a last partial tile reads.
  const int64_t strips = (N + 5) / 6, ld = (N + 15) / 16 * 16 + 16;
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 16) / ld, 16, 128);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), strips));
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(chunk * ld);
    for (int64_t tid = lo; tid < hi; ++tid)
      for (int64_t k0 = 0; k0 < M; k0 += chunk) {
        const int64_t K = std::min(chunk, M - k0);
        for (int64_t k = 0; k < K; ++k) std::memcpy(buf.data() + k * ld, A + (k0 + k) * N, N * sizeof(float));
        const float* rows = buf.data();
        for (int64_t s = tid; s < strips; s += threads) {
          const int64_t i = 6 * s, mr = std::min<int64_t>(6, N - i);
          for (int64_t j = i / 16 * 16; j < N; j += 16)  // the tiles on and above the diagonal
            strip_tile<Layout::Gram>(mr, K, rows + i, ld, rows + j, C + i * N + j, N, 1.f, k0 > 0,
                                     std::min<int64_t>(16, N - j));
        }
      }
  });
#else
  TORCH_CHECK(sm_step_available(), "gram: no BLAS in this torch build");
  gemm('N', 'T', N, N, M, 1.f, A, N, A, N, 0.f, C, N);  // column-major C = A^T A of row-major A
#endif
  for (int64_t i = 1; i < N; ++i)
    for (int64_t j = 0; j < i; ++j) C[i * N + j] = C[j * N + i];
  return c;
}

// One step of everything on the fast path, in one parallel region: `whole` tensors
// (sn_step, memory-bound; coefficients per tensor: beta1, v_decay, v_gain, eps, step,
// decay) and subspace matrices (the one-pass step, its GEMMs compute-bound; the same six plus m,
// n and tall), and the step counters, each moved by one. Pieces of the first (about 2^16
// elements, whole rows) and blocks of the second sit in two queues; thread 0 drains the
// memory-bound queue first, the other threads the compute-bound one, then each helps
// with the other. On a few cores a streaming pass does not need every core to reach
// the memory bandwidth, so the GEMMs run beside it instead of after it.
void fused_step(std::vector<at::Tensor> p, std::vector<at::Tensor> g, std::vector<at::Tensor> m,
                std::vector<at::Tensor> v, std::vector<int64_t> layout, std::vector<int64_t> row_len,
                std::vector<double> coef, std::vector<at::Tensor> sp, std::vector<at::Tensor> sg,
                std::vector<at::Tensor> smom, std::vector<at::Tensor> sq, std::vector<at::Tensor> sv,
                std::vector<int64_t> shape, std::vector<double> scoef, std::vector<at::Tensor> steps) {
  constexpr int64_t kPiece = 1 << 16;
  const size_t nw = p.size(), ns = sp.size();
  TORCH_CHECK(g.size() == nw && m.size() == nw && v.size() == nw && layout.size() == nw && row_len.size() == nw &&
                  coef.size() == 6 * nw,
              "fused_step: every whole-tensor list must hold one entry per tensor (six coefficients each)");
  TORCH_CHECK(sg.size() == ns && smom.size() == ns && sq.size() == ns && sv.size() == ns && shape.size() == 3 * ns &&
                  scoef.size() == 6 * ns,
              "fused_step: every subspace list must hold one entry per matrix (m, n and tall; six coefficients each)");
  std::vector<SnTask> whole;
  whole.reserve(nw);
  for (size_t i = 0; i < nw; ++i) {
    const double* c = coef.data() + 6 * i;
    whole.push_back(
        prepare(p[i], g[i], m[i], v[i], layout[i], row_len[i], c[0], c[1], c[2], true, c[3], c[4], c[5], true));
  }
  std::vector<SmTask> subspace;
  subspace.reserve(ns);
  for (size_t i = 0; i < ns; ++i) {
    const double* c = scoef.data() + 6 * i;
    subspace.push_back(prepare_sm(sp[i], sg[i], smom[i], sq[i], sv[i], shape[3 * i], shape[3 * i + 1],
                                  shape[3 * i + 2] != 0, c[0], c[1], c[2], c[3], c[4], c[5]));
  }
  for (const at::Tensor& t : steps)
    TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.is_contiguous() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "fused_step: a step counter must be a one-element float32 or float64 CPU tensor");
  for (at::Tensor& t : steps) {  // every check passed: from here on, the step happens
    if (t.scalar_type() == at::kFloat)
      *t.data_ptr<float>() += 1.0f;
    else
      *t.data_ptr<double>() += 1.0;
  }
  struct Piece {
    const SnTask* task;
    int64_t lo, hi;
  };
  std::vector<Piece> pieces;
  for (const SnTask& t : whole)  // whole-matrix column tasks first, the finer pieces balance the end
    if (t.deferred) pieces.push_back({&t, 0, 1});
  for (const SnTask& t : whole) {
    if (t.deferred) continue;
    const int64_t per = std::max<int64_t>(1, kPiece / t.unit_len);
    for (int64_t lo = 0; lo < t.units; lo += per) pieces.push_back({&t, lo, std::min(t.units, lo + per)});
  }
  at::parallel_for(0, static_cast<int64_t>(ns), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) pack_projector(subspace[i]);
  });
  std::vector<std::pair<const SmTask*, int64_t>> blocks;
  for (const SmTask& t : subspace)
    for (int64_t b = 0; b < t.blocks; ++b) blocks.emplace_back(&t, b);
  const int64_t n_pieces = pieces.size(), n_blocks = blocks.size();
  std::atomic<int64_t> next_piece{0}, next_block{0};
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> R, D, T;
    auto stream = [&] {
      for (int64_t i; (i = next_piece.fetch_add(1)) < n_pieces;) run(*pieces[i].task, pieces[i].lo, pieces[i].hi);
    };
    auto compute = [&] {
      for (int64_t i; (i = next_block.fetch_add(1)) < n_blocks;) run_block(*blocks[i].first, blocks[i].second, R, D, T);
    };
    for (int64_t k = lo; k < hi; ++k) {
      if (k == 0) {
        stream();
        compute();
      } else {
        compute();
        stream();
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "snsm fused Subset-Norm CPU kernel";
  module.def("sn_step", &sn_step, "fused Subset-Norm step (in place)");
  module.def("sn_accumulate", &sn_accumulate, "Subset-Norm accumulator update (in place)");
  module.def("fused_step", &fused_step,
             "sn_step and the one-pass subspace step for lists of tensors in one parallel region (in place)");
  module.def("gram", &gram, "A^T A of a contiguous float32 matrix (exactly symmetric)");
  module.def("sm_step_available", &sm_step_available, "whether the one-pass subspace step has a BLAS to call");
}
