#!/usr/bin/env python
"""The gated mode's UA / RA / TA / MIA-Efficacy in PyTorch, onnxruntime and a real tritonserver, side by side.

    python benchmarks/gated_quality.py [--classifier runs/demo/classifier.safetensors] [--classes 1 5 8]
        [--vector v.safetensors] [--out-dir DIR]

Full Fashion-MNIST (the checkpoint's split: D_f = every training image of the forgotten
classes in the train pool, D_r the rest, TA on the test images of the retained
classes), class-wise forgetting of 3 classes. The vector is `--vector` or learned here
with the default settings (`VectorConfig()`, the fast preset). Each served form is
measured by the same code, `fv_serving.metrics.evaluate_unlearning`, on its own
outputs:
  * PyTorch: `fv_serving.gating.GatedPerturbedClassifier` (the reference);
  * onnxruntime: the gated fused graph (`fv export fused --gated`) of the exported classifier;
  * tritonserver: the `unlearned` ensemble of `fv triton build --gated` (the gated
    step, python backend + onnxruntime, batches of 64 over HTTP);
and, for the price the gated mode removes, the universal (plain) vector in PyTorch and
the original classifier. Acceptance (issue 12): onnxruntime and Triton within 0.1 point
of PyTorch on all four metrics. Results: benchmarks/results/gated_quality/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fv_serving.bench.machine import load_average
from fv_serving.bench.record import provenance, write_report
from fv_serving.config import METRIC_NAMES
from fv_serving.data import ForgetSpec
from fv_serving.gating import GatedPerturbedClassifier
from fv_serving.metrics import evaluate_unlearning
from fv_serving.models import PerturbedClassifier
from fv_serving.onnx import load_model, make_session
from fv_serving.onnx.checked import fuse_gated_vector
from fv_serving.onnx.export import export_classifier
from fv_serving.pipeline import learn_vector, open_workspace
from fv_serving.triton.build import build_deployment
from fv_serving.triton.repository import ENSEMBLE_MODEL
from fv_serving.triton.server import TritonServer
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import load_vector

TOLERANCE = 0.1
RESULTS = Path(__file__).resolve().parent / "results" / "gated_quality"
# What `make demo` trains: the default model on full Fashion-MNIST.
DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "runs" / "demo" / "classifier.safetensors"


class Outputs(nn.Module):
    """A function of numpy images (an onnxruntime session, a Triton client) as the module the metrics take."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.cpu().numpy()), np.float32))


def _vector(args: argparse.Namespace, ws: Any, spec: ForgetSpec, work: Path) -> tuple[Path, float]:
    """The vector file: `--vector`, or one learned here (and how long that took)."""
    if args.vector:
        return args.vector, 0.0
    started = time.perf_counter()
    learn_vector(ws, spec, work / "vector.safetensors", evaluate=False)
    return work / "vector.safetensors", time.perf_counter() - started


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# The gated mode in PyTorch, onnxruntime and tritonserver (full Fashion-MNIST, 3 classes)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), {m['platform']}, load average {m['loadavg_start']} at start,"
        f" {m['loadavg_end']} at end; torch {m['torch']} (1 thread), onnxruntime {m['onnxruntime']}",
        f"- classifier: {report['classifier']}",
        f"- forgotten classes {report['classes']} ({', '.join(report['class_names'])})",
        f"- vector: {report['vector']['vector_id']} ({report['vector']['source']}), sets: {report['sets']}",
        "",
        "| model | UA | RA | TA | MIA-Eff | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in METRIC_NAMES) + f" | {row['seconds']:.0f} |")
    lines += ["", "| gated form | max abs diff to PyTorch (points) | <= 0.1 |", "|---|---|---|"]
    for name, diff in report["max_abs_diff"].items():
        lines.append(f"| {name} | {diff:.4f} | {'yes' if diff <= TOLERANCE else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--classifier",
        type=Path,
        default=DEFAULT_CLASSIFIER,
        help="fv-serving checkpoint on full data (default: the one make demo trains)",
    )
    p.add_argument("--classes", type=int, nargs="+", default=[1, 5, 8], help="forgotten classes (default 1 5 8)")
    p.add_argument("--vector", type=Path, help="a class-wise vector for those classes (default: learn one here)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = load_average()
    ws = open_workspace(args.classifier)
    spec = ForgetSpec(classes=tuple(args.classes))
    split = ws.forget_split(spec)
    rows: dict[str, dict[str, float]] = {}

    def measure(name: str, model: nn.Module) -> None:
        started = time.perf_counter()
        metrics, _ = evaluate_unlearning(model, ws.data, split)
        rows[name] = {**metrics.to_json(), "seconds": time.perf_counter() - started}
        print(f"{name:<40} " + "  ".join(f"{k} {rows[name][k]:6.2f}" for k in METRIC_NAMES), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vector_path, learn_s = _vector(args, ws, spec, work)
        vector = load_vector(vector_path)
        classes = tuple(int(c) for c in vector.forget.get("classes", []))
        if classes != spec.classes:
            raise SystemExit(f"the vector forgets {classes}, not {spec.classes}")
        delta = torch.from_numpy(vector.delta)
        measure("PyTorch gated (reference)", GatedPerturbedClassifier(ws.model, delta, classes, vector.clamp))
        export_classifier(ws.model, work / "classifier.onnx")
        classifier = load_model(work / "classifier.onnx")
        gated = make_session(fuse_gated_vector(classifier, vector).graph, threads=1, spinning=False)
        measure("onnxruntime gated fused graph", Outputs(lambda x: gated.run(None, {"image": x})[0]))
        repo = work / "repo"
        build_deployment(
            repo,
            VectorChoice(vector=vector_path),
            classifier,
            gated=True,
            max_batch_size=64,
        )
        with TritonServer(repo, [ENSEMBLE_MODEL]) as server, server.client() as client:
            measure("tritonserver gated ensemble", Outputs(lambda x: client.infer(ENSEMBLE_MODEL, x, batch_size=64)))
        measure("PyTorch plain (universal) vector", PerturbedClassifier(ws.model, delta, vector.clamp))
        measure("original classifier", ws.model)
    reference = rows["PyTorch gated (reference)"]
    diffs = {
        name: max(abs(rows[name][k] - reference[k]) for k in METRIC_NAMES)
        for name in ("onnxruntime gated fused graph", "tritonserver gated ensemble")
    }
    report = {
        **provenance(load_start, torch=torch.__version__, onnxruntime=ort.__version__),
        "classifier": f"{ws.model.spec.arch} from {args.classifier}",
        "classes": list(spec.classes),
        "class_names": [ws.data.class_names[c] for c in spec.classes],
        "vector": {
            "vector_id": vector.vector_id,
            "source": str(args.vector) if args.vector else f"learned here, VectorConfig() ({learn_s:.0f} s)",
        },
        "sets": {"forget": len(split.forget), "retain": len(split.retain), "test (retained classes)": len(split.test)},
        "rows": rows,
        "max_abs_diff": diffs,
        "tolerance": TOLERANCE,
    }
    write_report(args.out_dir, report, _markdown)
    return 0 if all(d <= TOLERANCE for d in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
