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
// The GEMMs are torch's MKL sgemm, forced single-threaded inside the team.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// row-major C[m, n] = op(A)[m, k] · op(B)[k, n], or C += that when accumulate
void gemm(bool ta, bool tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb, bool accumulate,
          float* C, int ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty group: its product is zero
    if (!accumulate)
      for (int i = 0; i < m; ++i) std::memset(C + (int64_t)i * ldc, 0, sizeof(float) * n);
    return;
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
