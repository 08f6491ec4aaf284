// Fused elementwise kernels (elementwise.cpp), bound in cpu_kernels.cpp.
#pragma once
#include <torch/extension.h>

// out = weight * x / rms(x), row by row.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
// In place: residual += x, then x = weight * residual / rms(residual).
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
// x [rows, 2n] = [gate | up] -> silu(gate) * up, [rows, n].
torch::Tensor silu_and_mul(torch::Tensor x);
// In place, NeoX-style halves: the first num_heads * head_dim values of each row of x are
// heads rotated by (cos, sin) [rows, head_dim / 2] of that row's position.
void rotary_embedding(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                      int64_t head_dim);
