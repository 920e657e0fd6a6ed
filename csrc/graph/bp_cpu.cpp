// CPU loopy belief propagation. Graphs are independent: at::parallel_for hands whole graphs to
// threads, and each graph iterates to its own convergence with no synchronisation between
// graphs, so results do not depend on the thread count. Within a graph, each iteration first
// sums the messages into every node (through the CSR of incoming edges), then updates every
// message from its source's cavity. Sum-product takes its exponentials and logarithms from
// bp_cpu_math.h, a chunk of edges at a time, so that they vectorise; max-product needs none.
// Two-state sum-product, the common case, has a path of its own (run_binary_graph) that
// carries one difference per node and edge through loops over contiguous arrays.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <utility>

#include "common/checks.h"
#include "graph/bp.h"
#include "graph/bp_cpu_math.h"
#include "graph/bp_ops.h"

namespace deepkern::graph {
namespace {

constexpr char kLoopyBPName[] = "loopy_bp";

// Sum-product updates go in chunks of edges whose states fill this many values: two stack
// arrays of 256 doubles stay in L1, and each exponential and logarithm loop over them is long
// enough to vectorise.
constexpr int kChunkValues = 256;

// Sixteen graphs per task at least: a small graph costs a few microseconds per iteration.
constexpr int64_t kGraphGrain = 16;

// The array loops of exponentials and logarithms, compiled for AVX2 as well as the baseline on
// x86-64 with GCC or Clang and picked when the program loads. Without contraction both copies
// round alike, so results do not depend on the processor.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEEPKERN_BP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DEEPKERN_BP_CLONES
#endif

DEEPKERN_BP_CLONES void exp_array(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = vector_exp(in[i]);
}
DEEPKERN_BP_CLONES void exp_array(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = vector_exp(in[i]);
}
DEEPKERN_BP_CLONES void log_array(float* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) values[i] = vector_log(values[i]);
}
DEEPKERN_BP_CLONES void log_array(double* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) values[i] = vector_log(values[i]);
}

// One chunk of two-state sum-product updates, over arrays by edge position: the cavity
// differences in, the normalised (and damped) messages out, and per edge whether the fast
// formula held (binary_sum_message). Untrusted edges count no change here; the caller redoes
// them.
template <typename T>
struct BinaryChunk {
  const T* cavity;
  const T* weights;  // row 2 a + b of [4, stride]
  int64_t stride;
  const T* old_first;
  const T* old_second;
  T* first;
  T* second;
  T* difference;
  // Flags as wide as T: a byte array would make the vectoriser take 32 edges per step with
  // AVX2, and leave a graph of fewer edges to the scalar loop.
  typename MathBits<T>::Int* trusted;
  T damping;
  T undamped;
};

// The largest change of the chunk's trusted messages, NaN if any is NaN, and how many messages
// were not trusted.
template <typename T>
struct BinaryChunkResult {
  T change;
  int64_t untrusted;
};

// Absolute values order like their bit patterns read as integers, with NaN above infinity, so that
// an integer maximum (which vectorises, unlike a NaN-aware floating one) finds the largest change
// and keeps a NaN.
template <typename T, bool kDamped>
C10_ALWAYS_INLINE BinaryChunkResult<T> binary_sum_loop(
    int64_t n, const T* __restrict cavity, const T* __restrict w00, const T* __restrict w01,
    const T* __restrict w10, const T* __restrict w11, const T* __restrict old_first,
    const T* __restrict old_second, T* __restrict first, T* __restrict second,
    T* __restrict difference, typename MathBits<T>::Int* __restrict trusted, T damping,
    T undamped) {
  using Int = typename MathBits<T>::Int;
  constexpr Int kMagnitude = std::numeric_limits<Int>::max();  // all bits but the sign
  const auto exp_fn = [](T x) { return vector_exp(x); };
  const auto log_fn = [](T x) { return vector_log(x); };
  Int change = 0;
  Int untrusted = 0;
  for (int64_t j = 0; j < n; ++j) {
    BinaryMessage<T> m =
        binary_sum_message(cavity[j], w00[j], w01[j], w10[j], w11[j], exp_fn, log_fn);
    if constexpr (kDamped) {
      damp_binary(damping, undamped, old_first[j], old_second[j], m.first, m.second, exp_fn,
                  log_fn);
    }
    first[j] = m.first;
    second[j] = m.second;
    difference[j] = m.first - m.second;
    trusted[j] = m.trusted;
    const Int a0 = std::bit_cast<Int>(T(m.first - old_first[j])) & kMagnitude;
    const Int a1 = std::bit_cast<Int>(T(m.second - old_second[j])) & kMagnitude;
    const Int lane = m.trusted ? (a0 < a1 ? a1 : a0) : Int(0);
    change = lane > change ? lane : change;
    untrusted += m.trusted ? Int(0) : Int(1);
  }
  return {std::bit_cast<T>(change), static_cast<int64_t>(untrusted)};
}

