// Fused elementwise kernels for float32 CPU inference. Each replaces a chain of torch ops
// that would otherwise read and write the whole activation several times (RMSNorm: pow,
// mean, rsqrt, two muls; SiLU-and-mul: silu, mul and a split; RoPE: two slices, neg, cat,
// three muls), and runs the chain in one pass per row with the rows split over threads.
#include "elementwise.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, name,
              " must be a float32 [rows, width] tensor with contiguous rows");
}

inline float row_inv_rms(const float* x, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.numel() == n && weight.is_contiguous(), "weight must have ", n, " values");
  auto out = torch::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * xs;
      float* orow = op + r * n;
      const float inv = row_inv_rms(xr, n, static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = wp[i] * (xr[i] * inv);
    }
  });
  return out;
}

void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                        double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(residual.size(0) == rows && residual.size(1) == n, "x and residual differ in shape");
  TORCH_CHECK(weight.numel() == n && weight.is_contiguous(), "weight must have ", n, " values");
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * xs;
      float* rr = rp + r * rs;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) rr[i] += xr[i];
      const float inv = row_inv_rms(rr, n, static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) xr[i] = wp[i] * (rr[i] * inv);
    }
  });
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  TORCH_CHECK(x.size(1) == 2 * n, "x must hold gate and up halves of equal width");
  auto out = torch::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * xs;
      const float* up = gate + n;
      float* orow = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

void rotary_embedding(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                      int64_t head_dim) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), half = head_dim / 2;
  TORCH_CHECK(head_dim % 2 == 0 && num_heads * head_dim <= x.size(1),
              "x rows hold fewer than num_heads * head_dim values");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == rows &&
                  cos.size(1) == half && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous [rows, head_dim / 2]");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * half;
      const float* s = sp + r * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* lo = xp + r * xs + h * head_dim;
        float* hi = lo + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = lo[i], b = hi[i];
          lo[i] = a * c[i] - b * s[i];
          hi[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}
