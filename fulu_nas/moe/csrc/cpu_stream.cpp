// fp32 experts on the CPU for a few rows per expert (decode), streaming each weight once.
//
// With a few rows per expert the experts' GEMMs are bound by reading the weights. The weights are
// packed once (fulu_nas/moe/cpu_stream.py) into panels of 64 output columns, each panel K x 64 and
// contiguous; 6 rows x 64 columns of sums stay in registers (24 AVX-512 registers), so each weight
// is read from memory once per call. Tasks are (expert, panel) pairs split over torch's intra-op
// threads; the SwiGLU/GELU activation, the routing weight and the biases are applied as each
// panel finishes.
//
// Shapes (N rows sorted by expert, D hidden, Fp expert width padded to the panel layout, E experts):
//   x (N, D); counts: rows per expert (sum N); weight (N) or none
//   w13 (NB1, E, D, 64): SwiGLU: panel b of expert e holds gate columns 32b..32b+31 then up columns
//                        32b..32b+31; GELU: columns 64b..64b+63. b13 (NB1, E, 64) packed alike, or none.
//   w2 (NB2, E, Fp, 64): columns 64b..64b+63 of the down projection (rows past F and columns past D
//                        are zero). b2 (E, D) or none.
//   returns y (N, D): y[n] = act(x[n] W13 + b13) W2 * weight[n] + b2 * weight[n]
// Panels are stored in task order (panel-major), so each thread's share of tasks is one contiguous
// stream that the hardware prefetcher follows across panels (software prefetching 2-16 KB ahead
// was measured slower: 2.9-3.2 ms against 2.7 for the seed config's 16-token call, 2 cores).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;    // output columns per panel
constexpr int kRows = 6;          // rows per register tile (6 x 64 floats = 24 AVX-512 registers)

// out (RN x 64) = x (RN x K, row stride ldx) times panel (K x 64, contiguous).
template <int RN>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* out) {
  float acc[RN][kBlock];
  for (int r = 0; r < RN; ++r)
    for (int j = 0; j < kBlock; ++j) acc[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* p = panel + k * kBlock;
    for (int r = 0; r < RN; ++r) {
      const float xv = x[r * ldx + k];
      for (int j = 0; j < kBlock; ++j) acc[r][j] += xv * p[j];
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int j = 0; j < kBlock; ++j) out[r * kBlock + j] = acc[r][j];
}

inline void tile_rows(int rows, const float* x, int64_t ldx, const float* panel, int64_t K, float* out) {
  switch (rows) {
    case 1: return tile<1>(x, ldx, panel, K, out);
    case 2: return tile<2>(x, ldx, panel, K, out);
    case 3: return tile<3>(x, ldx, panel, K, out);
    case 4: return tile<4>(x, ldx, panel, K, out);
    case 5: return tile<5>(x, ldx, panel, K, out);
    default: return tile<kRows>(x, ldx, panel, K, out);
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }
inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }

void check_panels(const at::Tensor& t, const char* name, int64_t experts) {
  TORCH_CHECK(t.dim() == 4 && t.size(1) == experts && t.size(3) == kBlock && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              name, " must be contiguous fp32 panels (blocks, E, K, 64)");
}

at::Tensor stream_experts(const at::Tensor& x, at::IntArrayRef counts, const at::Tensor& w13,
                          const std::optional<at::Tensor>& b13, const at::Tensor& w2,
                          const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& weight, bool swiglu) {
  const int64_t E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (N, D)");
  check_panels(w13, "w13", E);
  check_panels(w2, "w2", E);
  const int64_t N = x.size(0), D = x.size(1), NB1 = w13.size(0), NB2 = w2.size(0), Fp = w2.size(2);
  const int64_t width = swiglu ? kBlock / 2 : kBlock;  // activation columns per first-layer panel
  TORCH_CHECK(w13.size(2) == D && NB1 * width == Fp && NB2 * kBlock >= D, "panel shapes do not match x (N, D)");
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
  TORCH_CHECK(start[E] == N, "counts must sum to the rows of x");
  if (b13) TORCH_CHECK(b13->is_contiguous() && b13->numel() == E * NB1 * kBlock, "b13 must be packed like w13");
  if (b2) TORCH_CHECK(b2->is_contiguous() && b2->numel() == E * D, "b2 must be (E, D)");
  if (weight) TORCH_CHECK(weight->is_contiguous() && weight->numel() == N, "weight must be (N)");

  at::Tensor act = at::empty({N, Fp}, x.options());
  at::Tensor y = at::empty({N, D}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W13 = w13.data_ptr<float>();
  const float* W2 = w2.data_ptr<float>();
  const float* B13 = b13 ? b13->data_ptr<float>() : nullptr;
  const float* B2 = b2 ? b2->data_ptr<float>() : nullptr;
  const float* S = weight ? weight->data_ptr<float>() : nullptr;
  float* A = act.data_ptr<float>();
  float* Y = y.data_ptr<float>();

  // Task t is panel t / E of expert t % E, stored at t: each thread's contiguous share of tasks
  // holds a share of every expert's panels, so the threads get equal bytes and rows whatever the
  // counts.
  at::parallel_for(0, E * NB1, 1, [&](int64_t t0, int64_t t1) {
    float h[kRows * kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t % E, b = t / E;
      const float* panel = W13 + t * D * kBlock;
      const float* bias = B13 ? B13 + t * kBlock : nullptr;
      for (int64_t n0 = start[e]; n0 < start[e + 1]; n0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, start[e + 1] - n0));
        tile_rows(rows, X + n0 * D, D, panel, D, h);
        for (int r = 0; r < rows; ++r) {
          const float s = S ? S[n0 + r] : 1.f;
          const float* hr = h + r * kBlock;
          float* a = A + (n0 + r) * Fp + b * width;
          for (int64_t j = 0; j < width; ++j) {
            const float v = hr[j] + (bias ? bias[j] : 0.f);
            a[j] = swiglu ? silu(v) * (hr[j + width] + (bias ? bias[j + width] : 0.f)) * s : gelu(v) * s;
          }
        }
      }
    }
  });
  at::parallel_for(0, E * NB2, 1, [&](int64_t t0, int64_t t1) {
    float h[kRows * kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t % E, b = t / E, cols = std::min<int64_t>(kBlock, D - b * kBlock);
      const float* panel = W2 + t * Fp * kBlock;
      const float* bias = B2 ? B2 + e * D + b * kBlock : nullptr;
      for (int64_t n0 = start[e]; n0 < start[e + 1]; n0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, start[e + 1] - n0));
        tile_rows(rows, A + n0 * Fp, Fp, panel, Fp, h);
        for (int r = 0; r < rows; ++r) {
          const float s = S ? S[n0 + r] : 1.f;
          float* out = Y + (n0 + r) * D + b * kBlock;
          for (int64_t j = 0; j < cols; ++j) out[j] = h[r * kBlock + j] + (bias ? bias[j] * s : 0.f);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(fulu_nas_cpu, m) {
  m.def("stream_experts(Tensor x, int[] counts, Tensor w13, Tensor? b13, Tensor w2, Tensor? b2, Tensor? weight, "
        "bool swiglu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fulu_nas_cpu, CPU, m) { m.impl("stream_experts", &stream_experts); }
