// Grouped GEMMs for moedsl's experts on a CPU (float32, row-major).
//
// Rows arrive sorted by expert: group g is rows offs[g] .. offs[g + 1] of x. torch's CPU
// grouped GEMM is a loop of GEMMs, each using every thread; with many small or uneven groups
// that wastes most of the threads' time on GEMMs too small to split well. Here one OpenMP
// team (torch's own: the library links the same libgomp) splits the *work* evenly instead:
//   - products over rows (forward, input gradient): each thread takes an equal range of
//     rows, whichever groups they belong to, and runs single-threaded GEMMs on its pieces;
//   - weight gradients: each thread takes whole groups, balanced by rows plus a per-group
//     cost (writing the group's [K, n] gradient); with fewer groups than 4 per thread,
//     each thread takes an equal range of every group's columns instead.
// The GEMMs are torch's MKL sgemm, forced single-threaded inside the team, except for few rows:
// a group of m <= SMALL_ROWS rows (an expert's share of a small batch: 16 rows at 4096 tokens,
// 256 experts, top-1) uses its weights m times, and MKL packs those weights into its panel
// format for every call, which costs as much as the product. The AVX2 kernels below (runtime
// checked) read the weights once, in place, and stream weight gradients past the cache; on 2
// cores they take 0.5-0.95x MKL's time at m = 8..64 (bench/cpu_gemm.py).
// Below the GEMMs: the MoE combine and its backward, capacity slots, and the dispatch order.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
// MKL's per-thread thread count; weak: absent from a BLAS other than MKL
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

struct SingleThreadedBlas {  // inside the team each GEMM runs on its own thread only
  int prev = 0;
  SingleThreadedBlas() { if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1); }
  ~SingleThreadedBlas() { if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev); }
};

// ---- small-row kernels (AVX2 + FMA; compiled for it, called only where the CPU has it) ----
#define MOEDSL_AVX2 __attribute__((target("avx2,fma")))
constexpr int SMALL_ROWS = 64;  // measured crossover with MKL (d = 256, h = 512, 2 cores)
constexpr int PREFETCH_ROWS = 16;
bool small_enabled = true;      // moedsl_small_kernels(0): MKL only (tests, A/B benchmarks)

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

MOEDSL_AVX2 inline __m256i first_lanes(int w) {  // mask of lanes 0 .. w-1 (w <= 0: none)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// C[R, w] = A[R, K] · B[K, w] for one tile of w <= 16 columns (FULL: w = 16, no masks in the
// loop); A rows lda apart, B rows ldb apart.
template <int R, bool FULL>
MOEDSL_AVX2 void nn_tile(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int w) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  const __m256i m0 = first_lanes(w), m1 = first_lanes(w - 8);
  for (int k = 0; k < K; ++k) {
    const float* b = B + (int64_t)k * ldb;
    // B's panel is a column of lines a row apart, which the hardware prefetchers do not follow
    _mm_prefetch((const char*)(b + PREFETCH_ROWS * (int64_t)ldb), _MM_HINT_T0);
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + (int64_t)r * lda + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (FULL) {
      _mm256_storeu_ps(C + (int64_t)r * ldc, c0[r]);
      _mm256_storeu_ps(C + (int64_t)r * ldc + 8, c1[r]);
    } else {
      _mm256_maskstore_ps(C + (int64_t)r * ldc, m0, c0[r]);
      _mm256_maskstore_ps(C + (int64_t)r * ldc + 8, m1, c1[r]);
    }
  }
}

template <int R>
MOEDSL_AVX2 void nn_tile(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int w) {
  if (w == 16) nn_tile<R, true>(K, A, lda, B, ldb, C, ldc, w);
  else nn_tile<R, false>(K, A, lda, B, ldb, C, ldc, w);
}

// f(std::integral_constant<int, R>{}) for R = rows in 1..6: a tile's height is a compile-time constant
template <typename F>
void with_rows(int rows, F&& f) {
  switch (rows) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
  }
}

MOEDSL_AVX2 void nn_rows(int rows, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int w) {
  with_rows(rows, [&](auto R) { nn_tile<decltype(R)::value>(K, A, lda, B, ldb, C, ldc, w); });
}

// C[m, n] = A[m, K] · B[K, n]: each 16-column panel of B (K x 64 bytes) comes from memory once
// and from L1 for the next 6 rows of A.
MOEDSL_AVX2 void small_nn(int m, int n, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  for (int j = 0; j < n; j += 16)
    for (int r = 0; r < m; r += 6)
      nn_rows(std::min(6, m - r), K, A + (int64_t)r * lda, lda, B + j, ldb, C + (int64_t)r * ldc + j, ldc,
              std::min(16, n - j));
}

