#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "graph/bp.h"
#include "graph/bp_ops.h"

namespace deepkern::graph {
namespace {

void check_index(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& unary) {
  check_dtype(t, name, at::kLong);
  check_same_device(t, name, unary, "unary");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must have shape [", length, "], got ",
              t.sizes());
}

void check_flags(const std::vector<bool>& ok, const std::vector<std::string>& messages) {
  for (size_t i = 0; i < ok.size(); ++i) TORCH_CHECK(ok[i], messages[i]);
}

// Value checks on the device, read back in one transfer.
std::vector<bool> read_back(const std::vector<at::Tensor>& conditions) {
  std::vector<at::Tensor> flags;
  for (const at::Tensor& condition : conditions) flags.push_back(condition.reshape({1}));
  const at::Tensor host = at::cat(flags).to(at::kCPU);
  const bool* ok = host.const_data_ptr<bool>();
  return std::vector<bool>(ok, ok + host.numel());
}

at::Tensor in_range(const at::Tensor& t, int64_t end) {
  return at::logical_and(t.ge(0), t.lt(end)).all();
}

// Finite unary, finite pairwise, then src, dst, reverse and node_graph in range.
std::vector<bool> range_flags_device(const BPInputs& in) {
  return read_back({at::isfinite(in.unary).all(), at::isfinite(in.pairwise).all(),
                    in_range(in.src, in.nodes), in_range(in.dst, in.nodes),
                    in_range(in.reverse, in.edges), in_range(in.node_graph, in.graphs)});
}

// No self-loops, reverse an involution, reverse pairing opposite edges, edges within one graph,
// and transposed potentials.
std::vector<bool> structure_flags_device(const BPInputs& in) {
  const at::Tensor& rev = in.reverse;
  return read_back(
      {in.src.ne(in.dst).all(),
       rev.index_select(0, rev).eq(at::arange(in.edges, rev.options())).all(),
       in.src.index_select(0, rev).eq(in.dst).all(),
       in.node_graph.index_select(0, in.src).eq(in.node_graph.index_select(0, in.dst)).all(),
       in.pairwise.index_select(0, rev).eq(in.pairwise.transpose(1, 2)).all()});
}

// The same checks in single loops on the CPU, where a dozen tensor operations would cost as
// much as belief propagation itself on a batch of small graphs. The loops count failures
// without branches, so that they vectorise.

// A value is finite unless its exponent bits are all set (infinity and NaN).
template <typename T, typename Int>
bool all_finite(const at::Tensor& t) {
  static_assert(sizeof(T) == sizeof(Int));
  constexpr Int kExponent = sizeof(T) == 4 ? Int(0x7f800000) : Int(0x7ff0000000000000);
  const T* data = t.const_data_ptr<T>();
  const int64_t n = t.numel();
  Int failures = 0;
  for (int64_t i = 0; i < n; ++i)
    failures |= (std::bit_cast<Int>(data[i]) & kExponent) == kExponent;
  return failures == 0;
}

// 0 <= value < end when neither the value nor end - 1 - value has its sign bit set: ORs and
// subtractions only, which vectorise without 64-bit comparisons (unsigned, so that nothing
// overflows).
bool all_below(const at::Tensor& t, int64_t end) {
  const int64_t* data = t.const_data_ptr<int64_t>();
  const int64_t n = t.numel();
  const uint64_t last = static_cast<uint64_t>(end) - 1;
  uint64_t signs = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t value = static_cast<uint64_t>(data[i]);
    signs |= value | (last - value);
  }
  return (signs >> 63) == 0;
}

std::vector<bool> range_flags_cpu(const BPInputs& in) {
  const bool single = in.unary.scalar_type() == at::kFloat;
  return {
      single ? all_finite<float, int32_t>(in.unary) : all_finite<double, int64_t>(in.unary),
      single ? all_finite<float, int32_t>(in.pairwise) : all_finite<double, int64_t>(in.pairwise),
      all_below(in.src, in.nodes),
      all_below(in.dst, in.nodes),
      all_below(in.reverse, in.edges),
      all_below(in.node_graph, in.graphs)};
}

