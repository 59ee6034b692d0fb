#!/usr/bin/env python
"""Serving benchmark over HTTP on a real tritonserver: ensemble vs fused vs bare classifier, and live switches.

    python benchmarks/serving.py [--classifier clf.safetensors] [--vector v.safetensors]
        [--batch-sizes 1 32] [--rounds 30] [--requests 20] [--switches 5] [--load-threads 4]

Without --classifier a small CNN is trained on a Fashion-MNIST subset first (weights
do not change latency; the graph is the real exported one). Without --vector a
random delta with that classifier's fingerprint is used. The checkpoint is exported
to ONNX as `fv triton build --classifier` does, and the repository is built by
`build_deployment` (runtime python: the embedded default) with `fused`. The server
locks model control behind its key (the default); the measuring clients send no key,
as any inference client (inference is open), and the switches go through
`server.client()`, which carries it.

Latency method: one HTTP client, sequential requests (`infer_raw`: no client-side
checks, the same for every variant) of real test images; the ensemble and the fused
model also answer the `vector_id` string per image, the bare classifier does not. Warm-up, then `rounds`
rounds; each round runs a block of `requests` requests of every (model, batch) pair
in a freshly shuffled order (interleaved, so load drift on a shared machine hits all
variants alike). Reported per pair: p50 and p99 of per-request latency, throughput
(images / summed latency of one sequential client), and ensemble/fused as the
median of per-round p50 ratios (paired) next to the ratio of overall p50s.

Switch method: `switches` switches while idle, then `switches` while `load-threads`
threads (half HTTP, half gRPC) send batches of 4 through the ensemble; the switch
time is `fv switch`'s own: from the request (before validation) to the first
ensemble answer computed with the new vector and naming it. Every answer under load
must equal one of the vectors' outputs (precomputed in onnxruntime) and name that
vector's id; failed requests counted.

A quick check that everything runs (minutes, not a measurement):
    python benchmarks/serving.py --train-size 500 --batch-sizes 1 --rounds 1 --requests 2 --switches 1 \
        --out-dir /tmp/fv-serving-bench

Results: benchmarks/results/serving/serving.{json,md} (date, machine, command).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.machine import load_average, machine_info
from fv_serving.config import TrainConfig
from fv_serving.data import SplitSpec, load_dataset, to_numpy_images
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.models import load_classifier
from fv_serving.onnx.export import export_classifier
from fv_serving.onnx.fuse import forget_step_graph
from fv_serving.onnx.graph import OFF_ID, load_model
from fv_serving.pipeline import train_model
from fv_serving.triton import journal
from fv_serving.triton.build import build_deployment
from fv_serving.triton.client import TritonClient
from fv_serving.triton.deployment import deployed_classifier
from fv_serving.triton.repository import CLASSIFIER_MODEL, ENSEMBLE_MODEL, FUSED_MODEL
from fv_serving.triton.server import TritonServer
from fv_serving.triton.switch import SwitchResult, ensemble_reference, switch_vector
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import ForgetVector, load_vector, save_vector

RESULTS = Path(__file__).resolve().parent / "results" / "serving"
MODELS = (ENSEMBLE_MODEL, FUSED_MODEL, CLASSIFIER_MODEL)
TARGET_RATIO = 1.3  # ensemble p50 / fused p50 at batch 32
TARGET_SWITCH_S = 3.0


# -- inputs -------------------------------------------------------------------------------------------


def _classifier(args: argparse.Namespace, workdir: Path) -> Path:
    if args.classifier:
        return Path(args.classifier)
    path = workdir / "classifier.safetensors"
    print(f"training a quick small-cnn on {args.train_size} Fashion-MNIST images (1 epoch) ...", flush=True)
    split = SplitSpec(seed=0, val_size=1000, train_size=args.train_size)
    train_model("fashion-mnist", path, config=TrainConfig(epochs=1, seed=0), split=split)
    return path


def _vectors(args: argparse.Namespace, classifier: Path, workdir: Path) -> dict[str, Path | None]:
    """Three things to switch between: the vector, a second vector of the same classifier, off."""
    if args.vector:
        first = load_vector(args.vector)
    else:
        model = load_classifier(classifier).model
        spec = model.spec
        fingerprint = ClassifierFingerprint.of(model, spec.input_shape, spec.num_classes)
        delta = np.random.default_rng(0).normal(0.0, 0.1, spec.input_shape).astype(np.float32)
        first = ForgetVector(classifier=fingerprint, delta=delta)
    second = ForgetVector(classifier=first.classifier, delta=-0.5 * first.delta, clamp=first.clamp)
    return {
        "A": save_vector(first, workdir / "a.safetensors"),
        "B": save_vector(second, workdir / "b.safetensors"),
        "off": None,
    }


def _choice(path: Path | None) -> VectorChoice:
    return VectorChoice(vector=path) if path is not None else VectorChoice(off=True)


# -- latency ------------------------------------------------------------------------------------------


def _block(client: TritonClient, model: str, feed: dict[str, np.ndarray], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        client.infer_raw(model, feed)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def measure_latency(url: str, images: np.ndarray, batch_sizes: list[int], rounds: int, requests: int) -> dict[str, Any]:
    pairs = [(m, b) for b in batch_sizes for m in MODELS]
    times: dict[tuple[str, int], list[float]] = {p: [] for p in pairs}
    round_p50: dict[tuple[str, int], list[float]] = {p: [] for p in pairs}
    rng = np.random.default_rng(0)
    with TritonClient(url) as client:
        for model, batch in pairs:  # warm-up
            _block(client, model, {"image": images[:batch]}, 20)
        for _ in range(rounds):
            for i in rng.permutation(len(pairs)):
                model, batch = pairs[i]
                block = _block(client, model, {"image": images[:batch]}, requests)
                times[pairs[i]] += block
                round_p50[pairs[i]].append(float(np.median(block)))
    results: dict[str, Any] = {}
    for batch in batch_sizes:
        rows = {}
        for model in MODELS:
            t = np.array(times[(model, batch)])
            rows[model] = {
                "p50_ms": float(np.percentile(t, 50)),
                "p99_ms": float(np.percentile(t, 99)),
                "mean_ms": float(t.mean()),
                "throughput_img_s": float(batch * len(t) / (t.sum() / 1e3)),
                "requests": len(t),
            }
        ens, fused = np.array(round_p50[(ENSEMBLE_MODEL, batch)]), np.array(round_p50[(FUSED_MODEL, batch)])
        rows["ensemble_over_fused"] = {
            "paired_median_of_round_p50_ratios": float(np.median(ens / fused)),
            "ratio_of_p50s": rows[ENSEMBLE_MODEL]["p50_ms"] / rows[FUSED_MODEL]["p50_ms"],
        }
        results[str(batch)] = rows
    return results


# -- what the hardening costs ------------------------------------------------------------------------


def strip_ids(repository: Path, out: Path) -> Path:
    """A copy of `repository` whose forget step and ensemble answer without the vector_id output: the
    ensemble as it was before answers named their vector (the reference the hardening is priced against)."""
    import shutil

    from onnx.utils import extract_model

    from fv_serving.onnx.graph import ID_OUTPUT, STEP_INPUT, STEP_OUTPUT
    from fv_serving.triton import model_config as mcfg
    from fv_serving.triton.repository import FORGET_STEP_MODEL, confirmed_version

    shutil.copytree(repository, out)
    version = out / FORGET_STEP_MODEL / str(confirmed_version(out))
    extract_model(str(version / "model.onnx"), str(version / "model.onnx"), [STEP_INPUT], [STEP_OUTPUT])
    for name in (FORGET_STEP_MODEL, ENSEMBLE_MODEL):
        config = mcfg.read_config(out / name)
        kept = [o for o in config.output if o.name != ID_OUTPUT]
        del config.output[:]
        config.output.extend(kept)
        for step in config.ensemble_scheduling.step:
            step.output_map.pop(ID_OUTPUT, None)
        mcfg.write_config(out / name, config)
    return out


def measure_hardening_cost(
    repository: Path, workdir: Path, images: np.ndarray, batch_sizes: list[int], rounds: int, requests: int
) -> dict[str, Any]:
    """p50 of the ensemble without the id output (direct), with it (direct), and with it through the gateway."""
    from fv_serving.gateway.config import GatewayConfig, PublicModel
    from fv_serving.gateway.process import Gateway
    from fv_serving.net import free_port
    from fv_serving.triton import model_config as mcfg

    plain_repo = strip_ids(repository, workdir / "repo-no-ids")
    with (
        TritonServer(repository, [ENSEMBLE_MODEL], run_dir=workdir / "run-ids") as hardened,
        TritonServer(plain_repo, [ENSEMBLE_MODEL], run_dir=workdir / "run-plain") as plain,
    ):
        config = GatewayConfig(
            host="127.0.0.1",
            port=free_port("127.0.0.1"),
            upstreams=(f"127.0.0.1:{hardened.state.http_port}",),
            models=(PublicModel.from_model_config(mcfg.read_config(repository / ENSEMBLE_MODEL)),),
            run_dir=str(workdir / "gateway"),
        )
        with Gateway(config) as gateway:
            variants = {
                "ensemble, no id output (direct)": plain.http_url,
                "ensemble + id output (direct)": hardened.http_url,
                "ensemble + id output, through the gateway": gateway.url,
            }
            clients = {name: TritonClient(url) for name, url in variants.items()}
            pairs = [(v, b) for b in batch_sizes for v in variants]
            times: dict[tuple[str, int], list[float]] = {p: [] for p in pairs}
            rng = np.random.default_rng(1)
            for variant, batch in pairs:
                _block(clients[variant], ENSEMBLE_MODEL, {"image": images[:batch]}, 20)
            for _ in range(rounds):
                for i in rng.permutation(len(pairs)):
                    variant, batch = pairs[i]
                    times[pairs[i]] += _block(clients[variant], ENSEMBLE_MODEL, {"image": images[:batch]}, requests)
            for client in clients.values():
                client.close()
    names = list(variants)
    out: dict[str, Any] = {}
    for batch in batch_sizes:
        p50 = {v: float(np.percentile(times[(v, batch)], 50)) for v in names}
        out[str(batch)] = {
            "p50_ms": p50,
            "hardened_over_plain": p50[names[2]] / p50[names[0]],
            "hardened_minus_plain_ms": p50[names[2]] - p50[names[0]],
            "requests": len(times[(names[0], batch)]),
        }
    return out


# -- switches -----------------------------------------------------------------------------------------


def measure_switches(
    server: TritonServer, vectors: dict[str, Path | None], images: np.ndarray, n: int, load_threads: int
) -> dict[str, Any]:
    repo = server.repository
    classifier = deployed_classifier(repo)
    batch = images[:4]
    shape = tuple(int(d) for d in images.shape[1:])
    expected = {
        key: ensemble_reference(
            classifier, forget_step_graph(load_vector(p) if p else None, shape if p is None else None), batch
        )
        for key, p in vectors.items()
    }
    ids = {key: load_vector(p).vector_id if p else OFF_ID for key, p in vectors.items()}
    keys = list(vectors)
    logged = len(journal.read(repo))

    def run(count: int, start: int) -> list[SwitchResult]:
        out = []
        with server.client() as operator:  # switching needs the model-control key
            for i in range(count):
                key = keys[(start + i + 1) % len(keys)]
                out.append(switch_vector(repo, operator, _choice(vectors[key]), log_path=server.log_path))
        return out

    idle = run(n, 0)
    counts = {"ok": 0, "failed": 0, "unexpected": 0, "misnamed": 0}
    lock = threading.Lock()
    done = threading.Event()

    def hammer(i: int) -> None:
        url = server.http_url if i % 2 == 0 else server.grpc_url
        with TritonClient(url) as client:  # a plain inference client: no key
            while not done.is_set():
                try:
                    out, named = client.infer_with_ids(ENSEMBLE_MODEL, batch)
                except Exception:
                    with lock:
                        counts["failed"] += 1
                    continue
                hits = [key for key, e in expected.items() if np.allclose(out, e, rtol=0, atol=1e-5)]
                outcome = "unexpected" if not hits else ("ok" if named == [ids[hits[0]]] * len(out) else "misnamed")
                with lock:
                    counts[outcome] += 1

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(load_threads)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        loaded = run(n, n)
        time.sleep(0.5)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=60)

    def summary(results: list[SwitchResult]) -> dict[str, Any]:
        serving = [r.serving_s for r in results]
        return {
            "switches": len(results),
            "serving_s": [round(s, 3) for s in serving],
            "serving_s_median": float(np.median(serving)),
            "serving_s_max": float(np.max(serving)),
            "load_model_s_median": float(np.median([r.load_s for r in results])),
            "classifier_reloaded": sum(r.classifier.reloaded for r in results),
            "warnings": sorted({w for r in results for w in r.warnings}),
        }

    confirmed = sum(e["event"] == "confirmed" for e in journal.read(repo)[logged:])
    return {
        "idle": summary(idle),
        "under_load": {**summary(loaded), "load_threads": load_threads, **counts},
        "journal_confirmed": confirmed,
    }


# -- report -------------------------------------------------------------------------------------------


TARGET_COST_RATIO = 1.10  # gateway + id output over the plain ensemble, p50 at the largest batch
TARGET_COST_MS = 0.3  # the same at batch 1, in milliseconds


def _cost_targets(cost: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    if "1" in cost:
        added = cost["1"]["hardened_minus_plain_ms"]
        targets.append(
            {
                "what": f"gateway + id output add <= {TARGET_COST_MS} ms to p50 at batch 1",
                "value": round(added, 3),
                "met": added <= TARGET_COST_MS,
            }
        )
    largest = max(cost, key=int)
    if largest != "1":
        ratio = cost[largest]["hardened_over_plain"]
        targets.append(
            {
                "what": f"gateway + id output / plain ensemble, p50 at batch {largest} <= {TARGET_COST_RATIO}",
                "value": round(ratio, 3),
                "met": ratio <= TARGET_COST_RATIO,
            }
        )
    return targets


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Serving benchmark: ensemble vs fused vs bare classifier, and live switches (HTTP)",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), {m['platform']}; load average {m['loadavg_start']} at "
        f"start, {m['loadavg_end']} at end (the machine is shared: other jobs add noise)",
        f"- server: {report['server']}",
        f"- method: {report['method']}",
        "",
        "| batch | model | p50 (ms) | p99 (ms) | throughput (img/s, 1 client) | requests |",
        "|---|---|---|---|---|---|",
    ]
    for batch, rows in report["latency"].items():
        for model in MODELS:
            r = rows[model]
            lines.append(
                f"| {batch} | {model} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_img_s']:.0f} | "
                f"{r['requests']} |"
            )
    lines += ["", "| batch | ensemble / fused: paired median of round p50 ratios | ratio of p50s |", "|---|---|---|"]
    for batch, rows in report["latency"].items():
        r = rows["ensemble_over_fused"]
        lines.append(f"| {batch} | {r['paired_median_of_round_p50_ratios']:.3f} | {r['ratio_of_p50s']:.3f} |")
    lines += [
        "",
        "What the hardening costs (same interleaved method; the plain ensemble has no id output, as before answers "
        "named their vector):",
        "",
        "| batch | variant | p50 (ms) |",
        "|---|---|---|",
    ]
    for batch, row in report["hardening_cost"].items():
        lines += [f"| {batch} | {variant} | {p50:.3f} |" for variant, p50 in row["p50_ms"].items()]
        lines.append(
            f"| {batch} | gateway + id over plain | x{row['hardened_over_plain']:.3f} "
            f"(+{row['hardened_minus_plain_ms']:.3f} ms) |"
        )
    s = report["switches"]
    lines += [
        "",
        "| switches | count | request -> new vector serving: median (s) | max (s) | load_model median (s) |"
        " classifier reloaded |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("idle", "under_load"):
        r = s[name]
        lines.append(
            f"| {name} | {r['switches']} | {r['serving_s_median']:.2f} | {r['serving_s_max']:.2f} | "
            f"{r['load_model_s_median']:.2f} | {r['classifier_reloaded']} |"
        )
    load = s["under_load"]
    lines += [
        "",
        f"Under load: {load['ok'] + load['failed'] + load['unexpected'] + load['misnamed']} requests from "
        f"{load['load_threads']} threads during the switches: {load['failed']} failed, {load['unexpected']} answers "
        f"matching no vector, {load['misnamed']} naming another vector than the one that computed them. "
        f"Journal: {s['journal_confirmed']} confirmed switches recorded.",
        "",
        "Targets (embedded runtime):",
    ]
    lines += [f"- {t['what']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", help="fv-serving checkpoint (default: train a quick one)")
    p.add_argument("--vector", help="forget-vector file (default: random delta for the classifier)")
    p.add_argument("--train-size", type=int, default=2000, help="images for the quick training")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--requests", type=int, default=20, help="requests per (model, batch) block")
    p.add_argument("--switches", type=int, default=5, help="switches idle, and again under load")
    p.add_argument("--load-threads", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_start = load_average()

    with tempfile.TemporaryDirectory(prefix="fv-bench-serving-") as tmp:
        workdir = Path(tmp)
        classifier = _classifier(args, workdir)
        vectors = _vectors(args, classifier, workdir)
        loaded = load_classifier(classifier)
        info = loaded.info
        data = load_dataset(info.get("dataset", "fashion-mnist"), info.get("data_root"))
        images = to_numpy_images(data.test, torch.arange(max(args.batch_sizes)))
        export_classifier(loaded.model, workdir / "classifier.onnx")  # as `fv triton build --classifier` does
        report = build_deployment(
            workdir / "repo",
            _choice(vectors["A"]),
            load_model(workdir / "classifier.onnx"),
            classifier_source=str(classifier.absolute()),
            class_names=loaded.model.spec.class_names,
            fused=True,
            max_batch_size=max(64, max(args.batch_sizes)),
        )
        with TritonServer(report.repository, list(MODELS), run_dir=workdir / "run") as server:
            print(f"tritonserver ready in {server.startup_s:.1f} s; measuring latency ...", flush=True)
            latency = measure_latency(server.http_url, images, args.batch_sizes, args.rounds, args.requests)
            print("measuring switches ...", flush=True)
            switches = measure_switches(server, vectors, images, args.switches, args.load_threads)
        print("measuring what the gateway and the id output cost ...", flush=True)
        cost = measure_hardening_cost(report.repository, workdir, images, args.batch_sizes, args.rounds, args.requests)

    largest = str(max(args.batch_sizes))
    ratio = latency[largest]["ensemble_over_fused"]["paired_median_of_round_p50_ratios"]
    load = switches["under_load"]
    worst_switch = max(switches["idle"]["serving_s_max"], load["serving_s_max"])
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            **machine_info(),
            "loadavg_start": load_start,
            "loadavg_end": load_average(),
        },
        "server": (
            f"tritonserver bundled in nvidia-pytriton {version('nvidia-pytriton')}, runtime python (ORT runner, "
            f"onnxruntime {version('onnxruntime')}, 1 intra-op thread, 1 instance per model), tritonclient "
            f"{version('tritonclient')}"
        ),
        "method": (
            f"{args.rounds} interleaved rounds x {args.requests} sequential HTTP requests per (model, batch), "
            "after 20 warm-up requests each; real Fashion-MNIST test images"
        ),
        "latency": latency,
        "switches": switches,
        "hardening_cost": cost,
        "targets": [
            {
                "what": f"ensemble p50 / fused p50 at batch {largest} <= {TARGET_RATIO}",
                "value": round(ratio, 3),
                "met": ratio <= TARGET_RATIO,
            },
            {
                "what": f"switch request -> new vector serving <= {TARGET_SWITCH_S} s (worst)",
                "value": round(worst_switch, 3),
                "met": worst_switch <= TARGET_SWITCH_S,
            },
            *_cost_targets(cost),
            {
                "what": "0 failed requests during switches under load (and every answer matches and names a vector)",
                "value": load["failed"],
                "met": load["failed"] == 0 and load["unexpected"] == 0 and load["misnamed"] == 0,
            },
        ],
    }
    markdown = _markdown(result)
    write_json_atomic(args.out_dir / "serving.json", result)
    write_bytes_atomic(args.out_dir / "serving.md", markdown.encode())
    print(markdown)
    print(f"wrote {args.out_dir / 'serving.json'} and {args.out_dir / 'serving.md'}")
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