template <typename T, bool kDamped>
C10_ALWAYS_INLINE BinaryChunkResult<T> binary_sum_loop(const BinaryChunk<T>& c, int64_t n) {
  const T* w = c.weights;
  return binary_sum_loop<T, kDamped>(n, c.cavity, w, w + c.stride, w + 2 * c.stride,
                                     w + 3 * c.stride, c.old_first, c.old_second, c.first, c.second,
                                     c.difference, c.trusted, c.damping, c.undamped);
}

DEEPKERN_BP_CLONES BinaryChunkResult<float> binary_sum_chunk(const BinaryChunk<float>& c,
                                                             int64_t n) {
  return c.damping != 0.0f ? binary_sum_loop<float, true>(c, n)
                           : binary_sum_loop<float, false>(c, n);
}
DEEPKERN_BP_CLONES BinaryChunkResult<double> binary_sum_chunk(const BinaryChunk<double>& c,
                                                              int64_t n) {
  return c.damping != 0.0 ? binary_sum_loop<double, true>(c, n)
                          : binary_sum_loop<double, false>(c, n);
}

template <typename T>
struct Problem {
  int states;
  bool sum_product;
  T damping;   // weight of the previous message
  T undamped;  // 1 - damping, the weight of the update
  T tol;
  T start;  // the uniform normalised message
  int64_t max_iters;
  int64_t edges;
  const T* unary;
  const T* pairwise;
  const int64_t* src;
  const int64_t* dst;
  const int64_t* reverse;
  const int64_t* node_ptr;
  const int64_t* node_order;
  const int64_t* edge_ptr;
  const int64_t* edge_order;
  const int64_t* in_ptr;
  const int64_t* in_edges;
  T* messages;  // [E, S], the result
  T* spare;     // [E, S], the other buffer of the flooding schedule
  T* incoming;  // [V, S]
  // Sum-product constants, at each edge's position in edge_order, so that a graph's constants
  // are contiguous.
  T* kernel;     // [E, S, S]
  T* shift;      // [E, S]
  T* scale;      // [E, S]
  T* marginals;  // [V, S]
  int64_t* iterations;
  bool* converged;
  // Two-state sum-product only (see run_binary_graph): positions in node_order and edge_order,
  // the edges' neighbourhoods as positions, weights and messages by position.
  int64_t* node_position;  // [V] by node
  int64_t* edge_position;  // [E] by edge
  int64_t* source_at;      // [E] by edge position: the source's node position
  int64_t* reverse_at;     // [E] by edge position: the reverse edge's position
  int64_t* target_at;      // [E] by edge position: the destination's node position
  T* weights;              // [4, E]: W(a, b) = exp(P(a, b) - max P), row 2 a + b
  T* binary_messages;      // [2, 3, E]: two buffers of first, second, first - second
  T* unary_gap;            // [V] by node position: unary(0) - unary(1)
  T* belief;               // [V] by node position: unary and incoming differences
};

