// CUDA loopy belief propagation. One warp per graph: its lanes stride over the graph's nodes
// (to sum incoming messages) and edges (to update messages), __syncwarp orders the phases, and a
// shuffle reduction of the largest change lets the whole warp decide together when its graph
// has converged. Graphs never wait for each other. Messages live in global memory; graphs of a
// few hundred edges stay in L1 and L2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "graph/bp.h"
#include "graph/bp_ops.h"

namespace deepkern::graph {
namespace {

constexpr char kLoopyBPName[] = "loopy_bp";

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Problem {
  int states;
  bool sum_product;
  T damping;
  T undamped;
  T tol;
  T start;
  int64_t max_iters;
  int64_t graphs;
  const T* unary;
  const T* pairwise;
  const int64_t* src;
  const int64_t* reverse;
  const int64_t* node_ptr;
  const int64_t* node_order;
  const int64_t* edge_ptr;
  const int64_t* edge_order;
  const int64_t* in_ptr;
  const int64_t* in_edges;
  T* messages;
  T* spare;
  T* incoming;
  T* kernel;
  T* shift;
  T* scale;
  T* marginals;
  int64_t* iterations;
  bool* converged;
};

template <typename T, int kFixed>
__device__ void gather_incoming(const Problem<T>& p, const T* from, int64_t v, T* out) {
  const int S = state_count<kFixed>(p.states);
  for (int b = 0; b < S; ++b) out[b] = T(0);
  for (int64_t k = p.in_ptr[v]; k < p.in_ptr[v + 1]; ++k) {
    const T* m = from + p.in_edges[k] * S;
    for (int b = 0; b < S; ++b) out[b] += m[b];
  }
}

template <typename T, int kFixed>
__global__ void loopy_bp_kernel(const Problem<T> p) {
  const int S = state_count<kFixed>(p.states);
  const int lane = threadIdx.x % kWarp;
  const int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (g >= p.graphs) return;  // the whole warp leaves together
  const int64_t first_node = p.node_ptr[g];
  const int64_t last_node = p.node_ptr[g + 1];
  const int64_t first_edge = p.edge_ptr[g];
  const int64_t last_edge = p.edge_ptr[g + 1];

  for (int64_t k = first_edge + lane; k < last_edge; k += kWarp) {
    const int64_t e = p.edge_order[k];
    for (int b = 0; b < S; ++b) p.messages[e * S + b] = p.start;
    if (p.sum_product) {
      prepare_sum_edge<T, kFixed>(S, p.pairwise + e * S * S, p.kernel + e * S * S, p.shift + e * S,
                                  p.scale + e * S);
    }
  }
  __syncwarp();

  T* current = p.messages;
  T* next = p.spare;
  int64_t iteration = 0;
  bool done = false;
  T cavity[kFixed > 0 ? kFixed : kMaxStates];
  while (iteration < p.max_iters) {
    for (int64_t k = first_node + lane; k < last_node; k += kWarp) {
      const int64_t v = p.node_order[k];
      gather_incoming<T, kFixed>(p, current, v, p.incoming + v * S);
    }
    __syncwarp();

    T change = T(0);
    for (int64_t k = first_edge + lane; k < last_edge; k += kWarp) {
      const int64_t e = p.edge_order[k];
      const int64_t u = p.src[e];
      const T* back = current + p.reverse[e] * S;
      for (int a = 0; a < S; ++a) cavity[a] = p.unary[u * S + a] + p.incoming[u * S + a] - back[a];
      T* out = next + e * S;
      if (p.sum_product) {
        sum_product_message<T, kFixed>(S, cavity, p.pairwise + e * S * S, p.kernel + e * S * S,
                                       p.shift + e * S, p.scale + e * S, out);
      } else {
        max_product_message<T, kFixed>(S, cavity, p.pairwise + e * S * S, out);
      }
      change = worse_change(change, finish_message<T, kFixed>(S, p.sum_product, p.damping,
                                                              p.undamped, current + e * S, out));
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      change = worse_change(change, __shfl_xor_sync(kFullMask, change, offset));
    }
    ++iteration;
    T* const swap = current;
    current = next;
    next = swap;
    __syncwarp();
    if (change <= p.tol) {
      done = true;
      break;
    }
  }

  // Copy the last messages home if they sit in the spare buffer; the marginals read them where
  // they are, so no lane waits for the copy.
  if (current != p.messages) {
    for (int64_t k = first_edge + lane; k < last_edge; k += kWarp) {
      const int64_t e = p.edge_order[k];
      for (int b = 0; b < S; ++b) p.messages[e * S + b] = current[e * S + b];
    }
  }
  for (int64_t k = first_node + lane; k < last_node; k += kWarp) {
    const int64_t v = p.node_order[k];
    T* marginal = p.marginals + v * S;
    gather_incoming<T, kFixed>(p, current, v, marginal);
    for (int b = 0; b < S; ++b) marginal[b] = p.unary[v * S + b] + marginal[b];
    normalise<T, kFixed>(S, p.sum_product, marginal);
  }
  if (lane == 0) {
    p.iterations[g] = iteration;
    p.converged[g] = done;
  }
}

template <typename T, int kFixed>
void launch(const Problem<T>& p, cudaStream_t stream) {
  const int64_t blocks = (p.graphs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  loopy_bp_kernel<T, kFixed><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

BPResult loopy_bp_cuda(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& src,
                       const at::Tensor& dst, const at::Tensor& reverse,
                       const at::Tensor& node_graph, int64_t num_graphs, int64_t mode,
                       double damping, double tol, int64_t max_iters) {
  check_device_type(unary, "unary", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(unary.device());
  const BPInputs in = check_bp_inputs(unary, pairwise, src, dst, reverse, node_graph, num_graphs,
                                      mode, damping, tol, max_iters);
  const int64_t V = in.nodes;
  const int64_t E = in.edges;
  const int64_t S = in.states;
  const bool sum_product = mode == kSumProduct;

  at::Tensor marginals = at::empty({V, S}, in.unary.options());
  at::Tensor messages = at::empty({E, S}, in.unary.options());
  at::Tensor iterations = at::zeros({in.graphs}, in.src.options());
  at::Tensor converged = at::zeros({in.graphs}, in.src.options().dtype(at::kBool));
  if (in.graphs == 0) return {marginals, messages, iterations, converged};

  const BPLayout layout = make_bp_layout(in);
  at::Tensor spare = at::empty({E, S}, in.unary.options());
  at::Tensor incoming = at::empty({V, S}, in.unary.options());
  at::Tensor kernel = at::empty({sum_product ? E : 0, S, S}, in.unary.options());
  at::Tensor shift = at::empty({sum_product ? E : 0, S}, in.unary.options());
  at::Tensor scale = at::empty({sum_product ? E : 0, S}, in.unary.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.unary.scalar_type(), kLoopyBPName, [&] {
    using T = scalar_t;
    const Problem<T> p{static_cast<int>(S),
                       sum_product,
                       static_cast<T>(damping),
                       static_cast<T>(1.0 - damping),
                       static_cast<T>(tol),
                       sum_product ? -std::log(static_cast<T>(S)) : T(0),
                       max_iters,
                       in.graphs,
                       in.unary.const_data_ptr<T>(),
                       in.pairwise.const_data_ptr<T>(),
                       in.src.const_data_ptr<int64_t>(),
                       in.reverse.const_data_ptr<int64_t>(),
                       layout.node_ptr.const_data_ptr<int64_t>(),
                       layout.node_order.const_data_ptr<int64_t>(),
                       layout.edge_ptr.const_data_ptr<int64_t>(),
                       layout.edge_order.const_data_ptr<int64_t>(),
                       layout.in_ptr.const_data_ptr<int64_t>(),
                       layout.in_edges.const_data_ptr<int64_t>(),
                       messages.mutable_data_ptr<T>(),
                       spare.mutable_data_ptr<T>(),
                       incoming.mutable_data_ptr<T>(),
                       kernel.mutable_data_ptr<T>(),
                       shift.mutable_data_ptr<T>(),
                       scale.mutable_data_ptr<T>(),
                       marginals.mutable_data_ptr<T>(),
                       iterations.mutable_data_ptr<int64_t>(),
                       converged.mutable_data_ptr<bool>()};
    switch (S) {
      case 2:
        launch<T, 2>(p, stream);
        break;
      case 3:
        launch<T, 3>(p, stream);
        break;
      case 4:
        launch<T, 4>(p, stream);
        break;
      default:
        launch<T, 0>(p, stream);
    }
  });
  return {marginals, messages, iterations, converged};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) { m.impl("loopy_bp", &loopy_bp_cuda); }

}  // namespace deepkern::graph
