"""The ``deepkern`` command: the demo, the microbenchmarks, the paper reproductions.

Library code never prints; this module is where output happens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _info(args: argparse.Namespace) -> int:
    import deepkern

    info = deepkern.build_info()
    info["package_version"] = deepkern.__version__
    print(json.dumps(info, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from deepkern.models import momentum_resnet

    return momentum_resnet.run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from deepkern import bench

    return bench.run(args)


def _kolmogorov(args: argparse.Namespace) -> int:
    from deepkern.models import kolmogorov

    return kolmogorov.run_kolmogorov(args)


def _route(args: argparse.Namespace) -> int:
    from deepkern.models import vrp

    return vrp.run_route(args)


def _verify(args: argparse.Namespace) -> int:
    from deepkern.verify import command

    return command.run_verify(args)


def _ghn_predict(args: argparse.Namespace) -> int:
    from deepkern.models import ghn

    return ghn.run_predict(args)


def _reproduce(args: argparse.Namespace) -> int:
    return args.reproduce(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepkern", description="deepkern kernels, models and benchmarks"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="what the installed extension was compiled with")
    info.set_defaults(run=_info)

    from deepkern import bench
    from deepkern.models import (
        cpngnn,
        ghn,
        kolmogorov,
        momentum_resnet,
        ptrnet,
        rfgan,
        rle,
        scaling,
        vrp,
        yoon,
    )

    demo = commands.add_parser(
        "demo",
        help="train a reversible Momentum ResNet beside a plain ResNet on scikit-learn digits",
    )
    momentum_resnet.add_demo_arguments(demo)
    demo.set_defaults(run=_demo)

    bench_parser = commands.add_parser("bench", help="run a kernel family's microbenchmarks")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=_bench)

    solver = commands.add_parser(
        "kolmogorov", help="solve a Kolmogorov PDE with the deep Kolmogorov method"
    )
    kolmogorov.add_kolmogorov_arguments(solver)
    solver.set_defaults(run=_kolmogorov)

    route = commands.add_parser("route", help="solve a TSPLIB or CVRPLIB instance")
    vrp.add_route_arguments(route)
    route.set_defaults(run=_route)

    from deepkern.verify import command as verify_command

    verify = commands.add_parser(
        "verify", help="verify ONNX networks against VNN-LIB properties (VNN-COMP results)"
    )
    verify_command.add_verify_arguments(verify)
    verify.set_defaults(run=_verify)

    ghn_parser = commands.add_parser("ghn", help="predict network parameters with GHN-2")
    ghn_commands = ghn_parser.add_subparsers(dest="ghn_command", required=True)
    predict = ghn_commands.add_parser("predict", help="predict all parameters of a network")
    ghn.add_predict_arguments(predict)
    predict.set_defaults(run=_ghn_predict)

    reproduce = commands.add_parser("reproduce", help="reproduce a paper's headline result")
    reproduce_models = reproduce.add_subparsers(dest="model", required=True)
    papers = [
        ("momentum", momentum_resnet, "Momentum ResNets (Sander et al. 2021) against ResNets"),
        ("kolmogorov", kolmogorov, "the deep Kolmogorov method (Beck et al.)"),
        ("scaling", scaling, "depth scaling of trained ResNet weights (Cohen et al. 2021)"),
        ("rfgan", rfgan, "GANs with representative features (Bang and Shim 2018) against DCGAN"),
        ("rle", rle, "residual log-likelihood estimation for keypoints (Li et al. 2021)"),
        ("ptrnet", ptrnet, "Pointer Networks on hulls, Delaunay and TSP (Vinyals et al. 2015)"),
        ("vrp", vrp, "reinforcement learning for the CVRP (Nazari et al. 2018)"),
        ("yoon", yoon, "GNNs against loopy BP for MRF marginals (Yoon et al. 2018)"),
        ("cpngnn", cpngnn, "port-numbered GNNs for dominating set and vertex cover (Sato 2019)"),
        ("ghn", ghn, "parameter prediction for unseen architectures (GHN-2, Knyazev 2021)"),
    ]
    for name, module, help_text in papers:
        paper = reproduce_models.add_parser(name, help=help_text)
        module.add_reproduce_arguments(paper)
        paper.set_defaults(reproduce=module.run_reproduce)
    reproduce.set_defaults(run=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as error:
        print(f"deepkern {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