// Sum of the messages into node v, read from the buffer `from`.
template <typename T, int kFixed>
inline void gather_incoming(const Problem<T>& p, const T* from, int64_t v, T* out) {
  const int S = state_count<kFixed>(p.states);
  for (int b = 0; b < S; ++b) out[b] = T(0);
  for (int64_t k = p.in_ptr[v]; k < p.in_ptr[v + 1]; ++k) {
    const T* m = from + p.in_edges[k] * S;
    for (int b = 0; b < S; ++b) out[b] += m[b];
  }
}

// The cavity of edge e's source with respect to e: c(a) = unary + all incoming - m[reverse e].
template <typename T, int kFixed>
inline void cavity_of(const Problem<T>& p, const T* current, int64_t e, T* c) {
  const int S = state_count<kFixed>(p.states);
  const int64_t u = p.src[e];
  const T* back = current + p.reverse[e] * S;
  for (int a = 0; a < S; ++a) c[a] = p.unary[u * S + a] + p.incoming[u * S + a] - back[a];
}

// sum_product_message for `count` edges at once, with the exponentials and logarithms of the
// whole chunk in two vectorised loops. Returns the largest change of the chunk's messages.
template <typename T, int kFixed>
T sum_product_chunk(const Problem<T>& p, const T* current, T* next, int64_t position, int count) {
  const int64_t* edges = p.edge_order + position;
  const int S = state_count<kFixed>(p.states);
  alignas(64) T values[kChunkValues];
  alignas(64) T ratios[kChunkValues];
  bool trusted[kChunkValues];

  for (int j = 0; j < count; ++j) {
    T* c = values + j * S;
    cavity_of<T, kFixed>(p, current, edges[j], c);
    T top = c[0];
    for (int a = 1; a < S; ++a) top = bp_max(top, c[a]);
    for (int a = 0; a < S; ++a) c[a] -= top;
  }
  const int n = count * S;
  exp_array(values, values, n);

  // u(b) = sum_a w(a) kernel(a, b), divided by sum_b u(b) scale(b) where it can be trusted.
  for (int j = 0; j < count; ++j) {
    const T* kernel = p.kernel + (position + j) * S * S;
    const T* scale = p.scale + (position + j) * S;
    T* u = ratios + j * S;
    for (int b = 0; b < S; ++b) u[b] = T(0);
    for (int a = 0; a < S; ++a) {
      const T w = values[j * S + a];
      for (int b = 0; b < S; ++b) u[b] += w * kernel[a * S + b];
    }
    T total = T(0);
    T smallest = u[0];
    for (int b = 0; b < S; ++b) {
      total += u[b] * scale[b];
      smallest = smallest < u[b] ? smallest : u[b];
    }
    trusted[j] = smallest >= trusted_sum<T>();
    const T inverse = T(1) / total;
    for (int b = 0; b < S; ++b) u[b] = trusted[j] ? u[b] * inverse : T(1);
  }
  log_array(ratios, n);

  T change = T(0);
  for (int j = 0; j < count; ++j) {
    const int64_t e = edges[j];
    T* out = next + e * S;
    if (trusted[j]) {
      for (int b = 0; b < S; ++b) out[b] = ratios[j * S + b] + p.shift[(position + j) * S + b];
    } else {
      T c[kFixed > 0 ? kFixed : kMaxStates];
      cavity_of<T, kFixed>(p, current, e, c);
      const int64_t k = position + j;
      sum_product_message<T, kFixed>(S, c, p.pairwise + e * S * S, p.kernel + k * S * S,
                                     p.shift + k * S, p.scale + k * S, out);
    }
    change = worse_change(
        change, finish_message<T, kFixed>(S, true, p.damping, p.undamped, current + e * S, out));
  }
  return change;
}

// One sum-product sweep over the edges edge_order[first, last) of a graph.
template <typename T, int kFixed>
T sum_product_sweep(const Problem<T>& p, int64_t first, int64_t last, const T* current, T* next) {
  const int capacity = kChunkValues / state_count<kFixed>(p.states);
  T change = T(0);
  for (int64_t k = first; k < last; k += capacity) {
    const int count = static_cast<int>(std::min<int64_t>(capacity, last - k));
    change = worse_change(change, sum_product_chunk<T, kFixed>(p, current, next, k, count));
  }
  return change;
}

