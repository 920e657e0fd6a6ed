// CPU kernels of the momentum family: one pass over memory, at::parallel_for over elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "momentum/momentum.h"
#include "momentum/momentum_ops.h"

namespace deepkern::momentum {
namespace {

// Elementwise steps are memory bound; 32K elements per task keeps threads busy on large tensors
// without spawning tasks for tiny ones.
constexpr int64_t kGrain = 32768;

// Op names for the dispatch macros, which need compile-time strings.
constexpr char kForwardName[] = "momentum_forward";
constexpr char kInverseName[] = "momentum_inverse";
constexpr char kBackwardName[] = "momentum_backward";
constexpr char kExactForwardName[] = "momentum_exact_forward";
constexpr char kExactInverseName[] = "momentum_exact_inverse";

// The three float-mode ops share one shape: three inputs in, two outputs out.
template <const char* op_name, typename Step>
TensorPair run_pairwise(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double gamma,
                        Step step) {
  const at::Tensor a_in = a.contiguous();
  const at::Tensor b_in = b.contiguous();
  const at::Tensor c_in = c.contiguous();
  at::Tensor out0 = at::empty_like(a_in);
  at::Tensor out1 = at::empty_like(a_in);
  const int64_t n = a_in.numel();
  if (n == 0) return {out0, out1};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_in.scalar_type(), op_name, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a_in.const_data_ptr<scalar_t>();
    const scalar_t* pb = b_in.const_data_ptr<scalar_t>();
    const scalar_t* pc = c_in.const_data_ptr<scalar_t>();
    scalar_t* p0 = out0.mutable_data_ptr<scalar_t>();
    scalar_t* p1 = out1.mutable_data_ptr<scalar_t>();
    const acc_t g = static_cast<acc_t>(gamma);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        step(pa[i], pb[i], pc[i], g, p0 + i, p1 + i);
      }
    });
  });
  return {out0, out1};
}

// Exact steps run per chunk so that each chunk's checksum and error count can be summed in a
// fixed order afterwards. Chunks of 4096 elements: each element costs O(limbs), more than a
// float step.
constexpr int64_t kExactChunk = 4096;

template <bool kForward>
ExactResult run_exact(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                      const at::Tensor& buffer, int64_t numer, int64_t denom, int64_t frac_bits,
                      int64_t buffer_limbs) {
  const at::Tensor x_in = x.contiguous();
  const at::Tensor v_in = v.contiguous();
  const at::Tensor f_in = f.contiguous();
  const at::Tensor buffer_in = buffer.contiguous();
  const int64_t n = x_in.numel();
  const int64_t limbs_in = buffer_in.size(0);

  at::Tensor x_out = at::empty_like(x_in);
  at::Tensor v_out = at::empty_like(v_in);
  at::Tensor buffer_out = at::empty({buffer_limbs, n}, buffer_in.options());
  at::Tensor status = at::zeros({2}, x_in.options());
  const double update_scale = exact_update_scale(numer, denom, frac_bits);
  const SmallDivisor numer_div = make_divisor(static_cast<uint32_t>(numer));
  const SmallDivisor denom_div = make_divisor(static_cast<uint32_t>(denom));

  const int64_t num_chunks = (n + kExactChunk - 1) / kExactChunk;
  std::vector<uint64_t> chunk_hash(num_chunks, 0);
  std::vector<uint64_t> chunk_errors(num_chunks, 0);

  constexpr const char* op_name = kForward ? kExactForwardName : kExactInverseName;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f_in.scalar_type(), op_name, [&] {
    const int64_t* px = x_in.const_data_ptr<int64_t>();
    const int64_t* pv = v_in.const_data_ptr<int64_t>();
    const scalar_t* pf = f_in.const_data_ptr<scalar_t>();
    int64_t* px_out = x_out.mutable_data_ptr<int64_t>();
    int64_t* pv_out = v_out.mutable_data_ptr<int64_t>();
    const uint32_t* limbs_read = reinterpret_cast<const uint32_t*>(buffer_in.const_data_ptr());
    uint32_t* limbs_write = reinterpret_cast<uint32_t*>(buffer_out.mutable_data_ptr());

    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        uint64_t hash = 0;
        uint64_t errors = 0;
        const int64_t end = std::min(n, (chunk + 1) * kExactChunk);
        for (int64_t i = chunk * kExactChunk; i < end; ++i) {
          int64_t xi = px[i];
          int64_t vi = pv[i];
          int64_t q = 0;
          const double fi = static_cast<double>(pf[i]);
          const BufferView view{limbs_read + i, limbs_in, limbs_write + i, buffer_limbs, n};
          const bool ok =
              kForward
                  ? exact_forward_step(&xi, &vi, fi, update_scale, view, numer_div, denom_div, &q)
                  : exact_inverse_step(&xi, &vi, fi, update_scale, view, numer_div, denom_div, &q);
          px_out[i] = xi;
          pv_out[i] = vi;
          hash += checksum_term(q, i);
          errors += ok ? 0 : 1;
        }
        chunk_hash[chunk] = hash;
        chunk_errors[chunk] = errors;
      }
    });
  });

  uint64_t hash = 0;
  uint64_t errors = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    hash += chunk_hash[c];
    errors += chunk_errors[c];
  }
  int64_t* ps = status.mutable_data_ptr<int64_t>();
  ps[0] = static_cast<int64_t>(hash);
  ps[1] = static_cast<int64_t>(errors);
  return {x_out, v_out, buffer_out, status};
}

}  // namespace

