// Host side of the segment reductions: input checks shared by the CPU and CUDA wrappers, and the
// host entry points, one per schema in deepkern.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace deepkern::graph {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// Checks of segment_checks.cpp. Each one that reads rowptr or col values (monotone pointers,
// indices in range) costs one device reduction and one host synchronisation on CUDA; the CPU
// reads them in place.
void check_segment_inputs(const at::Tensor& values, const at::Tensor& rowptr, int64_t reduce);
void check_segment_backward_inputs(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                   const at::Tensor& arg, int64_t reduce, int64_t rows);
void check_gather_inputs(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                         const c10::optional<at::Tensor>& weight, int64_t reduce);
void check_gather_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& rowptr, const at::Tensor& col,
                                  const c10::optional<at::Tensor>& weight, const at::Tensor& arg,
                                  int64_t reduce);

// The product of the sizes after the first: the features of one row.
int64_t row_features(const at::Tensor& t);
// The sizes of t with the first replaced by `rows`.
std::vector<int64_t> with_rows(const at::Tensor& t, int64_t rows);
// The weight as a contiguous tensor, or an undefined one when absent (weight 1).
at::Tensor optional_weight(const c10::optional<at::Tensor>& weight);

TensorPair segment_reduce_cpu(const at::Tensor& values, const at::Tensor& rowptr, int64_t reduce);
at::Tensor segment_reduce_backward_cpu(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                       const at::Tensor& arg, int64_t reduce, int64_t rows);
TensorPair gather_reduce_cpu(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                             const c10::optional<at::Tensor>& weight, int64_t reduce);
TensorPair gather_reduce_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& rowptr, const at::Tensor& col,
                                      const c10::optional<at::Tensor>& weight,
                                      const at::Tensor& arg, int64_t reduce, bool x_grad,
                                      bool weight_grad);

}  // namespace deepkern::graph
