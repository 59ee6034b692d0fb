"""Quality of forget vectors on full Fashion-MNIST with the default model (issue: core library).

Measures, in one run, with the library calls the CLI uses:
  1. class-wise vectors (a bank of the reported classes' vectors, reported in full):
     UA, RA, TA, MIA-Efficacy against the original model;
  2. forget-vector arithmetic for a two-class task: zero-shot sum of the two class
     vectors vs learned coefficients over the bank (UA on each class);
  3. 10% random forgetting against a Retrain model, with an original that has
     memorised its (subset of the) training data, so that the task means something.

    python benchmarks/quality.py            # ~30 min on 2 CPU cores
Writes benchmarks/results/quality/{quality.json, quality.md} and PNGs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fv_serving.bench.machine import load_average
from fv_serving.bench.record import (
    torch_machine_line,
    torch_provenance,
    vector_settings,
    vector_terms,
    write_report,
)
from fv_serving.bench.report import ordered
from fv_serving.config import METRIC_NAMES, TrainConfig, VectorConfig, combination_config, with_overrides
from fv_serving.data import ForgetSpec, SplitSpec
from fv_serving.datasets import FASHION_MNIST_CLASSES
from fv_serving.metrics import evaluate_unlearning
from fv_serving.models import PerturbedClassifier
from fv_serving.pipeline import (
    Workspace,
    bank_figure,
    compose_vector,
    learn_bank,
    learn_vector,
    open_workspace,
    train_model,
)

COMPOSITION_MODES = ("sum", "learned")
RANDOM_ROWS = ("original", "retrain", "forget vector")


def _row(metrics: Any) -> dict[str, float]:
    return {k: round(float(metrics[k] if isinstance(metrics, dict) else getattr(metrics, k)), 2) for k in METRIC_NAMES}


def class_wise(
    ws: Workspace, out: Path, config: VectorConfig, report_classes: list[int], compose: list[int]
) -> dict[str, Any]:
    start = time.perf_counter()
    # The bank holds the reported classes and the composition's (not all ten: each vector
    # takes minutes on 2 cores); learned coefficients may use every vector in it.
    bank_classes = sorted(set(report_classes) | set(compose))
    bank = learn_bank(ws, config, out / "bank.safetensors", classes=bank_classes)
    bank_seconds = time.perf_counter() - start
    bank_figure(bank, out / "bank.png")
    rows: dict[str, Any] = {}
    for c in report_classes:
        split = ws.forget_split(ForgetSpec(classes=(c,)))
        original, _ = evaluate_unlearning(ws.model, ws.data, split)
        unlearned, details = evaluate_unlearning(
            PerturbedClassifier(ws.model, torch.from_numpy(bank.vector_for(c))), ws.data, split
        )
        name = ws.data.class_names[c]
        rows[name] = {
            "original": _row(original),
            "forget vector": _row(unlearned),
            "RA drop": round(original.RA - unlearned.RA, 2),
            "TA drop": round(original.TA - unlearned.TA, 2),
            "forgotten class test accuracy": round(details["forgotten_classes_test_accuracy"], 2),
            "stopping": bank.metrics["per_class_stopping"][str(c)],
        }
    composed: dict[str, Any] = {}
    for mode in COMPOSITION_MODES:
        t0 = time.perf_counter()
        vector, metrics = compose_vector(
            bank, compose, mode, out / f"compose_{mode}.safetensors", ws=ws, config=combination_config(config)
        )
        composed[mode] = {
            **_row(metrics),
            "UA_per_class": {
                ws.data.class_names[int(c)]: round(v, 2) for c, v in metrics["per_forgotten_class_UA"].items()
            },
            "coefficients": vector.forget["composed"]["coefficients"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return {
        "bank_seconds": round(bank_seconds, 1),
        "classes": rows,
        "composition": composed,
        "composed_classes": [ws.data.class_names[c] for c in compose],
    }


def random_forgetting(
    out: Path, vector_config: VectorConfig, train_size: int, epochs: int, percent: float, seed: int
) -> dict[str, Any]:
    split = SplitSpec(seed=0, val_size=5000, train_size=train_size)
    config = TrainConfig(epochs=epochs, augment=False)
    forget = ForgetSpec(percent=percent, seed=seed)
    original = train_model("fashion-mnist", out / "memorised.safetensors", config=config, split=split)
    retrain = train_model("fashion-mnist", out / "retrain.safetensors", config=config, split=split, exclude=forget)
    ws = open_workspace(out / "memorised.safetensors")
    retrain_ws = open_workspace(out / "retrain.safetensors")
    vector, _ = learn_vector(ws, forget, out / "random.safetensors", config=vector_config, evaluate=False)
    task = ws.forget_split(forget)
    rows = {
        "original": evaluate_unlearning(ws.model, ws.data, task)[0],
        "retrain": evaluate_unlearning(retrain_ws.model, ws.data, task)[0],
        "forget vector": evaluate_unlearning(
            PerturbedClassifier(ws.model, torch.from_numpy(vector.delta)), ws.data, task
        )[0],
    }
    reference = rows["retrain"]
    return {
        "train_size": train_size,
        "epochs": epochs,
        "percent": percent,
        "seed": seed,
        "accuracy": {"original": original["accuracy"], "retrain": retrain["accuracy"]},
        "rows": {name: {**_row(m), "avg_gap": round(m.avg_gap(reference), 2)} for name, m in rows.items()},
        "vector_stopping": vector.metrics["stopping"],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Forget-vector quality on Fashion-MNIST ({result['date']})",
        "",
        torch_machine_line(result["machine"]) + ".",
        f"Command: `{result['command']}`. Wall time {result['seconds']:.0f} s.",
        "",
        f"Class-wise vectors: {vector_terms(result['vector_config'])}; {vector_settings(result['vector_config'])}.",
        f"Random-subset vector: {vector_terms(result['random_vector_config'])}; "
        f"{vector_settings(result['random_vector_config'])}.",
        "",
        "## Class-wise forgetting (original -> forget vector)",
        "",
        "| class | UA | RA | TA | MIA | RA drop | TA drop |",
        "|---|---|---|---|---|---|---|",
    ]
    # The JSON file sorts keys: tables take their order from the data set's classes and the constants above.
    classes = result["class_wise"]["classes"]
    for name in ordered(list(classes), FASHION_MNIST_CLASSES):
        r = classes[name]
        o, v = r["original"], r["forget vector"]
        lines.append(
            f"| {name} | {o['UA']} -> **{v['UA']}** | {o['RA']} -> {v['RA']} | {o['TA']} -> {v['TA']} | "
            f"{o['MIA']} -> **{v['MIA']}** | {r['RA drop']} | {r['TA drop']} |"
        )
    comp = result["class_wise"]["composition"]
    names = result["class_wise"]["composed_classes"]
    lines += [
        "",
        f"## Forget-vector arithmetic: forgetting {' + '.join(names)}",
        "",
        "| composition | " + " | ".join(f"UA {n}" for n in names) + " | RA | TA | MIA | time (s) |",
        "|---|" + "---|" * (len(names) + 4),
    ]
    for mode in COMPOSITION_MODES:
        r = comp[mode]
        label = "zero-shot sum" if mode == "sum" else "learned coefficients"
        lines.append(
            f"| {label} | "
            + " | ".join(str(r["UA_per_class"][n]) for n in names)
            + f" | {r['RA']} | {r['TA']} | {r['MIA']} | {r['seconds']} |"
        )
    rnd = result["random"]
    lines += [
        "",
        f"## {rnd['percent']}% random forgetting (seed {rnd['seed']}), original trained {rnd['epochs']} "
        f"epochs on {rnd['train_size']} images without augmentation",
        "",
        f"Accuracy (train/test): original {rnd['accuracy']['original']['train']:.2f} / "
        f"{rnd['accuracy']['original']['test']:.2f}, Retrain {rnd['accuracy']['retrain']['train']:.2f} / "
        f"{rnd['accuracy']['retrain']['test']:.2f}.",
        "",
        "| model | UA | RA | TA | MIA | Avg. Gap |",
        "|---|---|---|---|---|---|",
    ]
    for name in ordered(list(rnd["rows"]), RANDOM_ROWS):
        r = rnd["rows"][name]
        lines.append(f"| {name} | {r['UA']} | {r['RA']} | {r['TA']} | {r['MIA']} | {r['avg_gap']} |")
    stop = rnd["vector_stopping"]
    lines += [
        "",
        f"The vector {'met' if stop['rule_met'] else 'did NOT meet'} its stopping rule "
        f"({stop['steps_run']} steps, {stop['seconds']} s; hold-out half {stop['holdout_acc']}%, forget monitor "
        f"{stop['forget_acc_monitor']}%).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results/quality")
    parser.add_argument("--work-dir", default="runs/quality", help="checkpoints and vectors (not committed)")
    parser.add_argument("--classifier", help="reuse a classifier trained by `fv train` (default: train one)")
    parser.add_argument("--classes", nargs="+", type=int, default=[2, 5, 8], help="class-wise rows reported")
    parser.add_argument("--compose", nargs=2, type=int, default=[2, 5], help="two-class composition task")
    parser.add_argument("--random-train-size", type=int, default=10000)
    parser.add_argument("--random-epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--retain-margin", type=float, default=VectorConfig.retain_margin, help="stopping rule's hold-out margin"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    load_start, start = load_average(), time.perf_counter()
    classifier = Path(args.classifier) if args.classifier else work / "classifier.safetensors"
    if not args.classifier:
        train_model("fashion-mnist", classifier)
    ws = open_workspace(classifier)
    # Each task's default (`fv learn`'s): the fast preset for classes, distribution matching for a random subset.
    config = with_overrides(VectorConfig.default_for("class"), retain_margin=args.retain_margin)
    random_config = with_overrides(VectorConfig.default_for("random"), retain_margin=args.retain_margin)
    result: dict[str, Any] = {
        "classifier": ws.loaded.info["accuracy"],
        "vector_config": config.to_json(),
        "random_vector_config": random_config.to_json(),
        "class_wise": class_wise(ws, work, config, args.classes, args.compose),
        "random": random_forgetting(work, random_config, args.random_train_size, args.random_epochs, 10.0, 0),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_report(out, {**torch_provenance(load_start), **result}, markdown, name="quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