// One max-product sweep, edge by edge.
template <typename T, int kFixed>
T max_product_sweep(const Problem<T>& p, int64_t first, int64_t last, const T* current, T* next) {
  const int S = state_count<kFixed>(p.states);
  T cavity[kFixed > 0 ? kFixed : kMaxStates];
  T change = T(0);
  for (int64_t k = first; k < last; ++k) {
    const int64_t e = p.edge_order[k];
    cavity_of<T, kFixed>(p, current, e, cavity);
    T* out = next + e * S;
    max_product_message<T, kFixed>(S, cavity, p.pairwise + e * S * S, out);
    change = worse_change(
        change, finish_message<T, kFixed>(S, false, p.damping, p.undamped, current + e * S, out));
  }
  return change;
}

// Sum-product constants of the edges edge_order[first, last) (see prepare_sum_edge), with the
// exponentials of the whole graph in two vectorised loops.
template <typename T, int kFixed>
void prepare_sum_edges(const Problem<T>& p, int64_t first, int64_t last) {
  const int S = state_count<kFixed>(p.states);
  for (int64_t k = first; k < last; ++k) {
    const T* pair = p.pairwise + p.edge_order[k] * S * S;
    T col[kFixed > 0 ? kFixed : kMaxStates];
    for (int b = 0; b < S; ++b) col[b] = pair[b];
    for (int a = 1; a < S; ++a) {
      for (int b = 0; b < S; ++b) col[b] = bp_max(col[b], pair[a * S + b]);
    }
    T top = col[0];
    for (int b = 1; b < S; ++b) top = bp_max(top, col[b]);
    T* kernel = p.kernel + k * S * S;
    for (int a = 0; a < S; ++a) {
      for (int b = 0; b < S; ++b) kernel[a * S + b] = pair[a * S + b] - col[b];
    }
    for (int b = 0; b < S; ++b) p.shift[k * S + b] = col[b] - top;
  }
  exp_array(p.kernel + first * S * S, p.kernel + first * S * S, (last - first) * S * S);
  exp_array(p.shift + first * S, p.scale + first * S, (last - first) * S);
}

// Marginals of graph g from its final messages, and its iteration count and flag.
template <typename T, int kFixed>
void finish_graph(const Problem<T>& p, int64_t g, int64_t iteration, bool done) {
  const int S = state_count<kFixed>(p.states);
  for (int64_t i = p.node_ptr[g]; i < p.node_ptr[g + 1]; ++i) {
    const int64_t v = p.node_order[i];
    T* marginal = p.marginals + v * S;
    gather_incoming<T, kFixed>(p, p.messages, v, marginal);
    for (int b = 0; b < S; ++b) marginal[b] = p.unary[v * S + b] + marginal[b];
    normalise<T, kFixed>(S, p.sum_product, marginal);
  }
  p.iterations[g] = iteration;
  p.converged[g] = done;
}

template <typename T, int kFixed>
void run_graph(const Problem<T>& p, int64_t g) {
  const int S = state_count<kFixed>(p.states);
  const int64_t first = p.node_ptr[g];
  const int64_t last = p.node_ptr[g + 1];

  const int64_t first_edge = p.edge_ptr[g];
  const int64_t last_edge = p.edge_ptr[g + 1];

  // Uniform start, and the sum-product constants of each edge.
  for (int64_t k = first_edge; k < last_edge; ++k) {
    const int64_t e = p.edge_order[k];
    for (int b = 0; b < S; ++b) p.messages[e * S + b] = p.start;
  }
  if (p.sum_product) prepare_sum_edges<T, kFixed>(p, first_edge, last_edge);

  T* current = p.messages;
  T* next = p.spare;
  int64_t iteration = 0;
  bool done = false;
  while (iteration < p.max_iters) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t v = p.node_order[i];
      gather_incoming<T, kFixed>(p, current, v, p.incoming + v * S);
    }

    const T change = p.sum_product
                         ? sum_product_sweep<T, kFixed>(p, first_edge, last_edge, current, next)
                         : max_product_sweep<T, kFixed>(p, first_edge, last_edge, current, next);
    ++iteration;
    std::swap(current, next);
    if (change <= p.tol) {
      done = true;
      break;
    }
  }

  // The last messages may sit in the spare buffer.
  if (current != p.messages) {
    for (int64_t k = first_edge; k < last_edge; ++k) {
      const int64_t e = p.edge_order[k];
      std::copy(current + e * S, current + (e + 1) * S, p.messages + e * S);
    }
  }
  finish_graph<T, kFixed>(p, g, iteration, done);
}

