"""The segment reductions and fused gather-reduce of the graph family: hand-worked answers, the
plain-PyTorch references on random and edge-case shapes, gradients, determinism and bad input."""

import pytest
import torch

from deepkern.ops import graph
from tests.conftest import DEVICES

F64 = torch.float64
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-12, atol=1e-12)}
REDUCE_CODES = {name: code for code, name in enumerate(graph.REDUCTIONS)}


def _random_rowptr(segments: int, max_rows: int, generator, empty_fraction=0.3) -> torch.Tensor:
    counts = torch.randint(1, max_rows + 1, (segments,), generator=generator)
    counts[torch.rand(segments, generator=generator) < empty_fraction] = 0
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


# ---------------------------------------------------------------------------------------------
# Hand-worked answers


def test_segment_reduce_hand_worked():
    values = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0], [7.0, 0.5]])
    rowptr = torch.tensor([0, 2, 2, 4])
    want = {
        "sum": [[4.0, 2.0], [0.0, 0.0], [2.0, 6.5]],
        "mean": [[2.0, 1.0], [0.0, 0.0], [1.0, 3.25]],
        "max": [[3.0, 4.0], [0.0, 0.0], [7.0, 6.0]],
        "min": [[1.0, -2.0], [0.0, 0.0], [-5.0, 0.5]],
    }
    for reduce, expected in want.items():
        assert graph.segment_reduce(values, rowptr, reduce).tolist() == expected
    out, arg = torch.ops.deepkern.segment_reduce(values, rowptr, REDUCE_CODES["max"])
    assert arg.tolist() == [[1, 1], [-1, -1], [3, 2]]
    _, arg = torch.ops.deepkern.segment_reduce(values, rowptr, REDUCE_CODES["sum"])
    assert arg.numel() == 0 and arg.dtype == torch.int64


def test_gather_reduce_hand_worked():
    x = torch.tensor([[1.0], [10.0], [100.0]], dtype=F64)
    rowptr = torch.tensor([0, 2, 2, 5])
    col = torch.tensor([0, 2, 1, 1, 0])
    weight = torch.tensor([1.0, 0.5, 2.0, -1.0, 3.0], dtype=F64)
    # Row 0: 1 * 1 + 0.5 * 100; row 1: no edges; row 2: 2 * 10, -1 * 10, 3 * 1.
    assert graph.gather_reduce(x, rowptr, col, weight).flatten().tolist() == [51.0, 0.0, 13.0]
    assert graph.gather_reduce(x, rowptr, col, weight, "mean").flatten().tolist() == [
        25.5,
        0.0,
        13.0 / 3,
    ]
    out, arg = torch.ops.deepkern.gather_reduce(x, rowptr, col, weight, REDUCE_CODES["max"])
    assert out.flatten().tolist() == [50.0, 0.0, 20.0] and arg.flatten().tolist() == [1, -1, 2]
    out, arg = torch.ops.deepkern.gather_reduce(x, rowptr, col, None, REDUCE_CODES["min"])
    assert out.flatten().tolist() == [1.0, 0.0, 1.0] and arg.flatten().tolist() == [0, -1, 4]


def test_ties_go_to_the_first_row_and_get_the_whole_gradient():
    values = torch.tensor([[2.0], [5.0], [5.0], [1.0], [1.0], [3.0]], requires_grad=True)
    rowptr = torch.tensor([0, 3, 6])
    _, arg = torch.ops.deepkern.segment_reduce(values, rowptr, REDUCE_CODES["max"])
    assert arg.flatten().tolist() == [1, 5]
    _, arg = torch.ops.deepkern.segment_reduce(values, rowptr, REDUCE_CODES["min"])
    assert arg.flatten().tolist() == [0, 3]

    graph.segment_reduce(values, rowptr, "min").sum().backward()
    assert values.grad.flatten().tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    # In gather-reduce the tie is between edges: the first edge of the row wins.
    x = torch.tensor([[4.0], [4.0]], requires_grad=True)
    out, arg = torch.ops.deepkern.gather_reduce(
        x, torch.tensor([0, 3]), torch.tensor([1, 0, 1]), None, REDUCE_CODES["max"]
    )
    assert arg.item() == 0
    out.sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0]


