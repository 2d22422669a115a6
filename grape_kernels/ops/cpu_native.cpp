// The CPU experts loop in C++: the method of grape_kernels/ops/cpu.py without Python per step.
//
// Why it exists (measured with one thread, benchmarks/RESULTS.md): on small experts and small
// batches the Python loop spent about as long dispatching its ~40 torch calls per layer as
// oneDNN spent multiplying; on large batches its separate activation, weighting and
// concatenation passes cost 10-15% of a bfloat16 prefill step. Here the dispatch (a counting sort
// of the (token, slot) pairs by expert, which also checks the id range), the gather, the gated
// activation (AVX-512 where the CPU has it) and the weighted scatter-add into a float32
// accumulator are loops over raw memory, and each expert costs two oneDNN calls through the
// dispatcher.
//
// What it keeps: the GEMMs are oneDNN's, on the weights packed once by
// grape_kernels/ops/cpu_prepack.py (the fastest formulation measured at every row count); sums
// run in float32 and are rounded to the input dtype once, at the end.
//
// Built for the CPU it runs on at first use by grape_kernels/ops/cpu_native.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// oneDNN's linear on a weight packed by torch.ops.mkldnn._reorder_linear_weight (the op
// inductor emits for CPU linears), called unboxed with its registered C++ signature; a torch
// whose signature differs fails the first call with the dispatcher's error, which
// cpu_native.py's self-check turns into a reason and the Python loop.
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   std::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<std::string_view>);

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<LinearPointwise>();
  static const c10::List<std::optional<at::Scalar>> no_scalars(std::vector<std::optional<at::Scalar>>{std::nullopt});
  return op.call(x, packed, bias, "none", no_scalars, std::string_view(""));
}

// ATen's own bfloat16 GEMV: with oneDNN enabled at::mm hands bfloat16 to oneDNN, whose fixed
// cost per call dominates on small experts. The only switch is the process-wide user flag; it is
// restored even when the product throws.
struct MkldnnOff {
  bool was;
  MkldnnOff() : was(at::globalContext().userEnabledMkldnn()) { at::globalContext().setUserEnabledMkldnn(false); }
  ~MkldnnOff() { at::globalContext().setUserEnabledMkldnn(was); }
};

#if defined(__AVX512F__)
// y = W x + bias for one float32 row against a (out, in) weight: eight output rows at a time,
// each a 16-wide FMA chain over `in`, so eight weight rows stream together. MKL's GEMV (what
// at::mm runs) read a small expert at 25 GB/s here; this streams closer to the copy bandwidth.
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty({1, out}, x.options());
  const float* wp = w.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  constexpr int64_t kRows = 8;
  at::parallel_for(0, (out + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kRows, rows = std::min(kRows, out - n0);
      __m512 acc[kRows];
      for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= in; k += 16) {
        const __m512 xv = _mm512_loadu_ps(xp + k);
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wp + (n0 + r) * in + k), xv, acc[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float sum = _mm512_reduce_add_ps(acc[r]);
        for (int64_t j = k; j < in; ++j) sum += wp[(n0 + r) * in + j] * xp[j];
        yp[n0 + r] = bp != nullptr ? sum + bp[n0 + r] : sum;
      }
    }
  });
  return y;
}
#endif

// One projection of one expert's rows: x (n, in) -> (n, out), on the packed weight, or for one
// row with `gemv` set on the plain (E, out, in) weight: on a small expert a GEMV (gemv_f32 for
// float32 where AVX-512 is compiled in, else MKL's; ATen's for bfloat16) beats oneDNN's
// product, whose fixed cost per call dominates there (measured, one thread: float32 256x512,
// MKL 8 us vs oneDNN 16 us).
at::Tensor project(const at::Tensor& x, const std::vector<at::Tensor>& packed, const at::Tensor& plain, bool gemv,
                   const c10::optional<at::Tensor>& bias, int64_t expert) {
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->select(0, expert);
  if (gemv && x.size(0) == 1) {
#if defined(__AVX512F__)
    if (x.scalar_type() == at::kFloat) return gemv_f32(x.contiguous(), plain.select(0, expert), b);
#endif
    const at::Tensor w_in_out = plain.select(0, expert).t();
    MkldnnOff off;
    return b.has_value() ? at::addmm(*b, x, w_in_out) : at::mm(x, w_in_out);
  }
  TORCH_CHECK(static_cast<int64_t>(packed.size()) > expert, "no packed weight for expert ", expert);
  return packed_linear(x, packed[expert], b).contiguous();
}

// Element access in float32. bfloat16 is converted by bit operations (round to nearest even,
// NaN kept NaN) rather than through c10::BFloat16, whose NaN branch keeps GCC from vectorising
// the loops below; everything here is written so that -O3 vectorises it (with
// -fno-trapping-math, which lets GCC vectorise floor and float-to-int conversions).
inline float load(const float* p, int64_t i) { return p[i]; }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// exp(x) for the activations, branch-free so that it vectorises (std::exp does not without
// -ffast-math): Cody-Waite range reduction to r in [-ln2/2, ln2/2] and a degree-6 polynomial,
// about 2 ulp in float32 (far below bfloat16's rounding, and below float32 tolerances of the
// tests against float64). Arguments are clamped to [-87, 88], where float32 exp is finite and
// normal; NaN stays NaN.
inline float vector_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return y * scale;
}