// Two-state sum-product, in positions: a graph's nodes and edges are numbered by their place
// in node_order and edge_order, so that its weights and messages lie in contiguous rows and the
// update loop over them vectorises; only the neighbours are gathered. Each node keeps one
// number, the difference of unary and incoming messages between its states, and each edge the
// difference of its cavity (binary_sum_message).
template <typename T>
void run_binary_graph(const Problem<T>& p, int64_t g) {
  const int64_t first = p.node_ptr[g];
  const int64_t last = p.node_ptr[g + 1];
  const int64_t first_edge = p.edge_ptr[g];
  const int64_t last_edge = p.edge_ptr[g + 1];
  const int64_t E = p.edges;

  // The neighbourhoods in positions. Positions of one graph never leave it, so threads working
  // on different graphs write disjoint entries.
  for (int64_t i = first; i < last; ++i) p.node_position[p.node_order[i]] = i;
  for (int64_t k = first_edge; k < last_edge; ++k) p.edge_position[p.edge_order[k]] = k;
  for (int64_t k = first_edge; k < last_edge; ++k) {
    const int64_t e = p.edge_order[k];
    p.source_at[k] = p.node_position[p.src[e]];
    p.reverse_at[k] = p.edge_position[p.reverse[e]];
  }
  // The destination of an edge is the source of its reverse.
  for (int64_t k = first_edge; k < last_edge; ++k) p.target_at[k] = p.source_at[p.reverse_at[k]];
  for (int64_t i = first; i < last; ++i) {
    const int64_t v = p.node_order[i];
    p.unary_gap[i] = p.unary[2 * v] - p.unary[2 * v + 1];
  }

  // Weights W(a, b) = exp(P(a, b) - max P), row 2 a + b.
  for (int64_t k = first_edge; k < last_edge; ++k) {
    const T* pair = p.pairwise + p.edge_order[k] * 4;
    const T top = bp_max(bp_max(pair[0], pair[1]), bp_max(pair[2], pair[3]));
    for (int r = 0; r < 4; ++r) p.weights[r * E + k] = pair[r] - top;
  }
  for (int r = 0; r < 4; ++r) {
    T* row = p.weights + r * E + first_edge;
    exp_array(row, row, last_edge - first_edge);
  }

  // Uniform start: log 1/2 for both states.
  T* current = p.binary_messages;
  T* next = p.binary_messages + 3 * E;
  for (int64_t k = first_edge; k < last_edge; ++k) {
    current[k] = p.start;
    current[E + k] = p.start;
    current[2 * E + k] = T(0);
  }

  int64_t iteration = 0;
  bool done = false;
  while (iteration < p.max_iters) {
    // Sum the incoming differences edge by edge. Edge positions and the incoming edges of a
    // node both run in the order of the edge ids, so the terms add up in the order of the
    // generic path.
    const T* difference = current + 2 * E;
    std::copy(p.unary_gap + first, p.unary_gap + last, p.belief + first);
    for (int64_t k = first_edge; k < last_edge; ++k) p.belief[p.target_at[k]] += difference[k];

    T change = T(0);
    for (int64_t k = first_edge; k < last_edge; k += kChunkValues) {
      const int count = static_cast<int>(std::min<int64_t>(kChunkValues, last_edge - k));
      alignas(64) T cavity[kChunkValues];
      typename MathBits<T>::Int trusted[kChunkValues];
      for (int j = 0; j < count; ++j) {
        cavity[j] = p.belief[p.source_at[k + j]] - difference[p.reverse_at[k + j]];
      }
      const BinaryChunk<T> chunk{
          cavity,       p.weights + k,    E,       current + k, current + E + k, next + k,
          next + E + k, next + 2 * E + k, trusted, p.damping,   p.undamped};
      const BinaryChunkResult<T> result = binary_sum_chunk(chunk, count);
      change = worse_change(change, result.change);

      // Extreme potentials: the generic message, from the cavity (d, 0).
      for (int j = 0; j < count && result.untrusted > 0; ++j) {
        if (trusted[j]) continue;
        const T* pair = p.pairwise + p.edge_order[k + j] * 4;
        const T c[2] = {cavity[j], T(0)};
        T kernel[4], shift[2], scale[2], out[2];
        const T old[2] = {current[k + j], current[E + k + j]};
        prepare_sum_edge<T, 2>(2, pair, kernel, shift, scale);
        sum_product_message<T, 2>(2, c, pair, kernel, shift, scale, out);
        change =
            worse_change(change, finish_message<T, 2>(2, true, p.damping, p.undamped, old, out));
        next[k + j] = out[0];
        next[E + k + j] = out[1];
        next[2 * E + k + j] = out[0] - out[1];
      }
    }
    ++iteration;
    std::swap(current, next);
    if (change <= p.tol) {
      done = true;
      break;
    }
  }

  // Messages back in edge order, and the marginals: the incoming messages summed edge by edge
  // (in the order of gather_incoming) plus the unary, normalised.
  for (int64_t i = first; i < last; ++i) {
    const int64_t v = p.node_order[i];
    p.marginals[2 * v] = T(0);
    p.marginals[2 * v + 1] = T(0);
  }
  for (int64_t k = first_edge; k < last_edge; ++k) {
    const int64_t e = p.edge_order[k];
    const int64_t v = p.dst[e];
    p.messages[2 * e] = current[k];
    p.messages[2 * e + 1] = current[E + k];
    p.marginals[2 * v] += current[k];
    p.marginals[2 * v + 1] += current[E + k];
  }
  for (int64_t i = first; i < last; ++i) {
    const int64_t v = p.node_order[i];
    T* marginal = p.marginals + 2 * v;
    for (int b = 0; b < 2; ++b) marginal[b] = p.unary[2 * v + b] + marginal[b];
    normalise<T, 2>(2, true, marginal);
  }
  p.iterations[g] = iteration;
  p.converged[g] = done;
}

