// small_gemm: y [M, N] = x [M, K] @ w [N, K]^T (+ bias) on the plain row-major weight, for
// the row counts of decode (1 to a few dozen rows).
//
// The weight is the only copy the engine holds, so this kernel reads it as stored: each
// thread owns a range of weight rows, takes them a few at a time (a tile that stays in L1),
// and runs every input row against the tile before moving on, so the weight is streamed
// from memory once per call whatever M is, and the input rows (M x K floats) come from L2.
// Within a tile, NR weight rows x MR input rows accumulate in NR*MR vector registers along
// K: each loaded weight vector feeds MR FMAs and each input vector NR, which keeps the FMA
// units busy at batch sizes where a dot per (row, weight row) is bound by loads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PDSERVE_GEMM_AVX2 1
#endif

namespace {

constexpr int64_t kPrefetch = 256;  // floats ahead along a weight row (1 KiB)

#ifdef PDSERVE_GEMM_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// NR weight rows (w, stride k) against MR input rows (x, stride k): out[r * ldy + j].
template <int NR, int MR>
inline void tile(const float* w, const float* x, int64_t k, float* out, int64_t ldy) {
  float acc[MR][NR];
  int64_t i = 0;
#ifdef PDSERVE_GEMM_AVX2
  __m256 v[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) v[r][j] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    __m256 wv[NR];
    if (MR <= 3 && (i & 15) == 0)  // decode's rows leave the loads idle: keep more in flight
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * k + i + kPrefetch), _MM_HINT_T0);
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * k + i);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int j = 0; j < NR; ++j) v[r][j] = _mm256_fmadd_ps(wv[j], xv, v[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = hsum(v[r][j]);
#else
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = 0.f;
#endif
  for (; i < k; ++i)
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] += w[j * k + i] * x[r * k + i];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) out[r * ldy + j] = acc[r][j];
}

// every input row against NR weight rows; MR rows at a time, then the remainder
template <int NR>
inline void rows_against(const float* w, const float* x, int64_t m, int64_t k, float* y,
                         int64_t ldy) {
  constexpr int MR = NR >= 4 ? 2 : 3;  // NR*MR accumulators + NR weight vectors <= 16 ymm
  int64_t r = 0;
  for (; r + MR <= m; r += MR) tile<NR, MR>(w, x + r * k, k, y + r * ldy, ldy);
  for (; r < m; ++r) tile<NR, 1>(w, x + r * k, k, y + r * ldy, ldy);
}

}  // namespace

torch::Tensor small_gemm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32,
              "float32 tensors expected");
  TORCH_CHECK(w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "x [M, K] and a contiguous w [N, K] expected");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto xc = x.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  torch::Tensor bias_c;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bias of ", n, " floats expected");
    bias_c = bias->contiguous();
    bp = bias_c.data_ptr<float>();
  }
  // 4 weight rows per tile while the call is memory-bound (more weight streams in flight),
  // 3 beyond (3 x 3 accumulators)
  const int64_t nr = m <= 8 ? 4 : 3;
  const int64_t grain = std::max<int64_t>(nr, 48 / nr * nr);
  at::parallel_for(0, (n + nr - 1) / nr, grain / nr, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t * nr;
      const float* wj = wp + j * k;
      float* yj = yp + j;
      switch (std::min(nr, n - j)) {
        case 4: rows_against<4>(wj, xp, m, k, yj, n); break;
        case 3: rows_against<3>(wj, xp, m, k, yj, n); break;
        case 2: rows_against<2>(wj, xp, m, k, yj, n); break;
        default: rows_against<1>(wj, xp, m, k, yj, n); break;
      }
      if (bp != nullptr) {
        const int64_t cols = std::min(nr, n - j);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < cols; ++c) yj[r * n + c] += bp[j + c];
      }
    }
  });
  return y;
}
