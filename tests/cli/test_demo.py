"""``deepkern demo`` and ``deepkern reproduce momentum`` end to end, at their quick size."""

from __future__ import annotations

import json

from deepkern.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "results.json").read_text())
    assert {"settings", "accuracy", "training", "memory", "seconds", "environment"} <= set(report)
    assert set(report["accuracy"]) == {"resnet", "momentum"}
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
    for kind in ("resnet", "momentum"):
        assert len(report["training"][kind]["history"]) == report["settings"]["epochs"]

    depths = [row["depth"] for row in report["memory"]]
    assert depths == report["settings"]["memory_depths"]
    for row in report["memory"]:
        for key in ("resnet_saved_bytes", "momentum_saved_bytes", "resnet_peak_bytes"):
            assert row[key] > 0
    # The plain network holds activations for backward in every block, the momentum one not.
    deepest = report["memory"][-1]
    assert deepest["momentum_saved_bytes"] < deepest["resnet_saved_bytes"]

    with open(tmp_path / "memory.png", "rb") as file:
        assert file.read(8) == PNG_SIGNATURE
    out = capsys.readouterr().out
    assert "Momentum ResNet" in out and "saved MiB" in out


def test_reproduce_quick(tmp_path, capsys):
    out_file = tmp_path / "reproduce.json"
    argv = ["reproduce", "momentum", "--quick", "--no-progress", "--out", str(out_file)]
    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "paper (CIFAR-10, ResNet-101)" in out and "95.18" in out
    assert "ours (digits, depth 16)" in out
    report = json.loads(out_file.read_text())
    assert report["paper"]["momentum_accuracy"] == 95.18
    assert report["memory"]["momentum_saved_bytes"] < report["memory"]["resnet_saved_bytes"]


def test_demo_rejects_an_odd_depth(tmp_path, capsys):
    assert main(["demo", "--quick", "--depth", "5", "--out", str(tmp_path)]) == 2
    assert "--depth must be an even number" in capsys.readouterr().err