template <typename T>
bool transposed_pairs(const at::Tensor& pairwise, const int64_t* rev, int64_t edges, int64_t S) {
  const T* p = pairwise.const_data_ptr<T>();
  int64_t failures = 0;
  if (S == 2) {  // the common case, unrolled
    for (int64_t e = 0; e < edges; ++e) {
      const T* mine = p + e * 4;
      const T* theirs = p + rev[e] * 4;
      failures |= (theirs[0] != mine[0]) | (theirs[2] != mine[1]) | (theirs[1] != mine[2]) |
                  (theirs[3] != mine[3]);
    }
    return failures == 0;
  }
  for (int64_t e = 0; e < edges; ++e) {
    const T* mine = p + e * S * S;
    const T* theirs = p + rev[e] * S * S;
    for (int64_t a = 0; a < S; ++a) {
      for (int64_t b = 0; b < S; ++b) failures |= theirs[b * S + a] != mine[a * S + b];
    }
  }
  return failures == 0;
}

std::vector<bool> structure_flags_cpu(const BPInputs& in) {
  const int64_t* src = in.src.const_data_ptr<int64_t>();
  const int64_t* dst = in.dst.const_data_ptr<int64_t>();
  const int64_t* rev = in.reverse.const_data_ptr<int64_t>();
  const int64_t* graph = in.node_graph.const_data_ptr<int64_t>();
  int64_t loops = 0, not_involution = 0, not_opposite = 0, across_graphs = 0;
  for (int64_t e = 0; e < in.edges; ++e) {
    const int64_t r = rev[e];
    loops |= src[e] == dst[e];
    not_involution |= rev[r] != e;
    not_opposite |= src[r] != dst[e];
    across_graphs |= graph[src[e]] != graph[dst[e]];
  }
  const bool no_loops = loops == 0, involution = not_involution == 0;
  const bool opposite = not_opposite == 0, same_graph = across_graphs == 0;
  const bool transposed = in.pairwise.scalar_type() == at::kFloat
                              ? transposed_pairs<float>(in.pairwise, rev, in.edges, in.states)
                              : transposed_pairs<double>(in.pairwise, rev, in.edges, in.states);
  return {no_loops, involution, opposite, same_graph, transposed};
}

// Stable counting sort of keys in [0, buckets): row pointers [buckets + 1] and the order [n].
std::pair<at::Tensor, at::Tensor> sort_by_key(const at::Tensor& keys, int64_t buckets) {
  const auto options = keys.options().dtype(at::kLong);
  const int64_t n = keys.numel();
  if (keys.is_cpu()) {
    at::Tensor ptr = at::zeros({buckets + 1}, options);
    at::Tensor order = at::empty({n}, options);
    int64_t* p = ptr.mutable_data_ptr<int64_t>();
    int64_t* o = order.mutable_data_ptr<int64_t>();
    const int64_t* k = keys.const_data_ptr<int64_t>();

    // Keys in order already (a batch built graph by graph): the order is the identity, and each
    // bucket starts where the first key at or above it sits. This skips the counting loop,
    // whose increments of one bucket after another wait on each other.
    // Keys lie in [0, buckets), so differences do not overflow; a descent has the sign bit.
    int64_t steps = 0;
    for (int64_t i = 1; i < n; ++i) steps |= k[i] - k[i - 1];
    if (steps >= 0) {
      std::iota(o, o + n, int64_t(0));
      int64_t i = 0;
      for (int64_t b = 0; b <= buckets; ++b) {
        while (i < n && k[i] < b) ++i;
        p[b] = i;
      }
      return {ptr, order};
    }
    for (int64_t i = 0; i < n; ++i) ++p[k[i] + 1];
    for (int64_t b = 0; b < buckets; ++b) p[b + 1] += p[b];
    std::vector<int64_t> next(p, p + buckets);
    for (int64_t i = 0; i < n; ++i) o[next[k[i]]++] = i;
    return {ptr, order};
  }
  at::Tensor counts = at::zeros({buckets + 1}, options);
  if (n > 0) counts.index_add_(0, keys + 1, at::ones({n}, options));
  return {counts.cumsum(0), at::argsort(keys, /*stable=*/true)};
}

}  // namespace

