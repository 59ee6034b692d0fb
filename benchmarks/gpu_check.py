"""GPU checks: onnxruntime-gpu (CUDA EP) parity, and the PyTorch CUDA path.

Two steps, because the GPU machine has no Fashion-MNIST and no network:

    # on any machine, after `make demo` (uses runs/demo/):
    python benchmarks/gpu_check.py prepare --out runs/gpucheck
    # on the CUDA machine (onnxruntime-gpu installed instead of onnxruntime):
    python benchmarks/gpu_check.py run --artifacts runs/gpucheck --out-dir benchmarks/results/gpu

`run` measures, on the same real test images:
  * classifier.onnx and fused.onnx on the CUDA EP vs the CPU EP vs PyTorch (CPU and CUDA);
  * accuracy of the forgotten class and of the others through each, and UA/RA-style agreement;
  * the classifier check of `fuse_vector` run on the CUDA EP (probe logits within tolerance);
and writes JSON + Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def prepare(out: Path, demo: Path, count: int) -> None:
    import torch

    from fv_serving.data import load_dataset
    from fv_serving.models import load_classifier
    from fv_serving.onnx import fuse_vector, save_model
    from fv_serving.onnx.export import export_classifier
    from fv_serving.vectors import load_vector

    out.mkdir(parents=True, exist_ok=True)
    loaded = load_classifier(demo / "classifier.safetensors")
    vector = load_vector(demo / "pullover.safetensors")
    export_classifier(loaded.model, out / "classifier.onnx")
    import onnx

    save_model(fuse_vector(onnx.load(out / "classifier.onnx"), vector).graph, out / "fused.onnx")
    data = load_dataset("fashion-mnist")
    idx = torch.arange(count)
    np.save(out / "images_u8.npy", data.test.images[idx].numpy())
    np.save(out / "labels.npy", data.test.labels[idx].numpy())
    for name in ("classifier.safetensors", "pullover.safetensors"):
        (out / name).write_bytes((demo / name).read_bytes())
    print(f"wrote {out}")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def run(artifacts: Path, out_dir: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch")
    torch.zeros(1, device="cuda")  # loads the CUDA libraries the CUDA EP links against
    getattr(ort, "preload_dlls", lambda **_: None)()

    from fv_serving.models import PerturbedClassifier, load_classifier
    from fv_serving.onnx import fuse_vector, make_session
    from fv_serving.vectors import load_vector

    images = np.load(artifacts / "images_u8.npy").astype(np.float32) / 255.0
    labels = np.load(artifacts / "labels.npy")
    vector = load_vector(artifacts / "pullover.safetensors")
    forgotten = int(vector.forget["classes"][0])
    logits: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for graph in ("classifier", "fused"):
        for provider in ("cpu", "cuda"):
            session = make_session(artifacts / f"{graph}.onnx", provider)
            name = session.get_inputs()[0].name
            session.run(None, {name: images[:8]})  # warm-up (CUDA: kernels, cuDNN search)
            start = time.perf_counter()
            logits[f"{graph}/ort-{provider}"] = session.run(None, {name: images})[0]
            timings[f"{graph}/ort-{provider}"] = time.perf_counter() - start
    for device in ("cpu", "cuda"):
        model = load_classifier(artifacts / "classifier.safetensors", device=device).model
        g = PerturbedClassifier(model, torch.from_numpy(vector.delta).to(device), vector.clamp)
        with torch.no_grad():
            x = torch.from_numpy(images).to(device)
            logits[f"classifier/torch-{device}"] = model(x).float().cpu().numpy()
            logits[f"fused/torch-{device}"] = g(x).float().cpu().numpy()

    def accuracy(key: str, mask: np.ndarray) -> float:
        return float(100.0 * np.mean(logits[key].argmax(1)[mask] == labels[mask]))

    is_forgotten = labels == forgotten
    # fuse_vector's classifier check (probe logits) running on the CUDA EP
    fuse_vector(onnx.load(artifacts / "classifier.onnx"), vector, provider="cuda")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})",
        "images": len(images),
        "forgotten_class": forgotten,
        "max_abs_diff": {
            "classifier: CUDA EP vs CPU EP": _max_diff(logits["classifier/ort-cuda"], logits["classifier/ort-cpu"]),
            "classifier: CUDA EP vs PyTorch CUDA": _max_diff(
                logits["classifier/ort-cuda"], logits["classifier/torch-cuda"]
            ),
            "classifier: CPU EP vs PyTorch CPU": _max_diff(
                logits["classifier/ort-cpu"], logits["classifier/torch-cpu"]
            ),
            "fused: CUDA EP vs CPU EP": _max_diff(logits["fused/ort-cuda"], logits["fused/ort-cpu"]),
            "fused: CUDA EP vs PyTorch CUDA f(x+delta)": _max_diff(
                logits["fused/ort-cuda"], logits["fused/torch-cuda"]
            ),
        },
        "accuracy": {
            key: {"forgotten class": accuracy(key, is_forgotten), "other classes": accuracy(key, ~is_forgotten)}
            for key in sorted(logits)
        },
        "prediction_agreement_cuda_vs_cpu_ep": {
            graph: float(100.0 * np.mean(logits[f"{graph}/ort-cuda"].argmax(1) == logits[f"{graph}/ort-cpu"].argmax(1)))
            for graph in ("classifier", "fused")
        },
        "seconds_for_all_images": timings,
        "fuse_vector_check_on_cuda": "passed",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU check ({result['date']})",
        "",
        f"Machine: {result['machine']}.",
        f"Command: `{result['command']}`.",
        "",
        f"{result['images']} real Fashion-MNIST test images; forgotten class {forgotten}.",
        "",
        "| comparison | max abs logit difference |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2e} |" for k, v in result["max_abs_diff"].items()]
    lines += ["", "| model / runtime | forgotten class acc (%) | other classes acc (%) |", "|---|---|---|"]
    lines += [f"| {k} | {v['forgotten class']:.2f} | {v['other classes']:.2f} |" for k, v in result["accuracy"].items()]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=Path("runs/gpucheck"))
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="folder of `make demo` outputs")
    p.add_argument("--count", type=int, default=2000)
    r = sub.add_parser("run")
    r.add_argument("--artifacts", type=Path, default=Path("runs/gpucheck"))
    r.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/gpu"))
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.demo, args.count)
    else:
        run(args.artifacts, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
