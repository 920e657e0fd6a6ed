"""GHN-2: the level-synchronous sweep against the node-by-node reference (values and
gradients), shapes and normalisation of predicted parameters, functional calls, bad input."""

import math

import pytest
import torch
from torch import nn

from deepkern.data.compgraph import NODE_TYPES, ComputationalGraph
from deepkern.models import ghn

T = {name: i for i, name in enumerate(NODE_TYPES)}


def _levels_and_virtual(n, real_edges, max_path=50):
    """Longest-path levels and the virtual edges (shortest real path 2 .. max_path)."""
    successors = [[] for _ in range(n)]
    for s, t in real_edges:
        successors[s].append(t)
    levels = [0] * n
    for s in range(n):  # node indices are a topological order
        for t in successors[s]:
            levels[t] = max(levels[t], levels[s] + 1)
    virtual = []
    for s in range(n):
        dist, frontier = {s: 0}, [s]
        while frontier:
            nxt = []
            for u in frontier:
                for t in successors[u]:
                    if t not in dist:
                        dist[t] = dist[u] + 1
                        nxt.append(t)
            frontier = nxt
        virtual += [(s, t, d) for t, d in dist.items() if 2 <= d <= max_path]
    return levels, virtual


def random_graph(n, seed, density=0.25):
    """A random DAG with parameterised and parameter-free nodes (names are made up)."""
    g = torch.Generator().manual_seed(seed)
    real = [(0, 1)] + [
        (s, t) for t in range(2, n) for s in range(t) if torch.rand((), generator=g) < density
    ]
    real += [(t - 1, t) for t in range(2, n) if not any(e[1] == t for e in real)]
    levels, virtual = _levels_and_virtual(n, real)
    choices = ["conv", "bn", "bias", "sum", "sep_conv", "max_pool", "ln"]
    types, shapes, names = [T["input"]], [[0, 0, 0, 0]], [None]
    for v in range(1, n):
        kind = choices[int(torch.randint(len(choices), (), generator=g))]
        out = int(torch.randint(1, 70, (), generator=g))
        if kind in ("conv", "sep_conv"):
            shape = [out, int(torch.randint(1, 40, (), generator=g)), 3, 3]
            names.append(f"layer{v}.weight")
        elif kind in ("bn", "ln"):
            shape = [out, 1, 1, 1]
            names.append(f"layer{v}.weight")
        elif kind == "bias":
            shape = [out, 1, 1, 1]
            names.append(f"layer{v}.bias")
        else:
            shape = [0, 0, 0, 0]
            names.append(None)
        types.append(T[kind])
        shapes.append(shape)
    edges = [(s, t) for s, t in real] + [(s, t) for s, t, _ in virtual]
    lengths = [1] * len(real) + [d for _, _, d in virtual]
    return ComputationalGraph(
        node_types=torch.tensor(types),
        shapes=torch.tensor(shapes),
        edges=torch.tensor(edges).T.contiguous(),
        edge_lengths=torch.tensor(lengths),
        levels=torch.tensor(levels),
        param_names=names,
    )


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    base = dict(hidden=8, max_shape=(8, 8, 3, 3))
    base.update(kwargs)
    return ghn.GHN2(**base).double()


def _loss(predictions):
    """A scalar that depends on every predicted tensor, with distinct weights."""
    total = 0
    for params in predictions:
        for i, name in enumerate(sorted(params)):
            total = total + (i + 1) * params[name].sin().sum()
    return total


@pytest.mark.parametrize("rounds,virtual", [(1, True), (2, True), (1, False)])
def test_level_sweep_matches_node_by_node_values_and_gradients(rounds, virtual):
    graphs = [random_graph(n, seed) for seed, n in enumerate((14, 5, 20, 2))]
    model = _model(rounds=rounds, virtual_edges=virtual)
    plan = ghn.plan_sweep(graphs, virtual)
    results = {}
    for sweep in ghn.SWEEPS:
        model.zero_grad()
        predicted = model(plan, sweep=sweep)
        _loss(predicted).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[sweep] = (predicted, grads)
    (level, level_grads), (node, node_grads) = results["level"], results["node"]
    for a, b in zip(level, node):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name])
    # A parameter the sweep never used has no gradient in one and a zero one in the other.
    for name, param in model.named_parameters():
        zero = torch.zeros_like(param)
        torch.testing.assert_close(level_grads.get(name, zero), node_grads.get(name, zero))
    # The messages reach the recurrent update: its gradients are not zero.
    assert level_grads["message.0.weight"].abs().sum() > 0
    if virtual:
        assert level_grads["virtual_message.0.weight"].abs().sum() > 0


