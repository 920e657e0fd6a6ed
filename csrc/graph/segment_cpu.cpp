// CPU kernels of the segment reductions: at::parallel_for over segments, one pass over memory,
// the loop over features innermost so that it vectorises. The gradient of x in gather-reduce
// runs over the rows of x through the transposed edge list (CSC), so that every output element
// is again summed by one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "graph/segment.h"
#include "graph/segment_ops.h"

namespace deepkern::graph {
namespace {

// Op names for the dispatch macros, which need compile-time strings.
constexpr char kSegmentName[] = "segment_reduce";
constexpr char kSegmentBackwardName[] = "segment_reduce_backward";
constexpr char kGatherName[] = "gather_reduce";
constexpr char kGatherBackwardName[] = "gather_reduce_backward";

// About 32K elements of work per task: enough to amortise a task on large inputs, while a batch
// of a few small graphs stays on one thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain_for(int64_t items, int64_t elements) {
  const int64_t per_item = std::max<int64_t>(1, elements / std::max<int64_t>(1, items));
  return std::max<int64_t>(1, kGrainElements / per_item);
}

// arg[f] where the reduction keeps one (max and min), else unused: sum and mean pass no arg.
template <int64_t reduce>
C10_ALWAYS_INLINE int64_t arg_at(const int64_t* arg, int64_t f) {
  if constexpr (has_arg(reduce)) {
    return arg[f];
  } else {
    return -1;
  }
}

template <typename T>
void fill_empty(T* out, int64_t* arg, int64_t features) {
  std::fill(out, out + features, T(0));
  if (arg != nullptr) std::fill(arg, arg + features, int64_t(-1));
}

// Max and min over one segment, in tiles of kTile features kept in local arrays. The running
// arg is an offset into the segment of the width of T, so that the compare-and-select over a
// tile vectorises (a 64-bit index beside float32 values does not).
constexpr int64_t kTile = 64;

template <int64_t reduce, typename index_t, typename T>
void extreme_of_segment(const T* source, const int64_t* offset, const T* scale, int64_t first,
                        int64_t last, int64_t features, T* out, int64_t* arg) {
  for (int64_t f0 = 0; f0 < features; f0 += kTile) {
    const int64_t n = std::min(kTile, features - f0);
    T best[kTile];
    index_t where[kTile];
    for (int64_t r = first; r < last; ++r) {
      const T* __restrict__ v = source + (offset ? offset[r] : r) * features + f0;
      const T w = scale ? scale[r] : T(1);
      const index_t k = static_cast<index_t>(r - first);
      if (r == first) {
        for (int64_t f = 0; f < n; ++f) {
          best[f] = w * v[f];
          where[f] = 0;
        }
        continue;
      }
      for (int64_t f = 0; f < n; ++f) {
        const T value = w * v[f];
        const bool take = replaces<reduce>(value, best[f]);
        best[f] = take ? value : best[f];
        where[f] = take ? k : where[f];
      }
    }
    for (int64_t f = 0; f < n; ++f) {
      out[f0 + f] = best[f];
      arg[f0 + f] = first + where[f];
    }
  }
}

// out[i] = reduce over rows r of segment i of rows[r] * scale[r] (scale 1 when null), where row
// r starts at source + offset[r] * features (offset the identity when null). The segment op is
// the unit-weight identity-offset case; gather-reduce reads x[col[e]] * weight[e].
template <int64_t reduce, typename T>
void reduce_segments(const T* source, const int64_t* offset, const T* scale, const int64_t* rowptr,
                     int64_t segments, int64_t features, T* out, int64_t* arg) {
  const int64_t grain = grain_for(segments, rowptr[segments] * features);
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = rowptr[i];
      const int64_t last = rowptr[i + 1];
      T* __restrict__ o = out + i * features;
      int64_t* __restrict__ a = has_arg(reduce) ? arg + i * features : nullptr;
      if (first == last) {
        fill_empty(o, a, features);
        continue;
      }
      if constexpr (has_arg(reduce)) {
        using narrow_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
        if (last - first <= std::numeric_limits<narrow_t>::max()) {
          extreme_of_segment<reduce, narrow_t>(source, offset, scale, first, last, features, o, a);
        } else {
          extreme_of_segment<reduce, int64_t>(source, offset, scale, first, last, features, o, a);
        }
        continue;
      }
      for (int64_t r = first; r < last; ++r) {
        const T* __restrict__ v = source + (offset ? offset[r] : r) * features;
        const T w = scale ? scale[r] : T(1);
        if (r == first) {
          for (int64_t f = 0; f < features; ++f) start<reduce>(w * v[f], r, o + f, nullptr);
        } else {
          for (int64_t f = 0; f < features; ++f) accumulate<reduce>(w * v[f], r, o + f, nullptr);
        }
      }
      if constexpr (reduce == kMean) {
        for (int64_t f = 0; f < features; ++f) o[f] = finish<reduce>(o[f], last - first);
      }
    }
  });
}