def test_nan_propagates_through_max_and_min():
    values = torch.tensor([[1.0], [float("nan")], [3.0], [2.0]])
    rowptr = torch.tensor([0, 4])
    for reduce in ("max", "min"):
        out, arg = torch.ops.deepkern.segment_reduce(values, rowptr, REDUCE_CODES[reduce])
        assert torch.isnan(out).all() and arg.item() == 1


# ---------------------------------------------------------------------------------------------
# Against the references


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("features", [(), (5,), (2, 3)])
def test_segment_reduce_matches_reference(device, dtype, features):
    g = torch.Generator().manual_seed(1)
    rowptr = _random_rowptr(23, 6, g)
    values = torch.randn(int(rowptr[-1]), *features, generator=g, dtype=dtype)
    for reduce in graph.REDUCTIONS:
        want = graph.reference_segment_reduce(values, rowptr, reduce)
        got = graph.segment_reduce(values.to(device), rowptr.to(device), reduce)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_reduce_matches_reference(device, dtype, weighted):
    g = torch.Generator().manual_seed(2)
    rowptr = _random_rowptr(17, 5, g)
    edges = int(rowptr[-1])
    x = torch.randn(9, 4, generator=g, dtype=dtype)
    col = torch.randint(0, 9, (edges,), generator=g)
    weight = torch.randn(edges, generator=g, dtype=dtype) if weighted else None
    for reduce in graph.REDUCTIONS:
        want = graph.reference_gather_reduce(x, rowptr, col, weight, reduce)
        args = [t.to(device) if t is not None else None for t in (x, rowptr, col, weight)]
        got = graph.gather_reduce(*args, reduce=reduce)
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