def test_a_graph_predicts_the_same_alone_and_in_a_meta_batch():
    graphs = [random_graph(n, seed) for seed, n in enumerate((9, 16, 7))]
    model = _model()
    together = model(graphs)
    alone = model([graphs[1]])[0]
    for name, value in alone.items():
        torch.testing.assert_close(together[1][name], value)


def test_predicted_shapes_and_normalisation():
    graph = random_graph(30, 5)
    model = _model(hidden=16, max_shape=(4, 4, 3, 3))
    predicted = model([graph])[0]
    names = [n for n in graph.param_names if n is not None]
    assert sorted(predicted) == sorted(names)
    for v, name in enumerate(graph.param_names):
        if name is None:
            continue
        value = predicted[name]
        assert list(value.shape) == graph.shapes[v].tolist()
        kind = ghn.parameter_kind(NODE_TYPES[int(graph.node_types[v])], name)
        if kind == "bias":
            assert value.abs().max() < 1
        elif kind == "norm_scale":
            assert value.min() > 0 and value.max() < 2
    # A weight is its decoded block tiled to shape times sqrt(gain / fan_in): twice the input
    # channels with the same block gives the same values scaled by 1/sqrt(2).
    wide = random_graph(30, 5)
    v = next(
        i
        for i, n in enumerate(graph.param_names)
        if n and NODE_TYPES[graph.node_types[i]] == "conv"
    )
    wide.shapes = graph.shapes.clone()
    wide.shapes[v, 1] = 2 * graph.shapes[v, 1]
    name = graph.param_names[v]
    model.shape_encoder = ShapeOnlyOut(model.shape_encoder)  # same embedding for both shapes
    narrow_value = model([graph])[0][name]
    wide_value = model([wide])[0][name]
    torch.testing.assert_close(wide_value[:, : narrow_value.shape[1]], narrow_value / math.sqrt(2))


