#include <ATen/ATen.h>

#include <cmath>
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

// Value checks read back in one transfer: each condition is a 0-dim bool tensor computed on the
// device, and the first that fails raises with its message.
void check_all(const std::vector<std::pair<at::Tensor, std::string>>& conditions) {
  if (conditions.empty()) return;
  std::vector<at::Tensor> flags;
  flags.reserve(conditions.size());
  for (const auto& condition : conditions) flags.push_back(condition.first.reshape({1}));
  const at::Tensor host = at::cat(flags).to(at::kCPU);
  const bool* ok = host.const_data_ptr<bool>();
  for (size_t i = 0; i < conditions.size(); ++i) TORCH_CHECK(ok[i], conditions[i].second);
}

at::Tensor in_range(const at::Tensor& t, int64_t end) {
  return at::logical_and(t.ge(0), t.lt(end)).all();
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

  // Ranges first: the structural checks below index with these tensors.
  std::vector<std::pair<at::Tensor, std::string>> ranges;
  ranges.emplace_back(at::isfinite(in.unary).all(),
                      "unary must be finite (use a large negative log-potential, not -inf, for "
                      "a forbidden state)");
  ranges.emplace_back(at::isfinite(in.pairwise).all(),
                      "pairwise must be finite (use a large negative log-potential, not -inf, "
                      "for a forbidden pair)");
  const std::string node_range = " must lie in [0, " + std::to_string(nodes) + "), the nodes";
  const std::string graph_range =
      " must lie in [0, num_graphs = " + std::to_string(num_graphs) + ")";
  if (edges > 0) {
    ranges.emplace_back(in_range(in.src, nodes), "src" + node_range);
    ranges.emplace_back(in_range(in.dst, nodes), "dst" + node_range);
    ranges.emplace_back(in_range(in.reverse, edges),
                        "reverse must lie in [0, " + std::to_string(edges) + "), the edges");
  }
  if (nodes > 0)
    ranges.emplace_back(in_range(in.node_graph, num_graphs), "node_graph" + graph_range);
  check_all(ranges);
  if (edges == 0) return in;

  std::vector<std::pair<at::Tensor, std::string>> structure;
  structure.emplace_back(in.src.ne(in.dst).all(), "src and dst must differ: no self-loops");
  structure.emplace_back(
      in.reverse.index_select(0, in.reverse).eq(at::arange(edges, in.reverse.options())).all(),
      "reverse must be an involution: reverse[reverse[e]] == e for every edge e");
  structure.emplace_back(
      in.src.index_select(0, in.reverse).eq(in.dst).all(),
      "reverse must pair each edge with its opposite: src[reverse[e]] == dst[e]");
  structure.emplace_back(
      in.node_graph.index_select(0, in.src).eq(in.node_graph.index_select(0, in.dst)).all(),
      "every edge must join two nodes of the same graph: node_graph[src[e]] == "
      "node_graph[dst[e]]");
  structure.emplace_back(
      in.pairwise.index_select(0, in.reverse).eq(in.pairwise.transpose(1, 2)).all(),
      "pairwise[reverse[e]] must equal pairwise[e] transposed: each undirected edge has one "
      "potential, seen from either end");
  check_all(structure);
  return in;
}

BPLayout make_bp_layout(const BPInputs& in) {
  BPLayout layout;
  std::tie(layout.node_ptr, layout.node_order) = sort_by_key(in.node_graph, in.graphs);
  const at::Tensor edge_graph = in.node_graph.index_select(0, in.dst);
  std::tie(layout.edge_ptr, layout.edge_order) = sort_by_key(edge_graph, in.graphs);
  std::tie(layout.in_ptr, layout.in_edges) = sort_by_key(in.dst, in.nodes);
  return layout;
}

}  // namespace deepkern::graph
