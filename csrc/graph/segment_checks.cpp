#include <ATen/ATen.h>

#include "common/checks.h"
#include "graph/segment.h"
#include "graph/segment_ops.h"

namespace deepkern::graph {
namespace {

void check_reduce(int64_t reduce) {
  TORCH_CHECK(reduce >= kSum && reduce <= kMin,
              "reduce must be 0 (sum), 1 (mean), 2 (max) or 3 (min), got ", reduce);
}

// float32 and float64 everywhere; float16 and bfloat16 on CUDA, which accumulates in float32.
void check_float(const at::Tensor& t, const char* name) {
  const at::ScalarType dtype = t.scalar_type();
  const bool cuda_half = t.is_cuda() && (dtype == at::kHalf || dtype == at::kBFloat16);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || cuda_half, name,
              " must be float32 or float64 (float16 and bfloat16 on CUDA), got ", dtype, " on ",
              t.device());
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension (rows first), got a scalar");
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& ref,
                 const char* ref_name) {
  check_dtype(t, name, at::kLong);
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  check_same_device(t, name, ref, ref_name);
}

// The value checks, on a CPU tensor: reading in place costs a pass over N + E integers.
void check_structure_cpu(const at::Tensor& rowptr, int64_t rows, const char* rows_what,
                         const at::Tensor& col, int64_t columns) {
  const at::Tensor ptr = rowptr.contiguous();
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int64_t segments = ptr.numel() - 1;
  TORCH_CHECK(p[0] == 0, "rowptr must start at 0, got rowptr[0] = ", p[0]);
  for (int64_t i = 0; i < segments; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], "rowptr must be nondecreasing, got rowptr[", i, "] = ", p[i],
                " > rowptr[", i + 1, "] = ", p[i + 1]);
  }
  TORCH_CHECK(p[segments] == rows, "rowptr must end at ", rows, " (", rows_what,
              "), got rowptr[-1] = ", p[segments]);
  if (!col.defined()) return;

  const at::Tensor c = col.contiguous();
  const int64_t* pc = c.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < c.numel(); ++e) {
    TORCH_CHECK(pc[e] >= 0 && pc[e] < columns, "col must hold indices in [0, ", columns,
                ") (the rows of x), got col[", e, "] = ", pc[e]);
  }
}

// Reads rowptr (and col) values. On a GPU every condition joins one device reduction, read back
// with one host synchronisation; only when it fails are the tensors copied to the host to name
// the offending entry.
void check_structure(const at::Tensor& rowptr, int64_t rows, const char* rows_what,
                     const at::Tensor& col, int64_t columns) {
  TORCH_CHECK(rowptr.numel() >= 1, "rowptr must hold N + 1 >= 1 row pointers, got an empty tensor");
  if (rowptr.is_cpu()) {
    check_structure_cpu(rowptr, rows, rows_what, col, columns);
    return;
  }
  const int64_t segments = rowptr.numel() - 1;
  at::Tensor bad = (rowptr.select(0, 0) != 0).logical_or(rowptr.select(0, segments) != rows);
  if (segments > 0) {
    bad = bad.logical_or((rowptr.slice(0, 1) < rowptr.slice(0, 0, segments)).any());
  }
  if (col.defined() && col.numel() > 0) {
    bad = bad.logical_or(col.min() < 0).logical_or(col.max() >= columns);
  }
  if (bad.item<bool>()) {
    check_structure_cpu(rowptr.cpu(), rows, rows_what, col.defined() ? col.cpu() : col, columns);
  }
}

void check_output_grad(const at::Tensor& grad_out, const at::Tensor& rowptr, const at::Tensor& arg,
                       int64_t reduce) {
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(0) == rowptr.numel() - 1,
              "grad_out must have one row per segment (", rowptr.numel() - 1, "), got shape ",
              grad_out.sizes());
  check_index(rowptr, "rowptr", grad_out, "grad_out");
  check_dtype(arg, "arg", at::kLong);
  check_same_device(arg, "arg", grad_out, "grad_out");
  if (has_arg(reduce)) {
    check_same_shape(arg, "arg", grad_out, "grad_out");
  }
}

}  // namespace

int64_t row_features(const at::Tensor& t) {
  int64_t features = 1;
  for (int64_t d = 1; d < t.dim(); ++d) features *= t.size(d);
  return features;
}

std::vector<int64_t> with_rows(const at::Tensor& t, int64_t rows) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes[0] = rows;
  return sizes;
}

at::Tensor optional_weight(const c10::optional<at::Tensor>& weight) {
  if (weight.has_value() && weight->defined()) return weight->contiguous();
  return at::Tensor();
}

void check_segment_inputs(const at::Tensor& values, const at::Tensor& rowptr, int64_t reduce) {
  check_reduce(reduce);
  check_float(values, "values");
  check_index(rowptr, "rowptr", values, "values");
  check_structure(rowptr, values.size(0), "the rows of values", at::Tensor(), 0);
}

void check_segment_backward_inputs(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                   const at::Tensor& arg, int64_t reduce, int64_t rows) {
  check_reduce(reduce);
  check_float(grad_out, "grad_out");
  check_output_grad(grad_out, rowptr, arg, reduce);
  TORCH_CHECK(rows >= 0, "rows must be nonnegative, got ", rows);
  check_structure(rowptr, rows, "rows", at::Tensor(), 0);
}

void check_gather_inputs(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                         const c10::optional<at::Tensor>& weight, int64_t reduce) {
  check_reduce(reduce);
  check_float(x, "x");
  check_index(rowptr, "rowptr", x, "x");
  check_index(col, "col", x, "x");
  if (weight.has_value() && weight->defined()) {
    check_same_dtype(*weight, "weight", x, "x");
    check_same_device(*weight, "weight", x, "x");
    check_same_shape(*weight, "weight", col, "col");
  }
  check_structure(rowptr, col.numel(), "the number of edges, the length of col", col, x.size(0));
}

void check_gather_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& rowptr, const at::Tensor& col,
                                  const c10::optional<at::Tensor>& weight, const at::Tensor& arg,
                                  int64_t reduce) {
  check_gather_inputs(x, rowptr, col, weight, reduce);
  check_same_dtype(grad_out, "grad_out", x, "x");
  check_same_device(grad_out, "grad_out", x, "x");
  check_output_grad(grad_out, rowptr, arg, reduce);
  TORCH_CHECK(grad_out.sizes().slice(1) == x.sizes().slice(1),
              "grad_out must have rows shaped like the rows of x, got shape ", grad_out.sizes(),
              " for x of shape ", x.sizes());
}

}  // namespace deepkern::graph