// grad_values[r] = row_gradient(grad_out[i]) for every row r of segment i; each row belongs to
// one segment, so each element is written once. Sum and mean compute the first row and copy it;
// max and min zero the segment and place each gradient at its arg row (an arg outside the
// segment, which the forward never produces, sends nothing).
template <int64_t reduce, typename T>
void expand_segments(const T* grad, const int64_t* arg, const int64_t* rowptr, int64_t segments,
                     int64_t features, T* out) {
  const int64_t grain = grain_for(segments, rowptr[segments] * features);
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = rowptr[i];
      const int64_t last = rowptr[i + 1];
      const T* __restrict__ g = grad + i * features;
      T* __restrict__ rows = out + first * features;
      if (first == last) continue;
      if constexpr (has_arg(reduce)) {
        const int64_t* a = arg + i * features;
        std::fill(rows, rows + (last - first) * features, T(0));
        for (int64_t f = 0; f < features; ++f) {
          if (a[f] >= first && a[f] < last) {
            out[a[f] * features + f] = row_gradient<reduce>(g[f], last - first, a[f], a[f]);
          }
        }
      } else {
        for (int64_t f = 0; f < features; ++f) {
          rows[f] = row_gradient<reduce>(g[f], last - first, -1, first);
        }
        for (int64_t r = 1; r < last - first; ++r) {
          std::copy(rows, rows + features, rows + r * features);
        }
      }
    }
  });
}

// The edges sorted by column, stably (so by row within a column): a counting sort in two
// passes. csc_edge[p] and csc_row[p] are the edge and its row at position p; the edges of
// column v sit at colptr[v] .. colptr[v + 1].
struct Transposed {
  std::vector<int64_t> colptr, csc_edge, csc_row;
};

Transposed transpose(const int64_t* rowptr, int64_t segments, const int64_t* col, int64_t edges,
                     int64_t columns) {
  Transposed t;
  t.colptr.assign(columns + 1, 0);
  for (int64_t e = 0; e < edges; ++e) ++t.colptr[col[e] + 1];
  for (int64_t v = 0; v < columns; ++v) t.colptr[v + 1] += t.colptr[v];

  std::vector<int64_t> next(t.colptr.begin(), t.colptr.end() - 1);
  t.csc_edge.resize(edges);
  t.csc_row.resize(edges);
  for (int64_t i = 0; i < segments; ++i) {
    for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
      const int64_t p = next[col[e]]++;
      t.csc_edge[p] = e;
      t.csc_row[p] = i;
    }
  }
  return t;
}

// grad_x[v] = sum over edges e into column v, in (row, edge) order, of weight[e] times the
// gradient that out[row e] sends to edge e.
template <int64_t reduce, typename T>
void gather_x_gradient(const T* grad, const int64_t* arg, const T* weight, const int64_t* rowptr,
                       const Transposed& t, int64_t columns, int64_t features, T* grad_x) {
  const int64_t grain = grain_for(columns, static_cast<int64_t>(t.csc_edge.size()) * features);
  at::parallel_for(0, columns, grain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      T* __restrict__ o = grad_x + v * features;
      std::fill(o, o + features, T(0));
      for (int64_t p = t.colptr[v]; p < t.colptr[v + 1]; ++p) {
        const int64_t e = t.csc_edge[p];
        const int64_t i = t.csc_row[p];
        const int64_t count = rowptr[i + 1] - rowptr[i];
        const T w = weight ? weight[e] : T(1);
        const T* __restrict__ g = grad + i * features;
        const int64_t* a = has_arg(reduce) ? arg + i * features : nullptr;
        for (int64_t f = 0; f < features; ++f) {
          o[f] += w * row_gradient<reduce>(g[f], count, arg_at<reduce>(a, f), e);
        }
      }
    }
  });
}

// grad_weight[e] = sum over features of the gradient edge e receives times x[col[e]].
template <int64_t reduce, typename T>
void gather_weight_gradient(const T* grad, const int64_t* arg, const T* x, const int64_t* col,
                            const int64_t* rowptr, int64_t segments, int64_t features,
                            T* grad_weight) {
  const int64_t grain = grain_for(segments, rowptr[segments] * features);
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t count = rowptr[i + 1] - rowptr[i];
      const T* __restrict__ g = grad + i * features;
      const int64_t* a = has_arg(reduce) ? arg + i * features : nullptr;
      for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
        const T* __restrict__ xv = x + col[e] * features;
        T acc = 0;
        for (int64_t f = 0; f < features; ++f) {
          acc += row_gradient<reduce>(g[f], count, arg_at<reduce>(a, f), e) * xv[f];
        }
        grad_weight[e] = acc;
      }
    }
  });
}

at::Tensor arg_for(int64_t reduce, const at::Tensor& out) {
  if (has_arg(reduce)) return at::empty(out.sizes(), out.options().dtype(at::kLong));
  return at::empty({0}, out.options().dtype(at::kLong));
}

}  // namespace