TensorPair forward_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                       double gamma) {
  check_step_inputs(x, "x", v, "v", f, "f", gamma);
  check_device_type(x, "x", c10::DeviceType::CPU);
  return run_pairwise<kForwardName>(
      x, v, f, gamma,
      [](auto a, auto b, auto c, auto g, auto* o0, auto* o1) { forward_step(a, b, c, g, o0, o1); });
}

TensorPair inverse_cpu(const at::Tensor& x_next, const at::Tensor& v_next, const at::Tensor& f,
                       double gamma) {
  check_step_inputs(x_next, "x_next", v_next, "v_next", f, "f", gamma);
  check_device_type(x_next, "x_next", c10::DeviceType::CPU);
  return run_pairwise<kInverseName>(
      x_next, v_next, f, gamma,
      [](auto a, auto b, auto c, auto g, auto* o0, auto* o1) { inverse_step(a, b, c, g, o0, o1); });
}

TensorPair backward_cpu(const at::Tensor& grad_x_next, const at::Tensor& grad_v_next,
                        const at::Tensor& vjp, double gamma) {
  check_step_inputs(grad_x_next, "grad_x_next", grad_v_next, "grad_v_next", vjp, "vjp", gamma);
  check_device_type(grad_x_next, "grad_x_next", c10::DeviceType::CPU);
  return run_pairwise<kBackwardName>(grad_x_next, grad_v_next, vjp, gamma,
                                     [](auto a, auto b, auto c, auto g, auto* o0, auto* o1) {
                                       backward_step(a, b, c, g, o0, o1);
                                     });
}

ExactResult exact_forward_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                              const at::Tensor& buffer, int64_t numer, int64_t denom,
                              int64_t frac_bits, int64_t buffer_limbs) {
  check_exact_inputs(x, "x", v, "v", f, buffer, numer, denom, frac_bits, buffer_limbs);
  check_device_type(x, "x", c10::DeviceType::CPU);
  TORCH_CHECK(buffer_limbs >= buffer.size(0), "buffer_limbs must be at least the ", buffer.size(0),
              " limbs buffer already has (a forward step never shrinks it), got ", buffer_limbs);
  return run_exact<true>(x, v, f, buffer, numer, denom, frac_bits, buffer_limbs);
}

ExactResult exact_inverse_cpu(const at::Tensor& x_next, const at::Tensor& v_next,
                              const at::Tensor& f, const at::Tensor& buffer, int64_t numer,
                              int64_t denom, int64_t frac_bits, int64_t buffer_limbs) {
  check_exact_inputs(x_next, "x_next", v_next, "v_next", f, buffer, numer, denom, frac_bits,
                     buffer_limbs);
  check_device_type(x_next, "x_next", c10::DeviceType::CPU);
  TORCH_CHECK(buffer_limbs <= buffer.size(0), "buffer_limbs must be at most the ", buffer.size(0),
              " limbs buffer has (an inverse step never grows it), got ", buffer_limbs);
  return run_exact<false>(x_next, v_next, f, buffer, numer, denom, frac_bits, buffer_limbs);
}

TORCH_LIBRARY_IMPL(deepkern, CPU, m) {
  m.impl("momentum_forward", &forward_cpu);
  m.impl("momentum_inverse", &inverse_cpu);
  m.impl("momentum_backward", &backward_cpu);
  m.impl("momentum_exact_forward", &exact_forward_cpu);
  m.impl("momentum_exact_inverse", &exact_inverse_cpu);
}

}  // namespace deepkern::momentum
