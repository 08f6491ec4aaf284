// Python bindings of the CPU kernels (decode_attention.cpp, small_gemm.cpp,
// elementwise.cpp).
#include <torch/extension.h>

#include "elementwise.h"

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor table, torch::Tensor lens, double scale);
torch::Tensor small_gemm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read in place from a paged KV cache (CPU, float32)");
  m.def("small_gemm", &small_gemm, "x @ w.T (+ bias) for decode's row counts (CPU, float32)");
  m.def("rms_norm", &rms_norm, "RMSNorm (CPU, float32)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = RMSNorm(residual), in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of [gate | up] rows (CPU, float32)");
  m.def("rotary_embedding", &rotary_embedding, "NeoX rotary embedding in place (CPU, float32)");
}
