// Host side of loopy belief propagation: the input checks and the graph layout shared by the
// CPU and CUDA wrappers.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace deepkern::graph {

// (log_marginals [V, S], log_messages [E, S], iterations [G] int64, converged [G] bool).
using BPResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The checked, contiguous inputs of one call.
struct BPInputs {
  at::Tensor unary;       // [V, S]
  at::Tensor pairwise;    // [E, S, S]
  at::Tensor src, dst;    // [E]
  at::Tensor reverse;     // [E]
  at::Tensor node_graph;  // [V]
  int64_t nodes = 0;
  int64_t edges = 0;
  int64_t states = 0;
  int64_t graphs = 0;
};

// Where each graph's nodes and edges are, whatever order they come in: stable counting sorts of
// the nodes by graph, of the edges by graph, and of the edges by destination node (the incoming
// edges of each node). Each *_ptr holds the CSR row pointers of its order.
struct BPLayout {
  at::Tensor node_ptr, node_order;  // [G + 1], [V]
  at::Tensor edge_ptr, edge_order;  // [G + 1], [E]
  at::Tensor in_ptr, in_edges;      // [V + 1], [E]
};

// Checks every argument: shapes, dtypes, devices, index ranges, that reverse pairs each edge
// with its opposite, that edges stay within one graph, that the potentials are finite and that
// pairwise[reverse[e]] is pairwise[e] transposed. Reading values for these checks costs two
// host synchronisations on CUDA.
BPInputs check_bp_inputs(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& src,
                         const at::Tensor& dst, const at::Tensor& reverse,
                         const at::Tensor& node_graph, int64_t num_graphs, int64_t mode,
                         double damping, double tol, int64_t max_iters);

// On the device of the inputs; no host synchronisation. Without `incoming`, in_ptr and in_edges
// stay undefined.
BPLayout make_bp_layout(const BPInputs& in, bool incoming = true);

}  // namespace deepkern::graph