template <typename T, int kFixed>
void run_graphs(const Problem<T>& p, int64_t graphs) {
  at::parallel_for(0, graphs, kGraphGrain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (kFixed == 2 && p.sum_product) {
        run_binary_graph<T>(p, g);
      } else {
        run_graph<T, kFixed>(p, g);
      }
    }
  });
}

BPResult loopy_bp_cpu(const at::Tensor& unary, const at::Tensor& pairwise, const at::Tensor& src,
                      const at::Tensor& dst, const at::Tensor& reverse,
                      const at::Tensor& node_graph, int64_t num_graphs, int64_t mode,
                      double damping, double tol, int64_t max_iters) {
  check_device_type(unary, "unary", c10::DeviceType::CPU);
  const BPInputs in = check_bp_inputs(unary, pairwise, src, dst, reverse, node_graph, num_graphs,
                                      mode, damping, tol, max_iters);
  const int64_t V = in.nodes;
  const int64_t E = in.edges;
  const int64_t S = in.states;
  const bool sum_product = mode == kSumProduct;
  const bool binary = sum_product && S == 2;
  // The two-state path sums incoming messages edge by edge: no incoming-edge lists.
  const BPLayout layout = make_bp_layout(in, /*incoming=*/!binary);

  at::Tensor marginals = at::empty({V, S}, in.unary.options());
  at::Tensor messages = at::empty({E, S}, in.unary.options());
  at::Tensor iterations = at::zeros({in.graphs}, in.src.options());
  at::Tensor converged = at::zeros({in.graphs}, in.src.options().dtype(at::kBool));
  at::Tensor spare = at::empty({E, S}, in.unary.options());
  at::Tensor incoming = at::empty({V, S}, in.unary.options());
  // Sum-product constants: the generic path's per edge, or the two-state path's positions,
  // weights and difference messages (run_binary_graph).
  const bool generic_sum = sum_product && !binary;
  at::Tensor kernel = at::empty({generic_sum ? E : 0, S, S}, in.unary.options());
  at::Tensor shift = at::empty({generic_sum ? E : 0, S}, in.unary.options());
  at::Tensor scale = at::empty({generic_sum ? E : 0, S}, in.unary.options());
  at::Tensor positions = at::empty({binary ? V + 4 * E : 0}, in.src.options());
  at::Tensor binary_values = at::empty({binary ? 2 * V + 10 * E : 0}, in.unary.options());
  if (in.graphs == 0) return {marginals, messages, iterations, converged};

  AT_DISPATCH_FLOATING_TYPES(in.unary.scalar_type(), kLoopyBPName, [&] {
    using T = scalar_t;
    // Offsets into the two-state arrays, null when the call does not use them.
    int64_t* const position_data = binary ? positions.mutable_data_ptr<int64_t>() : nullptr;
    T* const binary_data = binary ? binary_values.mutable_data_ptr<T>() : nullptr;
    const auto position_row = [&](int64_t offset) {
      return binary ? position_data + offset : nullptr;
    };
    const auto binary_row = [&](int64_t offset) { return binary ? binary_data + offset : nullptr; };
    const Problem<T> p{static_cast<int>(S),
                       sum_product,
                       static_cast<T>(damping),
                       static_cast<T>(1.0 - damping),
                       static_cast<T>(tol),
                       sum_product ? -std::log(static_cast<T>(S)) : T(0),
                       max_iters,
                       E,
                       in.unary.const_data_ptr<T>(),
                       in.pairwise.const_data_ptr<T>(),
                       in.src.const_data_ptr<int64_t>(),
                       in.dst.const_data_ptr<int64_t>(),
                       in.reverse.const_data_ptr<int64_t>(),
                       layout.node_ptr.const_data_ptr<int64_t>(),
                       layout.node_order.const_data_ptr<int64_t>(),
                       layout.edge_ptr.const_data_ptr<int64_t>(),
                       layout.edge_order.const_data_ptr<int64_t>(),
                       binary ? nullptr : layout.in_ptr.const_data_ptr<int64_t>(),
                       binary ? nullptr : layout.in_edges.const_data_ptr<int64_t>(),
                       messages.mutable_data_ptr<T>(),
                       spare.mutable_data_ptr<T>(),
                       incoming.mutable_data_ptr<T>(),
                       kernel.mutable_data_ptr<T>(),
                       shift.mutable_data_ptr<T>(),
                       scale.mutable_data_ptr<T>(),
                       marginals.mutable_data_ptr<T>(),
                       iterations.mutable_data_ptr<int64_t>(),
                       converged.mutable_data_ptr<bool>(),
                       position_row(0),
                       position_row(V),
                       position_row(V + E),
                       position_row(V + 2 * E),
                       position_row(V + 3 * E),
                       binary_row(0),
                       binary_row(4 * E),
                       binary_row(10 * E),
                       binary_row(10 * E + V)};
    switch (S) {
      case 2:
        run_graphs<T, 2>(p, in.graphs);
        break;
      case 3:
        run_graphs<T, 3>(p, in.graphs);
        break;
      case 4:
        run_graphs<T, 4>(p, in.graphs);
        break;
      default:
        run_graphs<T, 0>(p, in.graphs);
    }
  });
  return {marginals, messages, iterations, converged};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepkern, CPU, m) { m.impl("loopy_bp", &loopy_bp_cpu); }

}  // namespace deepkern::graph