MOEDSL_AVX2 inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {  // [Σa, Σb, Σc, Σd]
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// C[R, cols <= 4] = A[R, K] · B[cols, K]^T as dot products of rows (for very few rows of A)
template <int R>
MOEDSL_AVX2 void dot_tile(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, int cols) {
  __m256 acc[R][4];
  const float* b[4];
  for (int i = 0; i < 4; ++i) b[i] = B + (int64_t)(i < cols ? i : 0) * ldb;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 bv[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) bv[i] = _mm256_loadu_ps(b[i] + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_loadu_ps(A + (int64_t)r * lda + k);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(av, bv[i], acc[r][i]);
    }
  }
  if (k < K) {  // the last K % 8 columns, masked (lanes past K read nothing, hold 0)
    const __m256i mk = first_lanes(K - k);
    __m256 bv[4];
    for (int i = 0; i < 4; ++i) bv[i] = _mm256_maskload_ps(b[i] + k, mk);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_maskload_ps(A + (int64_t)r * lda + k, mk);
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(av, bv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s[4];
    _mm_storeu_ps(s, sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    for (int i = 0; i < cols; ++i) C[(int64_t)r * ldc + i] = s[i];
  }
}

// C[m, n] = A[m, K] · B[n, K]^T (the input gradient: dy · w^T). Up to 8 rows: dot products;
// more: A's rows transposed into 16-column panels, then the product as small_nn's tiles with
// B's rows broadcast, so B is read once.
MOEDSL_AVX2 void small_nt(int m, int n, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  if (m <= 8) {
    for (int c = 0; c < n; c += 4)
      for (int r = 0; r < m; r += 3)  // tiles of 3 rows (12 accumulators), the last 1 or 2
        with_rows(std::min(3, m - r), [&](auto R) {
          dot_tile<decltype(R)::value>(K, A + (int64_t)r * lda, lda, B + (int64_t)c * ldb, ldb,
                                       C + (int64_t)r * ldc + c, ldc, std::min(4, n - c));
        });
    return;
  }
  static thread_local std::vector<float> panel;  // A^T for 16 rows of A: [K, 16]
  if (panel.size() < (size_t)K * 16) panel.resize((size_t)K * 16);
  float tile[6 * 16];
  for (int r0 = 0; r0 < m; r0 += 16) {
    const int rows = std::min(16, m - r0);
    for (int k = 0; k < K; ++k) {
      float* p = panel.data() + (size_t)k * 16;
      for (int q = 0; q < rows; ++q) p[q] = A[(int64_t)(r0 + q) * lda + k];
      for (int q = rows; q < 16; ++q) p[q] = 0.f;
    }
    for (int c = 0; c < n; c += 6) {  // tile[i, q] = C[r0 + q, c + i]
      const int cols = std::min(6, n - c);
      nn_rows(cols, K, B + (int64_t)c * ldb, ldb, panel.data(), 16, tile, 16, 16);
      for (int q = 0; q < rows; ++q)
        for (int i = 0; i < cols; ++i) C[(int64_t)(r0 + q) * ldc + c + i] = tile[i * 16 + q];
    }
  }
}

// C[R, 16] = X[m, R]^T · D[m, 16]; written with streaming stores
// when aligned (a weight gradient is not read again soon: it would only evict the weights).
template <int R>
MOEDSL_AVX2 void tn_tile(int m, const float* X, int ldx, const float* D, int ldd, float* C, int ldc, bool stream) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int k = 0; k < m; ++k) {
    const float* d = D + (int64_t)k * ldd;
    const __m256 b0 = _mm256_loadu_ps(d), b1 = _mm256_loadu_ps(d + 8);
    const float* x = X + (int64_t)k * ldx;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + (int64_t)r * ldc;
    if (stream) {
      _mm256_stream_ps(c, c0[r]);
      _mm256_stream_ps(c + 8, c1[r]);
    } else {
      _mm256_storeu_ps(c, c0[r]);
      _mm256_storeu_ps(c + 8, c1[r]);
    }
  }
}

