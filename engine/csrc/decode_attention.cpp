// paged_decode_attention: one query token per sequence, keys and values read in place
// through the block table (no gather copy), float32.
// q        [batch, num_heads, head_dim]                      contiguous
// k_cache  [num_blocks, block_size, num_kv_heads, head_dim]  contiguous
// v_cache  same as k_cache
// table    [batch, max_blocks] int64 block ids
// lens     [batch] int64 context length of each sequence
// returns  [batch, num_heads, head_dim]
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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
      // fn(t, row) for each of the sequence's tokens, block by block through the table
      auto each_token = [&](const float* cache, auto&& fn) {
        for (int64_t t0 = 0, blk = 0; t0 < len; t0 += block_size, ++blk) {
          const float* block = cache + tp[b * width + blk] * block_size * token_stride;
          const int64_t n = std::min(block_size, len - t0);
          for (int64_t i = 0; i < n; ++i) fn(t0 + i, block + i * token_stride);
        }
      };
      each_token(kp, [&](int64_t t, const float* row) {
        for (int64_t h = 0; h < num_heads; ++h)
          scores[h * len + t] = dot(q0 + h * head_dim, row + (h / group) * head_dim,
                                    head_dim) * fscale;
      });
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
      each_token(vp, [&](int64_t t, const float* row) {
        for (int64_t h = 0; h < num_heads; ++h)
          axpy(scores[h * len + t], row + (h / group) * head_dim, o0 + h * head_dim, head_dim);
      });
    }
  });
  return out;
}