#if defined(__AVX512F__)
// The activation in AVX-512 intrinsics: GCC does not vectorise the scalar loop well (its NaN-exact
// min/max and division cost 1 ns per element, measured; this runs at about a quarter of that).
// Same method as the scalar code: clamped Cody-Waite exp (the exponent applied with scalef),
// and 1 / (1 + e) as the 14-bit reciprocal estimate plus one Newton step (about 2^-27 relative).
// Clamps keep NaN: min/max_ps return their second operand when either is NaN, so the data is
// always the second operand.
namespace simd {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
  const __m256i raw = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i raw = _mm512_cvtepi32_epi16(rounded);
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), raw);
}

inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(_mm512_set1_ps(88.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// g * sigmoid(scale * g) = g / (1 + exp(-scale * g)).
inline __m512 gated16(__m512 g, float scale) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_mul_ps(g, _mm512_set1_ps(-scale))));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r, r);
  return _mm512_mul_ps(g, r);
}

// Whole vectors of one row; returns how many elements were done (the caller does the tail).
template <typename T, bool kInterleaved, bool kGptOss>
int64_t activate_vectors(const T* __restrict row, T* __restrict out, int64_t inter, float alpha, float limit) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t i = 0;
  for (; i + 16 <= inter; i += 16) {
    __m512 g, u;
    if constexpr (kInterleaved) {
      const __m512 a = load16(row + 2 * i), b = load16(row + 2 * i + 16);
      g = _mm512_permutex2var_ps(a, even, b);
      u = _mm512_permutex2var_ps(a, odd, b);
    } else {
      g = load16(row + i);
      u = load16(row + inter + i);
    }
    if constexpr (kGptOss) {
      g = _mm512_min_ps(_mm512_set1_ps(limit), g);
      u = _mm512_max_ps(_mm512_set1_ps(-limit), _mm512_min_ps(_mm512_set1_ps(limit), u));
      u = _mm512_add_ps(u, _mm512_set1_ps(1.0f));
      store16(out + i, _mm512_mul_ps(gated16(g, alpha), u));
    } else {
      store16(out + i, _mm512_mul_ps(gated16(g, 1.0f), u));
    }
  }
  return i;
}

}  // namespace simd
#endif

// One row of h = act(gate) * up, computed in float32 and rounded once: AVX-512 for whole
// vectors of 16 where the CPU has it, the portable scalar loop for the rest. The layout flags
// are template parameters so that each variant is a straight loop.
template <typename T, bool kInterleaved, bool kGptOss>
void activate_row(const T* __restrict row, T* __restrict out, int64_t inter, float alpha, float limit) {
  constexpr int64_t kGateStep = kInterleaved ? 2 : 1;
  const int64_t up_offset = kInterleaved ? 1 : inter;
  int64_t i = 0;
#if defined(__AVX512F__)
  i = simd::activate_vectors<T, kInterleaved, kGptOss>(row, out, inter, alpha, limit);
#endif
  for (; i < inter; ++i) {
    float g = load(row, i * kGateStep);
    float u = load(row, i * kGateStep + up_offset);
    if constexpr (kGptOss) {
      g = std::min(g, limit);
      u = std::min(std::max(u, -limit), limit) + 1.0f;
      store(out, i, g / (1.0f + vector_exp(-alpha * g)) * u);
    } else {
      store(out, i, g / (1.0f + vector_exp(-g)) * u);
    }
  }
}

template <typename T, bool kInterleaved, bool kGptOss>
void activate_rows(const at::Tensor& gate_up, at::Tensor& h, float alpha, float limit) {
  const int64_t rows = gate_up.size(0), inter = h.size(1);
  const T* src = gate_up.data_ptr<T>();
  T* dst = h.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(inter, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      activate_row<T, kInterleaved, kGptOss>(src + r * 2 * inter, dst + r * inter, inter, alpha, limit);
  });
}

template <typename T>
void activate(const at::Tensor& gate_up, at::Tensor& h, bool interleaved, bool gpt_oss, float alpha, float limit) {
  if (interleaved) {
    gpt_oss ? activate_rows<T, true, true>(gate_up, h, alpha, limit) : activate_rows<T, true, false>(gate_up, h, alpha, limit);
  } else {
    gpt_oss ? activate_rows<T, false, true>(gate_up, h, alpha, limit) : activate_rows<T, false, false>(gate_up, h, alpha, limit);
  }
}

// acc[token[r]] += weight[r] * y[r] for the rows of one expert. Split over columns, not rows,
// so that rows naming the same token (duplicate ids) never race.
template <typename T>
void scatter_add(const at::Tensor& y, const int64_t* token, const float* weight, float* acc, int64_t hidden) {
  const int64_t rows = y.size(0);
  const T* src = y.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(64, 32768 / std::max<int64_t>(rows, 1));
  at::parallel_for(0, hidden, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = src + r * hidden;
      float* out = acc + token[r] * hidden;
      const float w = weight[r];
      for (int64_t c = begin; c < end; ++c) out[c] += w * load(in, c);
    }
  });
}

