#!/usr/bin/env python
"""How much forgotten-class accuracy a caller who knows delta exactly recovers through the gateway.

    python benchmarks/bypass.py [--classifier clf.safetensors --vector v.safetensors] [--count 1000]

The attack: a forget step computes f(x + delta), so a caller who knows delta sends
x - delta and gets f(x), the original answer. Two deployments of the same classifier
and vector, each behind the real gateway, are attacked with the forgotten class's
test images:
  * "with handling" (the default): the graphs sanitise their input (clip to [0,1],
    NaN -> 0) before adding delta, and the gateway refuses pixels outside [0,1];
  * "without handling": graphs without sanitising, a gateway without the range check.
Attacks: honest x; x - delta as is (the gateway may refuse it); clip(x - delta, 0, 1),
the best an attacker can send when out-of-range pixels are refused. Both the ensemble
`unlearned` and the `fused` model are measured. Without --classifier/--vector a small
CNN is trained (5 epochs) and a Pullover vector learned with the defaults first.
Results: benchmarks/results/bypass/bypass.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.machine import load_average, machine_info
from fv_serving.cli.main import main as fv
from fv_serving.datasets import read_arrays
from fv_serving.gateway.config import GatewayConfig, PublicModel
from fv_serving.gateway.process import Gateway
from fv_serving.net import free_port
from fv_serving.onnx.fuse import forget_step_graph, fuse_graph
from fv_serving.onnx.graph import load_model
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.repository import ENSEMBLE_MODEL, FUSED_MODEL, build_repository
from fv_serving.triton.server import TritonServer
from fv_serving.vectors import ForgetVector, load_vector

RESULTS = Path(__file__).resolve().parent / "results" / "bypass"
ATTACKS = ("honest x", "x - delta", "clip(x - delta, 0, 1)")


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    if args.classifier and args.vector:
        return Path(args.classifier), Path(args.vector)
    clf, vec = work / "classifier.safetensors", work / "vector.safetensors"
    assert fv(["train", "--epochs", "5", "--out", str(clf)]) == 0
    assert (
        fv(["learn", "--classifier", str(clf), "--forget-class", args.forget_class, "--no-eval", "--out", str(vec)])
        == 0
    )
    return clf, vec


def build(classifier_onnx: Path, vector: ForgetVector, out: Path, handled: bool) -> Path:
    """A repository whose graphs sanitise (handled) or not; otherwise what `fv triton build --fused` writes."""
    pixel_range = (0.0, 1.0) if handled else None
    classifier = load_model(classifier_onnx)
    step = forget_step_graph(vector, pixel_range=pixel_range)
    fused = fuse_graph(classifier, vector, pixel_range=pixel_range, id_output=True)
    return build_repository(out, classifier, step, fused, max_batch_size=64)


def attack(client: triton_http.InferenceServerClient, model: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy on the images the gateway accepted, and how many it refused (batches of 50)."""
    correct = refused = 0
    for start in range(0, len(images), 50):
        x = np.ascontiguousarray(images[start : start + 50], dtype=np.float32)
        tensor = triton_http.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            logits = client.infer(model, [tensor]).as_numpy("logits")
        except InferenceServerException as exc:
            if str(exc.status()) != "400":
                raise
            refused += len(x)
            continue
        correct += int((logits.argmax(1) == labels[start : start + 50]).sum())
    served = len(images) - refused
    return {
        "refused": refused,
        "served": served,
        "accuracy_served": round(100.0 * correct / served, 2) if served else None,
        "accuracy_all": round(100.0 * correct / len(images), 2),  # a refused request recovers nothing
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="fv-bypass-"))
    clf, vec = prepare(args, work)
    onnx_path = work / "classifier.onnx"
    assert fv(["export", "classifier", "--classifier", str(clf), "--out", str(onnx_path)]) == 0
    vector = load_vector(vec)
    forgotten = int(vector.forget["classes"][0])
    data = read_arrays("fashion-mnist")
    mask = data.test_labels == forgotten
    x = data.test_images[mask][: args.count].astype(np.float32) / 255.0
    labels = data.test_labels[mask][: args.count]
    sent = {ATTACKS[0]: x, ATTACKS[1]: x - vector.delta, ATTACKS[2]: np.clip(x - vector.delta, 0.0, 1.0)}
    out_of_range = float(np.mean((sent[ATTACKS[1]] < 0) | (sent[ATTACKS[1]] > 1)))
    rows: dict[str, Any] = {}
    for handled in (True, False):
        label = "with handling" if handled else "without handling"
        repo = build(onnx_path, vector, work / f"repo-{int(handled)}", handled)
        with TritonServer(repo, [ENSEMBLE_MODEL, FUSED_MODEL]) as server:
            models = tuple(
                PublicModel.from_model_config(
                    mcfg.read_config(repo / name), pixel_range=(0.0, 1.0) if handled else None
                )
                for name in (ENSEMBLE_MODEL, FUSED_MODEL)
            )
            config = GatewayConfig(
                host="127.0.0.1",
                port=free_port("127.0.0.1"),
                upstreams=(f"127.0.0.1:{server.state.http_port}",),
                models=models,
                run_dir=str(work / f"gateway-{int(handled)}"),
            )
            with Gateway(config) as gateway:
                client = triton_http.InferenceServerClient(gateway.url.removeprefix("http://"))
                for model in (ENSEMBLE_MODEL, FUSED_MODEL):
                    for name, images in sent.items():
                        rows[f"{label} | {model} | {name}"] = attack(client, model, images, labels)
                        print(f"{label:<17} {model:<10} {name:<22} {rows[f'{label} | {model} | {name}']}")
    # the bare classifier, for reference (not reachable through the gateway)
    with TritonServer(build(onnx_path, vector, work / "repo-ref", True), ["classifier"]) as server:
        direct = triton_http.InferenceServerClient(server.http_url.removeprefix("http://"))
        rows["bare classifier (not exposed) | classifier | honest x"] = attack(direct, "classifier", x, labels)
    return {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "command": "python benchmarks/bypass.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": {**machine_info(), "load_average": load_average()},
        },
        "vector": {"id": vector.vector_id, "forgotten_class": forgotten, "l2": round(vector.l2_norm, 3)},
        "images": len(x),
        "pixels_of_x_minus_delta_outside_0_1": round(100 * out_of_range, 2),
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Bypass through the gateway: a caller who knows delta exactly",
        "",
        f"- date (UTC): {report['meta']['date']}; command: `{report['meta']['command']}`",
        f"- machine: {report['meta']['machine']['cpu']} ({report['meta']['machine']['cpu_count']} CPUs), "
        f"load {report['meta']['machine']['load_average']}",
        f"- vector {report['vector']['id']} forgets class {report['vector']['forgotten_class']}; "
        f"{report['images']} test images of that class; {report['pixels_of_x_minus_delta_outside_0_1']}% of the "
        "pixels of x - delta fall outside [0,1]",
        "",
        "| deployment | model | sent | refused | accuracy on the forgotten class (all sent) |",
        "|---|---|---|---|---|",
    ]
    for key, row in report["rows"].items():
        deployment, model, sent = key.split(" | ")
        lines.append(f"| {deployment} | {model} | {sent} | {row['refused']} | {row['accuracy_all']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier", help="checkpoint (with --vector); default: train one")
    parser.add_argument("--vector", help="vector file learned for that classifier")
    parser.add_argument("--forget-class", default="Pullover", help="class to forget when learning here")
    parser.add_argument("--count", type=int, default=1000, help="test images of the forgotten class")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args)
    write_json_atomic(args.out_dir / "bypass.json", report)
    write_bytes_atomic(args.out_dir / "bypass.md", markdown(report).encode())
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