TensorPair segment_reduce_cpu(const at::Tensor& values, const at::Tensor& rowptr, int64_t reduce) {
  check_segment_inputs(values, rowptr, reduce);
  check_device_type(values, "values", c10::DeviceType::CPU);

  const int64_t segments = rowptr.numel() - 1;
  const int64_t features = row_features(values);
  const at::Tensor v = values.contiguous();
  const at::Tensor ptr = rowptr.contiguous();
  at::Tensor out = at::empty(with_rows(values, segments), v.options());
  at::Tensor arg = arg_for(reduce, out);
  if (out.numel() == 0) return {out, arg};

  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), kSegmentName, [&] {
    dispatch_reduce(reduce, [&](auto tag) {
      reduce_segments<decltype(tag)::value, scalar_t>(
          v.const_data_ptr<scalar_t>(), nullptr, nullptr, ptr.const_data_ptr<int64_t>(), segments,
          features, out.mutable_data_ptr<scalar_t>(),
          has_arg(reduce) ? arg.mutable_data_ptr<int64_t>() : nullptr);
    });
  });
  return {out, arg};
}

at::Tensor segment_reduce_backward_cpu(const at::Tensor& grad_out, const at::Tensor& rowptr,
                                       const at::Tensor& arg, int64_t reduce, int64_t rows) {
  check_segment_backward_inputs(grad_out, rowptr, arg, reduce, rows);
  check_device_type(grad_out, "grad_out", c10::DeviceType::CPU);

  const int64_t segments = rowptr.numel() - 1;
  const int64_t features = row_features(grad_out);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ptr = rowptr.contiguous();
  const at::Tensor a = arg.contiguous();
  at::Tensor grad_values = at::empty(with_rows(grad_out, rows), g.options());
  if (grad_values.numel() == 0) return grad_values;

  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), kSegmentBackwardName, [&] {
    dispatch_reduce(reduce, [&](auto tag) {
      expand_segments<decltype(tag)::value, scalar_t>(
          g.const_data_ptr<scalar_t>(), has_arg(reduce) ? a.const_data_ptr<int64_t>() : nullptr,
          ptr.const_data_ptr<int64_t>(), segments, features,
          grad_values.mutable_data_ptr<scalar_t>());
    });
  });
  return grad_values;
}

TensorPair gather_reduce_cpu(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
                             const c10::optional<at::Tensor>& weight, int64_t reduce) {
  check_gather_inputs(x, rowptr, col, weight, reduce);
  check_device_type(x, "x", c10::DeviceType::CPU);

  const int64_t segments = rowptr.numel() - 1;
  const int64_t features = row_features(x);
  const at::Tensor xs = x.contiguous();
  const at::Tensor ptr = rowptr.contiguous();
  const at::Tensor c = col.contiguous();
  const at::Tensor w = optional_weight(weight);
  at::Tensor out = at::empty(with_rows(x, segments), xs.options());
  at::Tensor arg = arg_for(reduce, out);
  if (out.numel() == 0) return {out, arg};

  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), kGatherName, [&] {
    dispatch_reduce(reduce, [&](auto tag) {
      reduce_segments<decltype(tag)::value, scalar_t>(
          xs.const_data_ptr<scalar_t>(), c.const_data_ptr<int64_t>(),
          w.defined() ? w.const_data_ptr<scalar_t>() : nullptr, ptr.const_data_ptr<int64_t>(),
          segments, features, out.mutable_data_ptr<scalar_t>(),
          has_arg(reduce) ? arg.mutable_data_ptr<int64_t>() : nullptr);
    });
  });
  return {out, arg};
}

TensorPair gather_reduce_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& rowptr, const at::Tensor& col,
                                      const c10::optional<at::Tensor>& weight,
                                      const at::Tensor& arg, int64_t reduce, bool x_grad,
                                      bool weight_grad) {
  check_gather_backward_inputs(grad_out, x, rowptr, col, weight, arg, reduce);
  check_device_type(x, "x", c10::DeviceType::CPU);

  const int64_t segments = rowptr.numel() - 1;
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
      at::empty(x_grad ? with_rows(x, columns) : std::vector<int64_t>{0}, xs.options());
  at::Tensor grad_weight = at::empty({weight_grad ? edges : 0}, xs.options());

  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), kGatherBackwardName, [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const int64_t* pa = has_arg(reduce) ? a.const_data_ptr<int64_t>() : nullptr;
    const int64_t* pptr = ptr.const_data_ptr<int64_t>();
    dispatch_reduce(reduce, [&](auto tag) {
      constexpr int64_t r = decltype(tag)::value;
      if (x_grad && grad_x.numel() > 0) {
        const Transposed t = transpose(pptr, segments, c.const_data_ptr<int64_t>(), edges, columns);
        gather_x_gradient<r, scalar_t>(pg, pa, w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
                                       pptr, t, columns, features,
                                       grad_x.mutable_data_ptr<scalar_t>());
      }
      if (weight_grad && edges > 0) {
        gather_weight_gradient<r, scalar_t>(pg, pa, xs.const_data_ptr<scalar_t>(),
                                            c.const_data_ptr<int64_t>(), pptr, segments, features,
                                            grad_weight.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return {grad_x, grad_weight};
}

TORCH_LIBRARY_IMPL(deepkern, CPU, m) {
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cpu);
  m.impl("gather_reduce", &gather_reduce_cpu);
  m.impl("gather_reduce_backward", &gather_reduce_backward_cpu);
}

}  // namespace deepkern::graph
