// CUDA kernels of the segment reductions. One thread per output element (segment i, feature f),
// with a grid-stride loop: consecutive threads take consecutive features of one segment, so the
// reads of a row coalesce when there are 32 or more features. Each thread reduces its segment's
// rows in order with the arithmetic of segment.h, so the results are deterministic and equal to
// the CPU kernels' up to the contraction of multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "graph/segment.h"
#include "graph/segment_ops.h"

namespace deepkern::graph {
namespace {

constexpr int kThreads = 256;

// Op names for the dispatch macros, which need compile-time strings.
constexpr char kSegmentName[] = "segment_reduce";
constexpr char kSegmentBackwardName[] = "segment_reduce_backward";
constexpr char kGatherName[] = "gather_reduce";
constexpr char kGatherBackwardName[] = "gather_reduce_backward";

// Enough blocks to fill the device a few times over; the grid-stride loop covers the rest.
int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(wanted, 65535));
}

#define DEEPKERN_GRID_STRIDE(t, n)                                          \
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < (n); \
       t += int64_t(blockDim.x) * gridDim.x)

// out[i, f] = reduce over rows r of segment i of scale[r] * source[offset[r], f] (scale 1 and
// offset the identity when null).
template <int64_t reduce, typename scalar_t>
__global__ void reduce_kernel(const scalar_t* __restrict__ source,
                              const int64_t* __restrict__ offset,
                              const scalar_t* __restrict__ scale,
                              const int64_t* __restrict__ rowptr, int64_t segments,
                              int64_t features, scalar_t* __restrict__ out,
                              int64_t* __restrict__ arg) {
  using acc_t = at::opmath_type<scalar_t>;
  DEEPKERN_GRID_STRIDE(t, segments * features) {
    const int64_t i = t / features;
    const int64_t f = t - i * features;
    const int64_t first = rowptr[i];
    const int64_t last = rowptr[i + 1];
    acc_t acc = 0;
    int64_t best = -1;
    for (int64_t r = first; r < last; ++r) {
      const int64_t row = offset ? offset[r] : r;
      const acc_t w = scale ? static_cast<acc_t>(scale[r]) : acc_t(1);
      const acc_t value = w * static_cast<acc_t>(source[row * features + f]);
      if (r == first) {
        start<reduce>(value, r, &acc, &best);
      } else {
        accumulate<reduce>(value, r, &acc, &best);
      }
    }
    out[t] = static_cast<scalar_t>(finish<reduce>(acc, last - first));
    if constexpr (has_arg(reduce)) arg[t] = best;
  }
}

// grad_values[r, f] = row_gradient(grad_out[i, f]) for the rows r of segment i.
template <int64_t reduce, typename scalar_t>
__global__ void expand_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ arg,
                              const int64_t* __restrict__ rowptr, int64_t segments,
                              int64_t features, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  DEEPKERN_GRID_STRIDE(t, segments * features) {
    const int64_t i = t / features;
    const int64_t f = t - i * features;
    const int64_t count = rowptr[i + 1] - rowptr[i];
    const acc_t g = static_cast<acc_t>(grad[t]);
    const int64_t a = has_arg(reduce) ? arg[t] : -1;
    for (int64_t r = rowptr[i]; r < rowptr[i + 1]; ++r) {
      out[r * features + f] = static_cast<scalar_t>(row_gradient<reduce>(g, count, a, r));
    }
  }
}