// C[n_rows, n] = X[m, n_rows]^T · D[m, n] (a weight gradient over m <= SMALL_ROWS rows), n a
// multiple of 16.
MOEDSL_AVX2 void small_tn(int n_rows, int n, int m, const float* X, int ldx, const float* D, int ldd, float* C,
                          int ldc) {
  const bool aligned = (uintptr_t)C % 32 == 0 && ldc % 8 == 0;
  for (int c = 0; c < n_rows; c += 6) {
    const float* x = X + c;
    for (int j = 0; j < n; j += 16) {
      const float* d = D + j;
      float* o = C + (int64_t)c * ldc + j;
      with_rows(std::min(6, n_rows - c),
                [&](auto R) { tn_tile<decltype(R)::value>(m, x, ldx, d, ldd, o, ldc, aligned); });
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: done before anyone reads C
}

// row-major C[m, n] = op(A)[m, k] · op(B)[k, n], or C += that when accumulate
void gemm(bool ta, bool tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb, bool accumulate,
          float* C, int ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty group: its product is zero
    if (!accumulate)
      for (int i = 0; i < m; ++i) std::memset(C + (int64_t)i * ldc, 0, sizeof(float) * n);
    return;
  }
  if (small_enabled && !accumulate && have_avx2()) {
    if (!ta && !tb && m <= SMALL_ROWS) return small_nn(m, n, k, A, lda, B, ldb, C, ldc);
    if (!ta && tb && m <= SMALL_ROWS) return small_nt(m, n, k, A, lda, B, ldb, C, ldc);
    if (ta && !tb && k <= SMALL_ROWS && n % 16 == 0) return small_tn(m, n, k, A, lda, B, ldb, C, ldc);
  }
  // column-major BLAS on row-major data: C^T = op(B)^T · op(A)^T
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  sgemm_(&opb, &opa, &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// Thread t of T's share of n columns: [c0, c1), inner bounds on 64-byte (16-float) boundaries.
void column_range(int n, int t, int T, int* c0, int* c1) {
  *c0 = (int)((int64_t)n * t / T);
  *c1 = (int)((int64_t)n * (t + 1) / T);
  if (t) *c0 = *c0 / 16 * 16;
  if (t + 1 < T) *c1 = *c1 / 16 * 16;
}

}  // namespace

extern "C" {

// 0: MKL for every product (tests and A/B benchmarks); returns the previous setting
int moedsl_small_kernels(int enable) {
  const int prev = small_enabled;
  small_enabled = enable != 0;
  return prev;
}

// Capacity slots for top-k choices expert [G, S, k] in GShard's priority order (every first
// choice of a group before any second choice, then token order): slot = g * C + the choice's
// position among its group's choices of the same expert, or -1 past C or not routed (routed may
// be null: all are). What routing.assign_slots computes with a stable sort, in one pass.
// Returns -1, or the index of an expert id outside [0, E).
int64_t moedsl_assign_slots(const int64_t* expert, const bool* routed, int64_t G, int64_t S, int k, int64_t E,
                            int64_t C, int64_t* slot) {
  std::vector<int64_t> used(E);
  for (int64_t g = 0; g < G; ++g) {
    std::fill(used.begin(), used.end(), 0);
    for (int j = 0; j < k; ++j)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (g * S + s) * k + j;
        if (routed && !routed[i]) {
          slot[i] = -1;
          continue;
        }
        const int64_t e = expert[i];
        if (e < 0 || e >= E) return i;
        const int64_t pos = used[e]++;
        slot[i] = pos < C ? g * C + pos : -1;
      }
  }
  return -1;
}

// The kept assignments (slot >= 0) in order of destination, stable: order[0 .. N) and sizes[d]
// per destination d in [0, n_dest); a counting sort. Returns N, or -1 - i for an assignment i
// whose destination is outside [0, n_dest).
int64_t moedsl_pack_order(const int64_t* dest, const int64_t* slot, int64_t A, int64_t n_dest, int64_t* order,
                          int64_t* sizes) {
  std::fill(sizes, sizes + n_dest, 0);
  for (int64_t i = 0; i < A; ++i) {
    if (slot[i] < 0) continue;
    if (dest[i] < 0 || dest[i] >= n_dest) return -1 - i;
    ++sizes[dest[i]];
  }
  std::vector<int64_t> next(n_dest);
  int64_t N = 0;
  for (int64_t d = 0; d < n_dest; ++d) {
    next[d] = N;
    N += sizes[d];
  }
  for (int64_t i = 0; i < A; ++i)
    if (slot[i] >= 0) order[next[dest[i]]++] = i;
  return N;
}

// -1 when offs [G + 1] are row offsets of N rows (offs[0] = 0, non-decreasing, offs[G] = N); else
// the first offset that breaks the first two (0 .. G), or G + 1 when only the total is not N
int64_t moedsl_check_offsets(const int64_t* offs, int G, int64_t N) {
  if (offs[0] != 0) return 0;
  for (int g = 0; g < G; ++g)
    if (offs[g + 1] < offs[g]) return g + 1;
  return offs[G] == N ? -1 : G + 1;
}

// out[rows of g] = x[rows of g] · op(w[g]) for every group g, out [N, n] with row stride ldo.
// w[g] is [K, n] (trans_w = 0) or [n, K] (trans_w = 1) with row stride ldw, groups w_gstride apart.
void moedsl_gmm_rows(const float* x, int ldx, const float* w, int64_t w_gstride, int ldw, int trans_w,
                     const int64_t* offs, int G, int K, int n, float* out, int ldo, int nthreads) {
  const int64_t N = offs[G];
  if (N <= 0) return;
  nthreads = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, (N + 7) / 8));
#pragma omp parallel num_threads(nthreads)
  {
    SingleThreadedBlas single;
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = N * t / T, hi = N * (t + 1) / T;
    int g = (int)(std::upper_bound(offs, offs + G + 1, lo) - offs) - 1;
    for (int64_t r = lo; r < hi && g < G; ++g) {
      const int64_t end = std::min(hi, offs[g + 1]);
      if (end > r)
        gemm(false, trans_w != 0, (int)(end - r), n, K, x + r * ldx, ldx, w + g * w_gstride, ldw, false,
             out + r * ldo, ldo);
      r = std::max(r, end);
    }
  }
}

