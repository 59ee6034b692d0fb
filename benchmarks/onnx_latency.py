#!/usr/bin/env python
"""Latency of the fused graph vs the plain classifier graph in onnxruntime, side by side.

    python benchmarks/onnx_latency.py [--classifier clf.safetensors] [--vector v.safetensors]
        [--batch-sizes 1 64] [--rounds 300] [--provider cpu|cuda] [--threads N]

Without --classifier a small CNN is trained on a Fashion-MNIST subset first (about
half a minute on 2 cores); weights do not change latency, but the graph is the real
exported one. Without --vector a random delta with that classifier's fingerprint is
used. Variants: plain classifier, fused (one Add), fused with clamp (Add + Clip).

Method: one session per variant, same options; warm-up; then `rounds` rounds, each
timing a block of runs of every variant in a freshly shuffled order (interleaved, so
load drift on a shared machine hits all variants alike). Reported: median per-run
latency, p10/p90, and fused/plain as the median of per-round ratios (paired) and as
the ratio of medians. Results go to benchmarks/results/onnx_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.machine import load_average, machine_info
from fv_serving.config import TrainConfig
from fv_serving.data import SplitSpec, load_dataset, to_numpy_images
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.models import load_classifier
from fv_serving.onnx import fuse_vector, load_model, make_session
from fv_serving.onnx.export import export_classifier
from fv_serving.pipeline import train_model
from fv_serving.vectors import ForgetVector, load_vector

TARGET_RATIO = 1.03
RESULTS = Path(__file__).resolve().parent / "results"


def _classifier(args: argparse.Namespace, workdir: Path) -> Path:
    if args.classifier:
        return Path(args.classifier)
    path = workdir / "classifier.safetensors"
    print(f"training a quick {args.arch} on {args.train_size} Fashion-MNIST images ({args.epochs} epoch) ...")
    train_model(
        "fashion-mnist",
        path,
        arch=args.arch,
        config=TrainConfig(epochs=args.epochs, seed=0),
        split=SplitSpec(seed=0, val_size=1000, train_size=args.train_size),
    )
    return path


def _vector(args: argparse.Namespace, classifier_path: Path) -> ForgetVector:
    if args.vector:
        return load_vector(args.vector)
    model = load_classifier(classifier_path).model
    spec = model.spec
    delta = np.random.default_rng(0).normal(0.0, 0.1, spec.input_shape).astype(np.float32)
    return ForgetVector(classifier=ClassifierFingerprint.of(model, spec.input_shape, spec.num_classes), delta=delta)


def _time_block(session: ort.InferenceSession, feed: dict[str, np.ndarray], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        session.run(None, feed)
    return (time.perf_counter_ns() - start) / n / 1e3  # microseconds per run


def measure(
    sessions: dict[str, ort.InferenceSession], images: np.ndarray, rounds: int, seed: int = 0
) -> dict[str, Any]:
    """Interleaved rounds over all variants for one batch; per-run latencies in microseconds."""
    feed = {"image": np.ascontiguousarray(images)}
    for s in sessions.values():  # warm-up, and a block size of about 2 ms per variant
        _time_block(s, feed, 20)
    single = np.median([_time_block(sessions["plain"], feed, 5) for _ in range(5)])
    block = int(max(1, min(200, 2000 / max(single, 1.0))))
    rng = np.random.default_rng(seed)
    names = list(sessions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            times[names[i]].append(_time_block(sessions[names[i]], feed, block))
    plain = np.array(times["plain"])
    out: dict[str, Any] = {"block": block, "rounds": rounds, "variants": {}}
    for name in names:
        t = np.array(times[name])
        row = {
            "median_us": float(np.median(t)),
            "p10_us": float(np.percentile(t, 10)),
            "p90_us": float(np.percentile(t, 90)),
        }
        if name != "plain":
            row["ratio_paired_median"] = float(np.median(t / plain))
            row["ratio_of_medians"] = float(np.median(t) / np.median(plain))
        out["variants"][name] = row
    return out


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Fused vs plain classifier graph: onnxruntime latency",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), {m['platform']}, load average {m['loadavg_start']} at start,"
        f" {m['loadavg_end']} at end",
        f"- onnxruntime {m['onnxruntime']} ({report['provider']}, intra-op threads {report['threads'] or 'default'},"
        f" spinning {'on' if report['spinning'] else 'off'}{', tf32' if report['tf32'] else ''}),"
        f" torch {m['torch']}",
        f"- classifier: {report['classifier']['arch']} {report['classifier']['input_shape']},"
        f" graph {report['classifier']['nodes']} nodes; vector {report['vector']['vector_id']}",
        f"- method: {report['method']}",
        "",
        "| batch | variant | median (us) | p10 (us) | p90 (us) | fused/plain paired | ratio of medians | <= target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, res in report["results"].items():
        for name, row in res["variants"].items():
            paired, of_medians, ok = "", "", ""
            if "ratio_paired_median" in row:
                paired, of_medians = f"{row['ratio_paired_median']:.4f}", f"{row['ratio_of_medians']:.4f}"
                ok = "yes" if row["ratio_paired_median"] <= report["target_ratio"] else "NO"
            lines.append(
                f"| {batch} | {name} | {row['median_us']:.1f} | {row['p10_us']:.1f} | {row['p90_us']:.1f} | "
                f"{paired} | {of_medians} | {ok} |"
            )
    lines += ["", f"Target: fused/plain <= {report['target_ratio']} (paired median ratio).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", help="fv-serving checkpoint (default: train a quick one)")
    p.add_argument("--vector", help="forget-vector file (default: random delta for the classifier)")
    p.add_argument("--arch", default="small-cnn", choices=("small-cnn", "resnet18"), help="for the quick training")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session (default 1; 0: ORT's default)")
    p.add_argument("--spinning", action="store_true", help="let ORT threads spin (default off, as in serving)")
    p.add_argument("--tf32", action="store_true", help="cuda: allow TF32 convolutions (default off)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_start = load_average()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        classifier_path = _classifier(args, workdir)
        loaded = load_classifier(classifier_path)
        vector = _vector(args, classifier_path)
        data = load_dataset(loaded.info.get("dataset", "fashion-mnist"), loaded.info.get("data_root"))
        images = to_numpy_images(data.test, torch.arange(max(args.batch_sizes)))
        export_classifier(loaded.model, workdir / "classifier.onnx")
        plain = load_model(workdir / "classifier.onnx")
    clamped = ForgetVector(classifier=vector.classifier, delta=vector.delta, clamp=(0.0, 1.0))
    graphs = {
        "plain": plain,
        "fused": fuse_vector(plain, ForgetVector(classifier=vector.classifier, delta=vector.delta)).graph,
        "fused+clamp": fuse_vector(plain, clamped).graph,
    }
    threads = args.threads or None
    sessions = {
        name: make_session(g, args.provider, threads=threads, spinning=args.spinning, tf32=args.tf32)
        for name, g in graphs.items()
    }
    results: dict[str, Any] = {}
    for batch in args.batch_sizes:
        results[str(batch)] = measure(sessions, images[:batch], args.rounds, seed=batch)
        for name, row in results[str(batch)]["variants"].items():
            ratio = f"  fused/plain {row['ratio_paired_median']:.4f}" if "ratio_paired_median" in row else ""
            print(f"batch {batch:>3} {name:<12} median {row['median_us']:9.1f} us{ratio}")

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            **machine_info(),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "loadavg_start": load_start,
            "loadavg_end": load_average(),
        },
        "provider": args.provider,
        "threads": args.threads or None,
        "spinning": args.spinning,
        "tf32": args.tf32,
        "classifier": {
            "arch": loaded.model.spec.arch,
            "input_shape": list(loaded.model.spec.input_shape),
            "nodes": len(plain.graph.node),
            "trained_by_script": not args.classifier,
        },
        "vector": {"vector_id": vector.vector_id, "given": bool(args.vector)},
        "method": (
            f"{args.rounds} interleaved rounds (shuffled order), blocks of runs per variant, after warm-up; "
            "per-run latency = block time / runs"
        ),
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / "onnx_latency.json", report)
    write_bytes_atomic(args.out_dir / "onnx_latency.md", _markdown(report).encode())
    print(f"wrote {args.out_dir / 'onnx_latency.json'} and {args.out_dir / 'onnx_latency.md'}")
    worst = max(
        r["ratio_paired_median"]
        for res in results.values()
        for r in res["variants"].values()
        if "ratio_paired_median" in r
    )
    print(f"worst fused/plain {worst:.4f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