BPInputs check_bp_inputs(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& src,
                         const at::Tensor& dst, const at::Tensor& reverse,
                         const at::Tensor& node_graph, int64_t num_graphs, int64_t mode,
                         double damping, double tol, int64_t max_iters) {
  TORCH_CHECK(unary.scalar_type() == at::kFloat || unary.scalar_type() == at::kDouble,
              "unary must be float32 or float64, got ", unary.scalar_type());
  TORCH_CHECK(unary.dim() == 2, "unary must have shape [nodes, states], got ", unary.sizes());
  const int64_t nodes = unary.size(0);
  const int64_t states = unary.size(1);
  TORCH_CHECK(states >= 1 && states <= kMaxStates, "unary must have between 1 and ", kMaxStates,
              " states (columns), got ", states);
  TORCH_CHECK(src.dim() == 1, "src must be 1-D, got ", src.dim(), " dimensions");
  const int64_t edges = src.size(0);
  check_index(src, "src", edges, unary);
  check_index(dst, "dst", edges, unary);
  check_index(reverse, "reverse", edges, unary);
  check_index(node_graph, "node_graph", nodes, unary);
  check_same_dtype(pairwise, "pairwise", unary, "unary");
  check_same_device(pairwise, "pairwise", unary, "unary");
  TORCH_CHECK(pairwise.dim() == 3 && pairwise.size(0) == edges && pairwise.size(1) == states &&
                  pairwise.size(2) == states,
              "pairwise must have shape [", edges, ", ", states, ", ", states, "], got ",
              pairwise.sizes());
  TORCH_CHECK(num_graphs >= 0, "num_graphs must be non-negative, got ", num_graphs);
  TORCH_CHECK(mode == kSumProduct || mode == kMaxProduct,
              "mode must be 0 (sum-product) or 1 (max-product), got ", mode);
  TORCH_CHECK(std::isfinite(damping) && damping >= 0.0 && damping < 1.0,
              "damping must lie in [0, 1), got ", damping);
  TORCH_CHECK(tol >= 0.0, "tol must be non-negative, got ", tol);
  TORCH_CHECK(max_iters >= 0, "max_iters must be non-negative, got ", max_iters);

  BPInputs in;
  in.unary = unary.contiguous();
  in.pairwise = pairwise.contiguous();
  in.src = src.contiguous();
  in.dst = dst.contiguous();
  in.reverse = reverse.contiguous();
  in.node_graph = node_graph.contiguous();
  in.nodes = nodes;
  in.edges = edges;
  in.states = states;
  in.graphs = num_graphs;

  // Ranges first: the structural checks index with these tensors.
  const std::string node_range = " must lie in [0, " + std::to_string(nodes) + "), the nodes";
  check_flags(in.unary.is_cpu() ? range_flags_cpu(in) : range_flags_device(in),
              {"unary must be finite (use a large negative log-potential, not -inf, for a "
               "forbidden state)",
               "pairwise must be finite (use a large negative log-potential, not -inf, for a "
               "forbidden pair)",
               "src" + node_range, "dst" + node_range,
               "reverse must lie in [0, " + std::to_string(edges) + "), the edges",
               "node_graph must lie in [0, num_graphs = " + std::to_string(num_graphs) + ")"});
  if (edges == 0) return in;
  check_flags(in.unary.is_cpu() ? structure_flags_cpu(in) : structure_flags_device(in),
              {"src and dst must differ: no self-loops",
               "reverse must be an involution: reverse[reverse[e]] == e for every edge e",
               "reverse must pair each edge with its opposite: src[reverse[e]] == dst[e]",
               "every edge must join two nodes of the same graph: node_graph[src[e]] == "
               "node_graph[dst[e]]",
               "pairwise[reverse[e]] must equal pairwise[e] transposed: each undirected edge has "
               "one potential, seen from either end"});
  return in;
}

BPLayout make_bp_layout(const BPInputs& in, bool incoming) {
  BPLayout layout;
  std::tie(layout.node_ptr, layout.node_order) = sort_by_key(in.node_graph, in.graphs);
  const at::Tensor edge_graph = in.node_graph.index_select(0, in.dst);
  std::tie(layout.edge_ptr, layout.edge_order) = sort_by_key(edge_graph, in.graphs);
  if (incoming) std::tie(layout.in_ptr, layout.in_edges) = sort_by_key(in.dst, in.nodes);
  return layout;
}

}  // namespace deepkern::graph