// dw[g] = x[rows of g]^T · dy[rows of g] (dw += that when accumulate): dw [G, K, n] contiguous.
// group_rows: the cost of one group's call and output, in rows of GEMM work.
void moedsl_gmm_wgrad(const float* x, int ldx, const float* dy, int ldy, const int64_t* offs, int G, int K, int n,
                      float* dw, int accumulate, int nthreads, int64_t group_rows) {
  if (G <= 0) return;
  if (G >= 4 * nthreads) {
    const int64_t total = offs[G] + group_rows * G;
#pragma omp parallel num_threads(nthreads)
    {
      SingleThreadedBlas single;
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t lo = total * t / T, hi = total * (t + 1) / T;
      for (int g = 0; g < G; ++g) {  // a group goes to the thread its middle falls in
        const int64_t rows = offs[g + 1] - offs[g];
        const int64_t mid = offs[g] + group_rows * g + (rows + group_rows) / 2;
        if (mid < lo || mid >= hi) continue;
        gemm(true, false, K, n, (int)rows, x + offs[g] * ldx, ldx, dy + offs[g] * ldy, ldy, accumulate != 0,
             dw + (int64_t)g * K * n, n);
      }
    }
    return;
  }
  const int chunks = std::max(1, std::min(nthreads, n / 32));
#pragma omp parallel num_threads(chunks)
  {
    SingleThreadedBlas single;
    int c0, c1;
    column_range(n, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
    for (int g = 0; g < G; ++g) {
      const int64_t rows = offs[g + 1] - offs[g];
      gemm(true, false, K, c1 - c0, (int)rows, x + offs[g] * ldx, ldx, dy + offs[g] * ldy + c0, ldy,
           accumulate != 0, dw + (int64_t)g * K * n + c0, n);
    }
  }
}

// The MoE combine: out[tok[i]] += w[i] · y[i] for every row i (out [S, d], zeroed by the
// caller). Threads take equal column ranges, so no two write the same element.
void moedsl_combine_fwd(const float* y, int ldy, const float* w, const int64_t* tok, int64_t N, int d, float* out,
                        int ldo, int nthreads) {
  const int chunks = std::max(1, std::min(nthreads, d / 16));
#pragma omp parallel num_threads(chunks)
  {
    int c0, c1;
    column_range(d, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
    for (int64_t i = 0; i < N; ++i) {
      const float wi = w[i];
      const float* yi = y + i * ldy;
      float* o = out + tok[i] * ldo;
#pragma omp simd
      for (int c = c0; c < c1; ++c) o[c] += wi * yi[c];
    }
  }
}

// Its backward, one pass over the rows: dy[i] = w[i] · g[tok[i]] and dw[i] = <y[i], g[tok[i]]>
// (dy [N, d] contiguous; either output may be null when not needed).
void moedsl_combine_bwd(const float* y, int ldy, const float* w, const int64_t* tok, int64_t N, int d,
                        const float* g, int ldg, float* dy, float* dw, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float* gi = g + tok[i] * ldg;
    if (dy) {
      const float wi = w[i];
      float* di = dy + i * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) di[c] = wi * gi[c];
    }
    if (dw) {
      const float* yi = y + i * ldy;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < d; ++c) s += yi[c] * gi[c];
      dw[i] = s;
    }
  }
}

}  // extern "C"