def test_edge_case_shapes():
    for reduce in graph.REDUCTIONS:
        # No rows, no segments.
        out = graph.segment_reduce(torch.zeros(0, 3), torch.zeros(1, dtype=torch.int64), reduce)
        assert out.shape == (0, 3)
        # No rows, four empty segments.
        out = graph.segment_reduce(torch.zeros(0, 3), torch.zeros(5, dtype=torch.int64), reduce)
        assert out.shape == (4, 3) and not out.any()
        # One segment over everything, 1-D values.
        values = torch.randn(7, dtype=F64)
        out = graph.segment_reduce(values, torch.tensor([0, 7]), reduce)
        assert out.shape == (1,)
        torch.testing.assert_close(
            out, graph.reference_segment_reduce(values, torch.tensor([0, 7]), reduce)
        )
        # Rows without features.
        assert graph.segment_reduce(torch.zeros(4, 0), torch.tensor([0, 1, 4]), reduce).shape == (
            2,
            0,
        )
        # Gather-reduce without edges.
        out = graph.gather_reduce(
            torch.randn(3, 2), torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        )
        assert out.shape == (2, 2) and not out.any()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    rowptr = _random_rowptr(8, 4, g)
    rows = int(rowptr[-1])
    values = torch.randn(3, rows, generator=g, dtype=F64).t()  # [rows, 3], column-major
    assert not values.is_contiguous()
    wide_rowptr = torch.stack([rowptr, rowptr], 1)[:, 0]  # a strided view
    for reduce in graph.REDUCTIONS:
        torch.testing.assert_close(
            graph.segment_reduce(values, wide_rowptr, reduce),
            graph.reference_segment_reduce(values.contiguous(), rowptr, reduce),
        )
        col = torch.randint(0, rows, (2 * rows,), generator=g)[::2]
        torch.testing.assert_close(
            graph.gather_reduce(values, wide_rowptr, col, reduce=reduce),
            graph.reference_gather_reduce(
                values.contiguous(), rowptr, col.contiguous(), None, reduce
            ),
        )


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(4)
    rowptr = _random_rowptr(3000, 40, g, empty_fraction=0.05)
    values = torch.randn(int(rowptr[-1]), 16, generator=g)
    x = torch.randn(500, 16, generator=g)
    col = torch.randint(0, 500, (int(rowptr[-1]),), generator=g)
    weight = torch.randn(int(rowptr[-1]), generator=g)

    def run():
        results = []
        for reduce in graph.REDUCTIONS:
            v = values.clone().requires_grad_()
            xx, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
            out = graph.segment_reduce(v, rowptr, reduce)
            fused = graph.gather_reduce(xx, rowptr, col, w, reduce)
            (out.sin().sum() + fused.cos().sum()).backward()
            results += [out, fused, v.grad, xx.grad, w.grad]
        return results

    one = run()
    torch.set_num_threads(2)  # the fixture restores the count
    for a, b in zip(one, run()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("reduce", graph.REDUCTIONS)
def test_gradcheck(reduce):
    g = torch.Generator().manual_seed(5)
    rowptr = torch.tensor([0, 3, 3, 4, 8])
    values = torch.randn(8, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: graph.segment_reduce(v, rowptr, reduce), (values,))

    x = torch.randn(5, 2, generator=g, dtype=F64, requires_grad=True)
    col = torch.tensor([4, 0, 2, 2, 1, 0, 3, 4])
    weight = torch.randn(8, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: graph.gather_reduce(x, rowptr, col, w, reduce), (x, weight)
    )
    assert torch.autograd.gradcheck(
        lambda x: graph.gather_reduce(x, rowptr, col, None, reduce), (x,)
    )


@pytest.mark.parametrize("reduce", graph.REDUCTIONS)
def test_gradgradcheck(reduce):
    g = torch.Generator().manual_seed(9)
    rowptr = torch.tensor([0, 3, 3, 4, 8])
    values = torch.randn(8, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda v: graph.segment_reduce(v, rowptr, reduce), (values,)
    )
    x = torch.randn(5, 2, generator=g, dtype=F64, requires_grad=True)
    col = torch.tensor([4, 0, 2, 2, 1, 0, 3, 4])
    weight = torch.randn(8, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: graph.gather_reduce(x, rowptr, col, w, reduce), (x, weight)
    )
    assert torch.autograd.gradgradcheck(
        lambda x: graph.gather_reduce(x, rowptr, col, None, reduce), (x,)
    )


def test_double_backward_without_edges_or_rows():
    for reduce in graph.REDUCTIONS:
        x = torch.randn(3, 2, dtype=F64, requires_grad=True)
        weight = torch.zeros(0, dtype=F64, requires_grad=True)
        empty = torch.zeros(0, dtype=torch.int64)
        out = graph.gather_reduce(x, torch.zeros(3, dtype=torch.int64), empty, weight, reduce)
        (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert not grad_x.any()
        (second,) = torch.autograd.grad(grad_x.sum(), x, allow_unused=True)
        assert second is None or not second.any()

        values = torch.zeros(0, 2, dtype=F64, requires_grad=True)
        out = graph.segment_reduce(values, torch.zeros(4, dtype=torch.int64), reduce)
        (grad_values,) = torch.autograd.grad((out**2).sum(), values, create_graph=True)
        assert grad_values.shape == (0, 2)


@pytest.mark.parametrize("reduce", graph.REDUCTIONS)
def test_gradients_match_the_reference(reduce):
    g = torch.Generator().manual_seed(6)
    rowptr = _random_rowptr(30, 6, g)
    edges = int(rowptr[-1])
    x = torch.randn(12, 3, generator=g, dtype=F64, requires_grad=True)
    col = torch.randint(0, 12, (edges,), generator=g)
    weight = torch.randn(edges, generator=g, dtype=F64, requires_grad=True)
    upstream = torch.randn(30, 3, generator=g, dtype=F64)

    got = torch.autograd.grad(
        (graph.gather_reduce(x, rowptr, col, weight, reduce) * upstream).sum(), (x, weight)
    )
    want = torch.autograd.grad(
        (graph.reference_gather_reduce(x, rowptr, col, weight, reduce) * upstream).sum(),
        (x, weight),
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOLERANCE[F64])

    values = torch.randn(edges, 3, generator=g, dtype=F64, requires_grad=True)
    got = torch.autograd.grad(
        (graph.segment_reduce(values, rowptr, reduce) * upstream).sum(), values
    )
    want = torch.autograd.grad(
        (graph.reference_segment_reduce(values, rowptr, reduce) * upstream).sum(), values
    )
    torch.testing.assert_close(got[0], want[0], **TOLERANCE[F64])


def test_only_the_requested_gradients_are_computed():
    x = torch.randn(4, 2, dtype=F64, requires_grad=True)
    weight = torch.randn(5, dtype=F64)
    out = graph.gather_reduce(x, torch.tensor([0, 2, 5]), torch.tensor([0, 1, 2, 3, 3]), weight)
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(7)
    rowptr = torch.tensor([0, 2, 2, 5], device=device)
    values = torch.randn(5, 3, generator=g, dtype=F64).to(device).requires_grad_()
    x = torch.randn(4, 3, generator=g, dtype=F64).to(device).requires_grad_()
    col = torch.tensor([3, 0, 1, 1, 2], device=device)
    weight = torch.randn(5, generator=g, dtype=F64).to(device).requires_grad_()
    # opcheck traces every op several times (a few seconds each here): two codes per op.
    for code in (REDUCE_CODES["mean"], REDUCE_CODES["max"]):
        torch.library.opcheck(torch.ops.deepkern.segment_reduce, (values, rowptr, code))
        _, arg = torch.ops.deepkern.segment_reduce(values, rowptr, code)
        grad = torch.randn(3, 3, dtype=F64, device=device)
        torch.library.opcheck(
            torch.ops.deepkern.segment_reduce_backward, (grad, rowptr, arg, code, 5)
        )
    for code, w in ((REDUCE_CODES["sum"], weight), (REDUCE_CODES["min"], None)):
        torch.library.opcheck(torch.ops.deepkern.gather_reduce, (x, rowptr, col, w, code))
    _, arg = torch.ops.deepkern.gather_reduce(x, rowptr, col, weight, REDUCE_CODES["max"])
    torch.library.opcheck(
        torch.ops.deepkern.gather_reduce_backward,
        (grad, x.detach(), rowptr, col, weight.detach(), arg, REDUCE_CODES["max"], True, True),
    )


def test_compiles_without_graph_breaks():
    rowptr = torch.tensor([0, 2, 2, 5])
    values = torch.randn(5, 3, dtype=F64)
    col = torch.tensor([3, 0, 1, 1, 2])

    @torch.compile(fullgraph=True, backend="eager")
    def layer(values, x):
        return graph.segment_reduce(values, rowptr, "max") + graph.gather_reduce(x, rowptr, col)

    x = torch.randn(4, 3, dtype=F64)
    want = graph.reference_segment_reduce(values, rowptr, "max") + graph.reference_gather_reduce(
        x, rowptr, col
    )
    torch.testing.assert_close(layer(values, x), want)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_reduce():
    values, rowptr = torch.randn(3, 2), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="reduce must be one of"):
        graph.segment_reduce(values, rowptr, "prod")
    with pytest.raises(RuntimeError, match="reduce must be 0 \\(sum\\)"):
        torch.ops.deepkern.segment_reduce(values, rowptr, 7)
    with pytest.raises(RuntimeError, match="reduce must be 0 \\(sum\\)"):
        torch.ops.deepkern.gather_reduce(values, rowptr, torch.tensor([0, 1, 2]), None, -1)


@pytest.mark.parametrize(
    "rowptr, message",
    [
        ([0, 3, 2, 4], "rowptr must be nondecreasing, got rowptr\\[1\\] = 3 > rowptr\\[2\\] = 2"),
        ([1, 2, 4], "rowptr must start at 0, got rowptr\\[0\\] = 1"),
        ([0, 2, 3], "rowptr must end at 4 \\(.*\\), got rowptr\\[-1\\] = 3"),
        ([0, 2, 5], "rowptr must end at 4"),
        ([], "rowptr must hold N \\+ 1 >= 1 row pointers"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_row_pointers(rowptr, message, device):
    values = torch.randn(4, 2, device=device)
    rowptr = torch.tensor(rowptr, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match=message):
        graph.segment_reduce(values, rowptr)
    with pytest.raises(RuntimeError, match=message):
        graph.gather_reduce(values, rowptr, torch.zeros(4, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_column_indices_out_of_range(device):
    x = torch.randn(3, 2, device=device)
    rowptr = torch.tensor([0, 2, 4], device=device)
    for bad in (3, -1):
        col = torch.tensor([0, 1, bad, 2], device=device)
        with pytest.raises(RuntimeError, match=f"col must hold indices in \\[0, 3\\).*= {bad}"):
            graph.gather_reduce(x, rowptr, col)


def test_wrong_dtypes_and_shapes():
    values, rowptr = torch.randn(4, 2), torch.tensor([0, 1, 4])
    col = torch.tensor([0, 1, 1, 3])
    with pytest.raises(RuntimeError, match="rowptr must have dtype Long, got Int"):
        graph.segment_reduce(values, rowptr.int())
    with pytest.raises(RuntimeError, match="rowptr must be 1-D, got 2 dimensions"):
        graph.segment_reduce(values, rowptr[None])
    with pytest.raises(RuntimeError, match="values must be float32 or float64"):
        graph.segment_reduce(values.long(), rowptr)
    with pytest.raises(RuntimeError, match="values must be float32 or float64.*Half"):
        graph.segment_reduce(values.half(), rowptr)
    with pytest.raises(RuntimeError, match="values must have at least one dimension"):
        graph.segment_reduce(torch.tensor(1.0), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="col must have dtype Long"):
        graph.gather_reduce(values, rowptr, col.int())
    with pytest.raises(RuntimeError, match="weight must have the shape of col"):
        graph.gather_reduce(values, rowptr, col, torch.ones(3))
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        graph.gather_reduce(values, rowptr, col, torch.ones(4, dtype=F64))
    with pytest.raises(RuntimeError, match="rowptr must end at 3 \\(the number of edges"):
        graph.gather_reduce(values, rowptr, col[:3])


def test_bad_backward_arguments():
    grad, rowptr = torch.randn(2, 3), torch.tensor([0, 1, 4])
    arg = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="grad_out must have one row per segment \\(2\\)"):
        torch.ops.deepkern.segment_reduce_backward(grad[:1], rowptr, arg, 0, 4)
    with pytest.raises(RuntimeError, match="arg must have the shape of grad_out"):
        torch.ops.deepkern.segment_reduce_backward(grad, rowptr, arg[:, :2], 2, 4)
    with pytest.raises(RuntimeError, match="rowptr must end at 5"):
        torch.ops.deepkern.segment_reduce_backward(grad, rowptr, arg, 2, 5)
    x, col = torch.randn(3, 2), torch.tensor([0, 1, 2, 2])
    with pytest.raises(RuntimeError, match="grad_out must have rows shaped like the rows of x"):
        torch.ops.deepkern.gather_reduce_backward(grad, x, rowptr, col, None, arg, 2, True, False)


@pytest.mark.cuda
def test_cuda_device_mismatch_and_half_precision():
    values = torch.randn(5, 4, device="cuda")
    rowptr = torch.tensor([0, 2, 5])
    with pytest.raises(RuntimeError, match="rowptr must be on the device of values"):
        graph.segment_reduce(values, rowptr)
    rowptr = rowptr.cuda()
    for dtype in (torch.float16, torch.bfloat16):
        for reduce in graph.REDUCTIONS:
            got = graph.segment_reduce(values.to(dtype), rowptr, reduce)
            want = graph.reference_segment_reduce(values.to(dtype).double(), rowptr, reduce)
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("reduce", graph.REDUCTIONS)
def test_cuda_gradients_equal_the_cpu_ones(reduce):
    g = torch.Generator().manual_seed(8)
    rowptr = _random_rowptr(200, 12, g)
    edges = int(rowptr[-1])
    x = torch.randn(50, 33, generator=g, dtype=F64)
    col = torch.randint(0, 50, (edges,), generator=g)
    weight = torch.randn(edges, generator=g, dtype=F64)
    upstream = torch.randn(200, 33, generator=g, dtype=F64)
    results = []
    for device in ("cpu", "cuda"):
        xx = x.to(device).requires_grad_()
        w = weight.to(device).requires_grad_()
        values = x[col].to(device).requires_grad_()
        fused = graph.gather_reduce(xx, rowptr.to(device), col.to(device), w, reduce)
        out = graph.segment_reduce(values, rowptr.to(device), reduce)
        ((fused + out) * upstream.to(device)).sum().backward()
        results.append([t.cpu() for t in (fused, out, xx.grad, w.grad, values.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
