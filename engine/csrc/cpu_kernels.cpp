// CPU kernels for the memory-bound parts of decode, float32.
//
// paged_decode_attention: one query token per sequence, keys and values read in place
// through the block table (no gather copy).
// q        [batch, num_heads, head_dim]                      float32, contiguous
// k_cache  [num_blocks, block_size, num_kv_heads, head_dim]  float32, contiguous
// v_cache  same as k_cache
// table    [batch, max_blocks] int64 block ids
// lens     [batch] int64 context length of each sequence
// returns  [batch, num_heads, head_dim]
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "elementwise.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor table, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 &&
                  v_cache.dtype() == torch::kFloat32, "float32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous tensors expected");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t width = table.size(1);
  auto table_c = table.to(torch::kInt64).contiguous();
  auto lens_c = lens.to(torch::kInt64).contiguous();
  auto out = torch::empty_like(q);

  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = table_c.data_ptr<int64_t>();
  const int64_t* lp = lens_c.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = num_kv_heads * head_dim;  // floats between tokens in a block
  const float fscale = static_cast<float>(scale);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "context length ", lp[b],
                " out of range for ", width, " blocks of ", block_size);

  // One job per sequence: a token's row holds every KV head, so reading whole rows keeps
  // the memory stream contiguous.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lp[b];
      const float* q0 = qp + b * num_heads * head_dim;
      scores.assign(num_heads * len, 0.f);
      for (int64_t t0 = 0, blk = 0; t0 < len; t0 += block_size, ++blk) {
        const float* kb = kp + tp[b * width + blk] * block_size * token_stride;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t i = 0; i < n; ++i) {
          const float* row = kb + i * token_stride;
          for (int64_t h = 0; h < num_heads; ++h)
            scores[h * len + t0 + i] = dot(q0 + h * head_dim, row + (h / group) * head_dim,
                                           head_dim) * fscale;
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * len;
        const float mx = *std::max_element(s, s + len);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - mx);
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      float* o0 = op + b * num_heads * head_dim;
      std::fill(o0, o0 + num_heads * head_dim, 0.f);
      for (int64_t t0 = 0, blk = 0; t0 < len; t0 += block_size, ++blk) {
        const float* vb = vp + tp[b * width + blk] * block_size * token_stride;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t i = 0; i < n; ++i) {
          const float* row = vb + i * token_stride;
          for (int64_t h = 0; h < num_heads; ++h)
            axpy(scores[h * len + t0 + i], row + (h / group) * head_dim, o0 + h * head_dim,
                 head_dim);
        }
      }
    }
  });
  return out;
}

// skinny_linear: y [M, N] = x [M, K] @ w [N, K]^T (+ bias) for a handful of rows (decode at
// batch 1-3). Each weight row is streamed once and dotted with every input row, with the
// output rows split over the threads; general GEMM kernels run this shape at a fraction of
// the memory bandwidth.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32,
              "float32 tensors expected");
  TORCH_CHECK(w.is_contiguous() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "x [M, K] and a contiguous w [N, K] expected");
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  auto xc = x.contiguous();
  auto y = torch::empty({rows, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  torch::Tensor bias_c;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    bp = bias_c.data_ptr<float>();
  }
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* wr = wp + j * k;
      for (int64_t r = 0; r < rows; ++r) {
        const float acc = dot(wr, xp + r * k, k);
        yp[r * n + j] = bp ? acc + bp[j] : acc;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read in place from a paged KV cache (CPU, float32)");
  m.def("skinny_linear", &skinny_linear, "x @ w.T (+ bias) for a few rows (CPU, float32)");
  m.def("rms_norm", &rms_norm, "RMSNorm (CPU, float32)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = RMSNorm(residual), in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [gate | up] rows (CPU, float32)");
  m.def("rotary_embedding", &rotary_embedding, "NeoX rotary embedding in place (CPU, float32)");
}