// grad_x[v, f] = sum over the edges e of column v, in edge order (perm is a stable sort by
// column), of weight[e] times the gradient out[row e, f] sends to edge e.
template <int64_t reduce, typename scalar_t>
__global__ void x_gradient_kernel(const scalar_t* __restrict__ grad,
                                  const int64_t* __restrict__ arg,
                                  const scalar_t* __restrict__ weight,
                                  const int64_t* __restrict__ rowptr,
                                  const int64_t* __restrict__ colptr,
                                  const int64_t* __restrict__ perm,
                                  const int64_t* __restrict__ edge_row, int64_t columns,
                                  int64_t features, scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  DEEPKERN_GRID_STRIDE(t, columns * features) {
    const int64_t v = t / features;
    const int64_t f = t - v * features;
    acc_t acc = 0;
    for (int64_t p = colptr[v]; p < colptr[v + 1]; ++p) {
      const int64_t e = perm[p];
      const int64_t i = edge_row[e];
      const int64_t count = rowptr[i + 1] - rowptr[i];
      const acc_t w = weight ? static_cast<acc_t>(weight[e]) : acc_t(1);
      const acc_t g = static_cast<acc_t>(grad[i * features + f]);
      const int64_t a = has_arg(reduce) ? arg[i * features + f] : -1;
      acc += w * row_gradient<reduce>(g, count, a, e);
    }
    grad_x[t] = static_cast<scalar_t>(acc);
  }
}

// grad_weight[e] = sum over features of the gradient edge e receives times x[col[e]]; one
// thread per edge.
template <int64_t reduce, typename scalar_t>
__global__ void weight_gradient_kernel(const scalar_t* __restrict__ grad,
                                       const int64_t* __restrict__ arg,
                                       const scalar_t* __restrict__ x,
                                       const int64_t* __restrict__ col,
                                       const int64_t* __restrict__ rowptr,
                                       const int64_t* __restrict__ edge_row, int64_t edges,
                                       int64_t features, scalar_t* __restrict__ grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  DEEPKERN_GRID_STRIDE(e, edges) {
    const int64_t i = edge_row[e];
    const int64_t count = rowptr[i + 1] - rowptr[i];
    const scalar_t* xv = x + col[e] * features;
    acc_t acc = 0;
    for (int64_t f = 0; f < features; ++f) {
      const acc_t g = static_cast<acc_t>(grad[i * features + f]);
      const int64_t a = has_arg(reduce) ? arg[i * features + f] : -1;
      acc += row_gradient<reduce>(g, count, a, e) * static_cast<acc_t>(xv[f]);
    }
    grad_weight[e] = static_cast<scalar_t>(acc);
  }
}

#undef DEEPKERN_GRID_STRIDE

at::Tensor arg_for(int64_t reduce, const at::Tensor& out) {
  if (has_arg(reduce)) return at::empty(out.sizes(), out.options().dtype(at::kLong));
  return at::empty({0}, out.options().dtype(at::kLong));
}