class ShapeOnlyOut(nn.Module):
    """Stands in for the shape encoder with a fixed output, so two shapes embed alike."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, shapes):
        return self.inner(torch.zeros_like(shapes))


def test_tile_to_shape_tiles_channels_and_centre_crops_space():
    raw = torch.arange(2 * 3 * 3 * 3.0).view(2, 3, 3, 3)
    out = ghn.tile_to_shape(raw, (5, 4, 1, 1))
    assert out.shape == (5, 4, 1, 1)
    torch.testing.assert_close(out[:, :3, 0, 0], raw[[0, 1, 0, 1, 0], :, 1, 1])
    torch.testing.assert_close(out[:, 3, 0, 0], raw[[0, 1, 0, 1, 0], 0, 1, 1])
    assert torch.equal(ghn.tile_to_shape(raw, (2, 3, 3, 3)), raw)
    big = ghn.tile_to_shape(raw, (1, 1, 5, 5))
    assert big.shape == (1, 1, 5, 5) and torch.equal(big[0, 0, 3:, 3:], raw[0, 0, :2, :2])


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def tiny_graph():
    """input -> conv -> bn -> bias(bn) -> glob_avg -> conv(fc) -> bias(fc), by hand."""
    types = ["input", "conv", "bn", "bias", "glob_avg", "conv", "bias"]
    shapes = [[0, 0, 0, 0], [6, 1, 3, 3], [6, 1, 1, 1], [6, 1, 1, 1], [0, 0, 0, 0],
              [10, 6, 1, 1], [10, 1, 1, 1]]  # fmt: skip
    names = [None, "conv.weight", "bn.weight", "bn.bias", None, "fc.weight", "fc.bias"]
    real = [(v, v + 1) for v in range(6)]
    levels, virtual = _levels_and_virtual(7, real)
    return ComputationalGraph(
        node_types=torch.tensor([T[t] for t in types]),
        shapes=torch.tensor(shapes),
        edges=torch.tensor(real + [(s, t) for s, t, _ in virtual]).T.contiguous(),
        edge_lengths=torch.tensor([1] * len(real) + [d for _, _, d in virtual]),
        levels=torch.tensor(levels),
        param_names=names,
    )


def test_functional_forward_trains_the_hypernetwork():
    net = TinyNet().double()
    model = _model(hidden=12)
    predicted = model([tiny_graph()])[0]
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ghn.functional_forward(net, predicted, x)
    assert out.shape == (5, 10)
    out.square().sum().backward()
    assert model.decoder_fc.weight.grad.abs().sum() > 0
    assert model.update.weight_hh.grad.abs().sum() > 0
    assert net.conv.weight.grad is None  # the network's own parameters are not used
    ghn.load_parameters(net, predicted)
    torch.testing.assert_close(net(x), out.detach())


def test_bad_input_is_refused_with_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="at least one"):
        model([])
    graph = tiny_graph()
    graph.edges = graph.edges.flip(0)
    with pytest.raises(ValueError, match="lower to a higher"):
        model([graph])
    graph = tiny_graph()
    graph.levels = torch.zeros(7, dtype=torch.int64)
    with pytest.raises(ValueError, match="levels must grow"):
        model([graph])
    graph = tiny_graph()
    graph.shapes = graph.shapes[:3]
    with pytest.raises(ValueError, match="graph 0: shapes"):
        model([graph])
    with pytest.raises(ValueError, match="sweep"):
        model([tiny_graph()], sweep="fast")
    with pytest.raises(ValueError, match="multiple of 4"):
        ghn.GHN2(hidden=10)
    net = TinyNet().double()
    predicted = model([tiny_graph()])[0]
    with pytest.raises(ValueError, match="miss"):
        ghn.functional_parameters(net, {k: v for k, v in predicted.items() if k != "bn.bias"})
    predicted["fc.bias"] = predicted["fc.bias"][:3]
    with pytest.raises(ValueError, match="fc.bias"):
        ghn.functional_parameters(net, predicted)


# ---------------------------------------------------------------------------------------------
# Training, resume, data parallelism and the commands, on small ResNets read by graph_of


def small_pool(split="train", count=4, seed=0, image_size=8, channels=None, max_nodes=None):
    from deepkern.data.compgraph import graph_of
    from deepkern.models.resnet import small_resnet

    nets, graphs = [], []
    for i in range(count):
        torch.manual_seed(seed * 100 + i)
        net = small_resnet(2 * (1 + (seed + i) % 2), width=4 + 2 * (i % 2))
        nets.append(net)
        graphs.append(graph_of(net, torch.zeros(2, 1, image_size, image_size)))
    return [None] * count, nets, graphs


def _digits(count=96):
    from deepkern.data.images import load_digits_split

    x_train, y_train, _, _ = load_digits_split(seed=0)
    return x_train[:count], y_train[:count]


def _train(epochs, checkpoint=None, resume=False, seed=0):
    _, nets, graphs = small_pool()
    images, labels = _digits()
    torch.manual_seed(seed)
    model = ghn.GHN2(hidden=8, max_shape=(8, 8, 3, 3))
    config = ghn.TrainConfig(
        epochs=epochs, meta_batch=2, batch_size=32, lr=5e-3, checkpoint=checkpoint,
        resume=resume, progress=False,
    )  # fmt: skip
    return model, ghn.train(model, config, nets, graphs, images, labels)


def test_training_lowers_the_loss_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    path = str(tmp_path / "ghn.pt")
    straight, result = _train(4)
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]

    # A run of 4 epochs that dies before its third checkpoint, then resumes.
    saves = []
    save = ghn.save_on_first_rank

    def dies_on_third_save(state, *args):
        saves.append(state["epoch"])
        if len(saves) == 3:
            raise KeyboardInterrupt
        save(state, *args)

    monkeypatch.setattr(ghn, "save_on_first_rank", dies_on_third_save)
    with pytest.raises(KeyboardInterrupt):
        _train(4, checkpoint=path)
    monkeypatch.setattr(ghn, "save_on_first_rank", save)
    resumed, again = _train(4, checkpoint=path, resume=True)
    assert again["start_epoch"] == 2 and len(again["history"]) == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = ghn.load_ghn(path)
    for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def _train_on_this_rank():
    model, result = _train(2)
    return {"state": model.state_dict(), "loss": result["train_loss"]}


def test_data_parallel_training_keeps_the_ranks_in_step(tmp_path):
    from tests.distributed import run_two_ranks

    first, second = run_two_ranks(_train_on_this_rank, tmp_path)
    assert math.isfinite(first["loss"]) and first["loss"] == second["loss"]
    for a, b in zip(first["state"].values(), second["state"].values()):
        torch.testing.assert_close(a, b)


def test_reproduce_and_predict_commands(monkeypatch, tmp_path, capsys):
    from deepkern import cli

    monkeypatch.setattr(ghn, "_architecture_pool", small_pool)
    out = tmp_path / "run"
    arguments = ["reproduce", "ghn", "--quick", "--no-progress", "--train-archs", "4"]
    arguments += ["--test-archs", "1", "--sgd-epochs", "1", "--epochs", "1", "--out", str(out)]
    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "random init" in printed and "GHN-2" in printed and "SGD 1 ep" in printed
    report = __import__("json").loads((out / "ghn.json").read_text())
    row = report["rows"][0]
    assert row["split"] == "test" and row["count"] == 1
    assert all(0 <= row[k] <= 100 for k in ("random", "predicted", "sgd1", "sgd"))

    checkpoint = str(out / "ghn.pt")
    arguments = ["ghn", "predict", "--arch", "resnet18", "--checkpoint", checkpoint]
    assert cli.main(arguments + ["--in-channels", "1", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "resnet18: 11,1" in printed and "prediction (cpu" in printed

    assert cli.main(["reproduce", "ghn", "--quick", "--hidden", "10"]) == 2
    assert "--hidden must be a multiple of 4" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert (
        cli.main(
            ["ghn", "predict", "--arch", "resnet18", "--checkpoint", str(tmp_path / "junk.pt")]
        )
        == 2
    )
    assert "not a readable GHN checkpoint" in capsys.readouterr().err


def test_ghn_benchmark_quick(monkeypatch, tmp_path):
    from deepkern import cli
    from deepkern.bench import ghn as ghn_bench

    monkeypatch.setattr(ghn_bench, "_graphs", lambda count, seed: small_pool(count=count)[2])
    path = tmp_path / "ghn.json"
    assert cli.main(["bench", "ghn", "--quick", "--hidden", "8", "--json", str(path)]) == 0
    rows = __import__("json").loads(path.read_text())["rows"]
    assert len(rows) == 2 * 2
    for row in rows:
        assert "error" not in row and row["level_s"] > 0 and row["node_s"] > 0
        assert (row.get("level_peak_bytes") is not None) == (row["mode"] != "forward")


def test_generated_architectures_sweep_alike_and_take_predicted_parameters():
    _, nets, graphs = ghn._architecture_pool("train", 2, seed=0, image_size=8, channels=4)
    model = _model(hidden=8)
    plan = ghn.plan_sweep(graphs)
    level = model.propagate(plan, model.embed(plan).double(), "level")
    node = model.propagate(plan, model.embed(plan).double(), "node")
    torch.testing.assert_close(level, node)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for net, predicted in zip(nets, model(plan)):
        out = ghn.functional_forward(net.double(), predicted, x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_reproduce_options_override_the_chosen_size():
    from deepkern import cli

    parse = cli.build_parser().parse_args
    settings = ghn._resolve(parse(["reproduce", "ghn", "--no-resnet50", "--max-nodes", "60"]))
    assert settings.resnet50 is False and settings.max_nodes == 60
    assert settings.train_archs == ghn._DEFAULTS.train_archs
    assert ghn._resolve(parse(["reproduce", "ghn"])).resnet50 is True
    with pytest.raises(ValueError, match="--max-nodes"):
        ghn._resolve(parse(["reproduce", "ghn", "--max-nodes", "1"]))
