"""Memory order of the classifier's weights in torch: standard (NCHW) against channels-last, side by side.

    python benchmarks/layout.py [--arch small-cnn] [--threads 1] [--rounds 15]

What fv-serving runs in torch, timed per image with each order of the same weights:
  * learning step: forward and backward to the input (the frozen, BatchNorm-folded
    copy a forget vector learns against; batch 128, the fast preset's);
  * prediction: forward without gradients in batches of 1000 (`metrics.predict`: the
    stopping rule's checks and every evaluation);
  * training step: forward, backward and SGD update of the weights (`fv train`, batch 128).
Weights do not change speed, so a freshly initialised model is timed. Each round times
a block of every variant in a freshly shuffled order (interleaved, so load drift on a
shared machine hits both orders alike); reported: the median over rounds and the
channels-last/standard ratio of medians. Writes benchmarks/results/layout/layout.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fv_serving.bench.machine import load_average
from fv_serving.bench.record import torch_machine_line, torch_provenance, write_report
from fv_serving.config import ARCHITECTURES
from fv_serving.models import Classifier, ModelSpec, channels_last, fold_batchnorm, freeze

Work = Callable[[], None]
ORDERS = ("standard", "channels-last")
BATCHES = {"learning step": 128, "prediction": 1000, "training step": 128}
BLOCK = 5  # runs of one variant per round


def workloads(arch: str, order: str) -> dict[str, Work]:
    """The three operations on one model whose weights are in `order`."""
    spec = ModelSpec(arch, 1, 10, (28, 28), (0.286,), (0.353,))
    torch.manual_seed(0)
    trained = Classifier(spec)
    frozen = fold_batchnorm(freeze(Classifier(spec)))
    if order == "channels-last":
        trained, frozen = channels_last(trained), channels_last(frozen)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)
    x = {name: torch.rand(size, 1, 28, 28) for name, size in BATCHES.items()}
    y = torch.randint(10, (128,))
    delta = torch.zeros(1, 1, 28, 28, requires_grad=True)

    def learning_step() -> None:
        F.cross_entropy(frozen(x["learning step"] + delta), y).backward()

    def prediction() -> None:
        with torch.no_grad():
            frozen(x["prediction"])

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(trained(x["training step"]), y).backward()
        optimizer.step()

    return {"learning step": learning_step, "prediction": prediction, "training step": training_step}


def timed(work: Work) -> float:
    start = time.perf_counter()
    for _ in range(BLOCK):
        work()
    return (time.perf_counter() - start) / BLOCK


def measure(arch: str, rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per image, per operation and order."""
    variants: list[tuple[str, str, Work]] = []
    for order in ORDERS:
        for name, work in workloads(arch, order).items():
            work()  # warm-up: oneDNN picks its kernels on the first call
            variants.append((name, order, work))
    seconds: dict[tuple[str, str], list[float]] = {(n, o): [] for n, o, _ in variants}
    shuffler = random.Random(0)
    for _ in range(rounds):
        for name, order, work in shuffler.sample(variants, len(variants)):
            seconds[(name, order)].append(timed(work))
    return {
        name: {order: round(1e3 * statistics.median(seconds[(name, order)]) / BATCHES[name], 4) for order in ORDERS}
        for name in BATCHES
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Weight memory order in torch: standard vs channels-last ({result['date']})",
        "",
        torch_machine_line(result["machine"]) + ".",
        f"Command: `{result['command']}`. Architecture {result['arch']}, {result['rounds']} interleaved rounds.",
        "",
        "| operation | batch | standard (ms/image) | channels-last (ms/image) | channels-last / standard |",
        "|---|---|---|---|---|",
    ]
    for name, ms in result["ms_per_image"].items():
        lines.append(
            f"| {name} | {BATCHES[name]} | {ms['standard']} | {ms['channels-last']} | "
            f"{ms['channels-last'] / ms['standard']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="small-cnn")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out-dir", default="benchmarks/results/layout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    ms = measure(args.arch, args.rounds)
    result = {**torch_provenance(load_start), "arch": args.arch, "rounds": args.rounds, "ms_per_image": ms}
    write_report(Path(args.out_dir), result, markdown, name="layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