template <const char* op_name>
TensorPair launch_reduce(const at::Tensor& source, const at::Tensor& offset,
                         const at::Tensor& scale, const at::Tensor& rowptr, int64_t reduce) {
  const int64_t segments = rowptr.numel() - 1;
  const int64_t features = row_features(source);
  at::Tensor out = at::empty(with_rows(source, segments), source.options());
  at::Tensor arg = arg_for(reduce, out);
  if (out.numel() == 0) return {out, arg};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), op_name, [&] {
    dispatch_reduce(reduce, [&](auto tag) {
      reduce_kernel<decltype(tag)::value, scalar_t>
          <<<blocks_for(out.numel()), kThreads, 0, stream>>>(
              source.const_data_ptr<scalar_t>(),
              offset.defined() ? offset.const_data_ptr<int64_t>() : nullptr,
              scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
              rowptr.const_data_ptr<int64_t>(), segments, features,
              out.mutable_data_ptr<scalar_t>(),
              has_arg(reduce) ? arg.mutable_data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, arg};
}

}  // namespace

TensorPair segment_reduce_cuda(const at::Tensor& values, const at::Tensor& rowptr, int64_t reduce) {
  check_segment_inputs(values, rowptr, reduce);
  check_device_type(values, "values", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(values.device());
  return launch_reduce<kSegmentName>(values.contiguous(), at::Tensor(), at::Tensor(),
                                     rowptr.contiguous(), reduce);
}

at::Tensor segment_reduce_backward_cuda(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                        const at::Tensor& arg, int64_t reduce, int64_t rows) {
  check_segment_backward_inputs(grad_out, rowptr, arg, reduce, rows);
  check_device_type(grad_out, "grad_out", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out.device());

  const int64_t segments = rowptr.numel() - 1;
  const int64_t features = row_features(grad_out);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ptr = rowptr.contiguous();
  const at::Tensor a = arg.contiguous();
  // Rows outside every segment do not exist (rowptr ends at rows), so every row is written.
  at::Tensor grad_values = at::empty(with_rows(grad_out, rows), g.options());
  if (grad_values.numel() == 0) return grad_values;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), kSegmentBackwardName, [&] {
        dispatch_reduce(reduce, [&](auto tag) {
          expand_kernel<decltype(tag)::value, scalar_t>
              <<<blocks_for(segments * features), kThreads, 0, stream>>>(
                  g.const_data_ptr<scalar_t>(),
                  has_arg(reduce) ? a.const_data_ptr<int64_t>() : nullptr,
                  ptr.const_data_ptr<int64_t>(), segments, features,
                  grad_values.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return grad_values;
}

TensorPair gather_reduce_cuda(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                              const c10::optional<at::Tensor>& weight, int64_t reduce) {
  check_gather_inputs(x, rowptr, col, weight, reduce);
  check_device_type(x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  return launch_reduce<kGatherName>(x.contiguous(), col.contiguous(), optional_weight(weight),
                                    rowptr.contiguous(), reduce);
}

TensorPair gather_reduce_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& rowptr, const at::Tensor& col,
                                       const c10::optional<at::Tensor>& weight,
                                       const at::Tensor& arg, int64_t reduce, bool x_grad,
                                       bool weight_grad) {
  check_gather_backward_inputs(grad_out, x, rowptr, col, weight, arg, reduce);
  check_device_type(x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t features = row_features(x);
  const int64_t columns = x.size(0);
  const int64_t edges = col.numel();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor xs = x.contiguous();
  const at::Tensor ptr = rowptr.contiguous();
  const at::Tensor c = col.contiguous();
  const at::Tensor a = arg.contiguous();
  const at::Tensor w = optional_weight(weight);
  at::Tensor grad_x =
      x_grad ? at::empty(with_rows(x, columns), xs.options()) : at::empty({0}, xs.options());
  at::Tensor grad_weight = at::empty({weight_grad ? edges : 0}, xs.options());
  if (edges == 0 || features == 0) {
    grad_x.zero_();
    grad_weight.zero_();
    return {grad_x, grad_weight};
  }

  // The transposed edge list, built on the device without a host synchronisation: a stable
  // sort by column, column pointers by binary search, and each edge's row by binary search in
  // rowptr (the last pointer not above e, which skips empty segments).
  const at::Tensor positions = at::arange(edges, c.options());
  const at::Tensor edge_row = at::searchsorted(ptr, positions, false, true) - 1;
  at::Tensor sorted_col, perm, colptr;
  if (x_grad) {
    std::tie(sorted_col, perm) = at::sort(c, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    colptr = at::searchsorted(sorted_col, at::arange(columns + 1, c.options()));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xs.scalar_type(), kGatherBackwardName, [&] {
        const int64_t* pa = has_arg(reduce) ? a.const_data_ptr<int64_t>() : nullptr;
        dispatch_reduce(reduce, [&](auto tag) {
          constexpr int64_t r = decltype(tag)::value;
          if (x_grad) {
            x_gradient_kernel<r, scalar_t><<<blocks_for(columns * features), kThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), pa,
                w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, ptr.const_data_ptr<int64_t>(),
                colptr.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
                edge_row.const_data_ptr<int64_t>(), columns, features,
                grad_x.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (weight_grad) {
            weight_gradient_kernel<r, scalar_t><<<blocks_for(edges), kThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), pa, xs.const_data_ptr<scalar_t>(),
                c.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>(),
                edge_row.const_data_ptr<int64_t>(), edges, features,
                grad_weight.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
  return {grad_x, grad_weight};
}

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) {
  m.impl("segment_reduce", &segment_reduce_cuda);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cuda);
  m.impl("gather_reduce", &gather_reduce_cuda);
  m.impl("gather_reduce_backward", &gather_reduce_backward_cuda);
}

}  // namespace deepkern::graph