// One experts layer: its weights in the forms the projections use, and its activation.
struct Layer {
  int64_t experts, intermediate;
  const std::vector<at::Tensor>& packed_gate_up;  // oneDNN-packed per expert (empty: GEMVs only)
  const std::vector<at::Tensor>& packed_down;
  const at::Tensor& w_gate_up;  // plain (E, 2I, H), for the one-row GEMVs
  const at::Tensor& w_down;     // plain (E, H, I)
  bool gemv_gate_up, gemv_down;
  const c10::optional<at::Tensor>& gate_up_bias;
  const c10::optional<at::Tensor>& down_bias;
  bool interleaved, gpt_oss;
  float alpha, limit;
};

template <typename T>
at::Tensor experts_impl(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& topk_weights,
                        const Layer& layer) {
  const int64_t experts = layer.experts, intermediate = layer.intermediate;
  const int64_t tokens = hidden.size(0), width = hidden.size(1), top_k = ids.size(1);
  const int64_t pairs = tokens * top_k;
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* route_weight = topk_weights.data_ptr<float>();

  // Counting sort of the pairs by expert; the id range is checked on the way.
  std::vector<int64_t> counts(experts + 1, 0);
  int64_t low = 0, high = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = id[p];
    low = p == 0 ? e : std::min(low, e);
    high = p == 0 ? e : std::max(high, e);
    if (e >= 0 && e < experts) ++counts[e + 1];
  }
  TORCH_CHECK_VALUE(pairs == 0 || (low >= 0 && high < experts), "topk_ids must lie in [0, ", experts,
                    ") for a layer with E=", experts, " experts, got values in [", low, ", ", high, "]");
  for (int64_t e = 0; e < experts; ++e) counts[e + 1] += counts[e];  // now offsets
  std::vector<int64_t> cursor(counts.begin(), counts.end() - 1), pair_token(pairs);
  std::vector<float> pair_weight(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t slot = cursor[id[p]]++;
    pair_token[slot] = p / top_k;
    pair_weight[slot] = route_weight[p];
  }

  // Expert-sorted copy of the inputs (one row per pair).
  at::Tensor gathered = at::empty({pairs, width}, hidden.options());
  {
    const T* src = hidden.data_ptr<T>();
    T* dst = gathered.data_ptr<T>();
    at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * width, src + pair_token[r] * width, width * sizeof(T));
    });
  }

  at::Tensor acc = at::zeros({tokens, width}, hidden.options().dtype(at::kFloat));
  float* acc_data = acc.data_ptr<float>();
  int64_t widest = 0;
  for (int64_t e = 0; e < experts; ++e) widest = std::max(widest, counts[e + 1] - counts[e]);
  at::Tensor h_buffer = at::empty({widest, intermediate}, hidden.options());
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = counts[e], rows = counts[e + 1] - begin;
    if (rows == 0) continue;
    const at::Tensor gate_up = project(gathered.narrow(0, begin, rows), layer.packed_gate_up, layer.w_gate_up,
                                       layer.gemv_gate_up, layer.gate_up_bias, e);
    at::Tensor h = h_buffer.narrow(0, 0, rows);
    activate<T>(gate_up, h, layer.interleaved, layer.gpt_oss, layer.alpha, layer.limit);
    const at::Tensor y = project(h, layer.packed_down, layer.w_down, layer.gemv_down, layer.down_bias, e);
    scatter_add<T>(y, pair_token.data() + begin, pair_weight.data() + begin, acc_data, width);
  }
  return acc.to(hidden.scalar_type());
}

at::Tensor cpu_experts(const at::Tensor& hidden, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       int64_t experts, const std::vector<at::Tensor>& packed_gate_up,
                       const std::vector<at::Tensor>& packed_down, const at::Tensor& w_gate_up,
                       const at::Tensor& w_down, bool gemv_gate_up, bool gemv_down,
                       const c10::optional<at::Tensor>& gate_up_bias,
                       const c10::optional<at::Tensor>& down_bias, int64_t intermediate, bool interleaved,
                       bool gpt_oss, double alpha, double limit) {
  const at::Tensor x = hidden.contiguous();
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const Layer layer{experts,     intermediate,  packed_gate_up, packed_down, w_gate_up,
                    w_down,      gemv_gate_up,  gemv_down,      gate_up_bias, down_bias,
                    interleaved, gpt_oss,       static_cast<float>(alpha), static_cast<float>(limit)};
  if (x.scalar_type() == at::kBFloat16) return experts_impl<c10::BFloat16>(x, ids, weights, layer);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "the native cpu experts path takes float32 or bfloat16, got ",
              x.scalar_type());
  return experts_impl<float>(x, ids, weights, layer);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_experts", &cpu_experts, "Routed-experts output (T, H): grape_kernels/ops/cpu.py's method in C++");
}
