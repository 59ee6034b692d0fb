"""Memory order of the classifier's weights in torch: standard (NCHW) against channels-last, side by side.

    python benchmarks/layout.py [--arch small-cnn] [--threads 1] [--rounds 15] [--classifier CKPT]

What fv-serving runs in torch, timed per image with each order of the same weights:
  * learning step: forward and backward to the input (the frozen, BatchNorm-folded
    copy a forget vector learns against; batch 128, the fast preset's);
  * prediction: forward without gradients in batches of 1000 (`metrics.predict`: the
    stopping rule's checks and every evaluation);
  * training step: forward, backward and SGD update of the weights (`fv train`, batch 128).
Weights do not change speed, so a freshly initialised model is timed. Each round times
a block of every variant in a freshly shuffled order (interleaved, so load drift on a
shared machine hits both orders alike); reported: the median over rounds and the
channels-last/standard ratio of medians.

With --classifier (a `fv train` checkpoint on Fashion-MNIST) the real loops too, each
order in turn, --loop-rounds times: learning one fast-preset vector for --forget-class
(checks included; "standard" replaces `models.channels_last` in the loop's copy by the identity) and
one training epoch on --train-images images (data loading and augmentation included).
Writes benchmarks/results/layout/layout.{json,md}.
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
from unittest.mock import patch

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fv_serving import models, unlearn
from fv_serving.bench.machine import load_average
from fv_serving.bench.record import torch_machine_line, torch_provenance, write_report
from fv_serving.config import ARCHITECTURES, TrainConfig, VectorConfig
from fv_serving.data import ForgetSpec, default_augmentation
from fv_serving.models import Classifier, ModelSpec, channels_last, fold_batchnorm, freeze
from fv_serving.pipeline import open_workspace
from fv_serving.train import train_classifier

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


def loops(classifier: Path, forget_class: int, train_images: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of the real learning and training loops in each order (and the learning runs' steps)."""
    ws = open_workspace(classifier)
    standard_model = ws.model.to(memory_format=torch.contiguous_format)
    split = ws.forget_split(ForgetSpec(classes=(forget_class,)))
    pool, _ = ws.split.indices(len(ws.data.train))
    out: dict[str, dict[str, list[float]]] = {o: {"learn": [], "learn_steps": [], "train": []} for o in ORDERS}
    for _ in tqdm(range(rounds), desc="real loops"):
        for order in ORDERS:
            layout = channels_last if order == "channels-last" else (lambda m: m)
            with patch.object(models, "channels_last", layout):
                start = time.perf_counter()
                result = unlearn.learn_forget_vector(standard_model, ws.data, split, VectorConfig())
            out[order]["learn"].append(round(time.perf_counter() - start, 2))
            out[order]["learn_steps"].append(result.steps_run)
            torch.manual_seed(0)
            model = layout(Classifier(ws.model.spec))
            history = train_classifier(
                model, ws.data, pool[:train_images], TrainConfig(epochs=1), augmentation=default_augmentation(ws.data)
            )
            out[order]["train"].append(round(history["seconds"], 2))
    return out


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
    real = result.get("loops")
    if real:
        median = {o: {k: statistics.median(v) for k, v in real[o].items()} for o in ORDERS}
        lines += [
            "",
            f"## The real loops (--classifier `{result['classifier']}`), {result['loop_rounds']} round(s) per order",
            "",
            "| loop | standard (s) | channels-last (s) | channels-last / standard |",
            "|---|---|---|---|",
        ]
        for key, label in (
            ("learn", f"learning a fast-preset vector for class {result['forget_class']} (checks included)"),
            ("train", f"one training epoch on {result['train_images']:,} images"),
        ):
            std, nhwc = median["standard"][key], median["channels-last"][key]
            lines.append(f"| {label} | {std:.2f} | {nhwc:.2f} | {nhwc / std:.2f} |")
        lines += [
            "",
            "Learning steps per run (float rounding can move the stopping check): standard "
            f"{real['standard']['learn_steps']}, channels-last {real['channels-last']['learn_steps']}; all seconds: "
            f"standard learn {real['standard']['learn']} train {real['standard']['train']}, channels-last learn "
            f"{real['channels-last']['learn']} train {real['channels-last']['train']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="small-cnn")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out-dir", default="benchmarks/results/layout")
    parser.add_argument("--classifier", type=Path, help="a `fv train` checkpoint: time the real loops too")
    parser.add_argument("--forget-class", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=15000)
    parser.add_argument("--loop-rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    result: dict[str, Any] = {"arch": args.arch, "rounds": args.rounds, "ms_per_image": measure(args.arch, args.rounds)}
    if args.classifier:
        result.update(
            classifier=str(args.classifier),
            forget_class=args.forget_class,
            train_images=args.train_images,
            loop_rounds=args.loop_rounds,
            loops=loops(args.classifier, args.forget_class, args.train_images, args.loop_rounds),
        )
    result = {**torch_provenance(load_start), **result}
    write_report(Path(args.out_dir), result, markdown, name="layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
