#!/usr/bin/env python
"""Margins of the form-tolerant fingerprint: the same model in other forms vs other models.

    python benchmarks/fingerprint_forms.py [--classifier clf.safetensors] [--seeds 1 2 3]
        [--arch-other resnet18] [--train-size 4000] [--epochs 3] [--out-dir DIR]

Seed 0 is `--classifier` (default: a small CNN trained here on a Fashion-MNIST subset).
Its fingerprint (probe logits from PyTorch) is compared, with the rule of
`fv_serving.fingerprint` (log-probabilities on the probe images within FORM_ATOL), to
ONNX graphs run in onnxruntime: seed 0 exported as float32 logits, float16, ending in
softmax, float16 + softmax, taking normalised input (given mean/std, with and without softmax); and models
trained with the same recipe but other seeds (and another architecture), in their
float32 and float16+softmax forms. Reported per graph: the form distance, the raw
max |logit difference|, and whether the check accepts it. Results go to
benchmarks/results/fingerprint_forms/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fv_serving.bench.forms import float16_form, normalized_input_form, softmax_form
from fv_serving.bench.machine import load_average
from fv_serving.bench.record import provenance, write_report
from fv_serving.config import TrainConfig
from fv_serving.data import SplitSpec
from fv_serving.errors import ModelMismatchError
from fv_serving.fingerprint import FORM_ATOL, ClassifierFingerprint, form_distance, probe_batch
from fv_serving.models import Classifier, load_classifier
from fv_serving.onnx.export import classifier_to_onnx
from fv_serving.onnx.graph import find_image_input
from fv_serving.onnx.runtime import make_session, pixel_logits_fn
from fv_serving.pipeline import train_model

RESULTS = Path(__file__).resolve().parent / "results" / "fingerprint_forms"


def _train(workdir: Path, arch: str, seed: int, args: argparse.Namespace) -> Classifier:
    path = workdir / f"{arch}-{seed}.safetensors"
    print(f"training {arch} seed {seed} on {args.train_size} Fashion-MNIST images ({args.epochs} epochs) ...")
    split = SplitSpec(seed=0, val_size=1000, train_size=args.train_size)
    train_model("fashion-mnist", path, arch=arch, config=TrainConfig(epochs=args.epochs, seed=seed), split=split)
    return load_classifier(path).model


def _forms(model: Classifier, everything: bool) -> dict[str, tuple[onnx.ModelProto, Any]]:
    """name -> (graph, normalized_input) of one classifier's forms."""
    plain = classifier_to_onnx(model)
    stats = (model.spec.mean, model.spec.std)
    forms = {"float32 logits": (plain, None), "float16 + softmax": (softmax_form(float16_form(model)), None)}
    if everything:
        forms.update(
            {
                "float16 logits": (float16_form(model), None),
                "float32 softmax": (softmax_form(plain), None),
                "normalised input (mean/std given)": (normalized_input_form(model), stats),
                "normalised input + softmax": (softmax_form(normalized_input_form(model)), stats),
            }
        )
    return forms


def _outputs(graph: onnx.ModelProto, normalized: Any) -> Callable[[np.ndarray], np.ndarray]:
    return pixel_logits_fn(make_session(graph), find_image_input(graph), normalized)


def measure(fingerprint: ClassifierFingerprint, graph: onnx.ModelProto, normalized: Any) -> dict[str, Any]:
    run = _outputs(graph, normalized)
    out = run(probe_batch(fingerprint.input_shape))
    try:
        verdict = fingerprint.check_outputs(run, "the fingerprint")
        accepted = True
    except ModelMismatchError as exc:
        verdict, accepted = str(exc), False
    return {
        "form_distance": form_distance(out, fingerprint.probe_logits),
        "raw_max_abs_diff": float(np.max(np.abs(out.astype(np.float64) - fingerprint.probe_logits))),
        "output_dtype": str(out.dtype),
        "accepted": accepted,
        "verdict": verdict,
    }


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Fingerprint: the same model in other forms vs other models",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), load average {m['loadavg_start']} -> {m['loadavg_end']}",
        f"- rule: {report['rule']}",
        f"- classifiers: {report['recipe']}",
        "",
        "| model | form | form distance | raw max abs diff | output | accepted | should be |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['form']} | {row['form_distance']:.4g} | {row['raw_max_abs_diff']:.4g} | "
            f"{row['output_dtype']} | {'yes' if row['accepted'] else 'no'} | {'yes' if row['same'] else 'no'} |"
        )
    s = report["summary"]
    lines += [
        "",
        f"Largest distance of a form of the same model: {s['same_max']:.4g}; smallest distance of another model: "
        f"{s['other_min']:.4g}; tolerance {s['tolerance']} (margins: x{s['same_margin']:.1f} below, "
        f"x{s['other_margin']:.1f} above).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", help="seed-0 checkpoint (default: train one with the recipe below)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="other seeds of the same recipe")
    p.add_argument("--arch-other", default="resnet18", help="another architecture, same recipe ('' for none)")
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        reference = load_classifier(args.classifier).model if args.classifier else _train(workdir, "small-cnn", 0, args)
        spec = reference.spec
        fingerprint = ClassifierFingerprint.of(reference, spec.input_shape, spec.num_classes)
        models: list[tuple[str, Classifier, bool]] = [("seed 0", reference, True)]
        models += [(f"seed {s}", _train(workdir, spec.arch, s, args), False) for s in args.seeds]
        if args.arch_other:
            models.append((f"{args.arch_other} seed 0", _train(workdir, args.arch_other, 0, args), False))
        for label, model, same in models:
            for form, (graph, normalized) in _forms(model, everything=same).items():
                row = {"model": label, "form": form, "same": same, **measure(fingerprint, graph, normalized)}
                rows.append(row)
                print(
                    f"{label:<18} {form:<38} distance {row['form_distance']:8.4f}  raw {row['raw_max_abs_diff']:8.4f}"
                    f"  {'accepted' if row['accepted'] else 'refused'}"
                )
    same_max = max(r["form_distance"] for r in rows if r["same"])
    other_min = min(r["form_distance"] for r in rows if not r["same"])
    report = {
        **provenance(load_start, onnxruntime=ort.__version__, torch=torch.__version__),
        "rule": "log-probabilities (log_softmax of logits; log of probabilities floored at the smallest normal "
        f"number of their dtype) on the 4 probe images within {FORM_ATOL}",
        "recipe": f"{spec.arch}, Fashion-MNIST, {args.train_size} images, {args.epochs} epochs"
        + (f"; seed 0 from {args.classifier}" if args.classifier else ""),
        "rows": rows,
        "summary": {
            "same_max": same_max,
            "other_min": other_min,
            "tolerance": FORM_ATOL,
            "same_margin": FORM_ATOL / same_max if same_max else float("inf"),
            "other_margin": other_min / FORM_ATOL,
            "all_correct": all(r["accepted"] == r["same"] for r in rows),
        },
    }
    write_report(args.out_dir, report, _markdown)
    return 0 if report["summary"]["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
