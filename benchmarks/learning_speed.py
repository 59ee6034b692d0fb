"""What a forget vector costs to learn, at equal quality: the fast preset against the previous defaults.

One run, full Fashion-MNIST, the library calls the CLI uses:
  1. the yardstick: train the classifier (`fv train` defaults) and time it;
  2. learn one class-wise vector per --classes with each row of ROWS (`fast`, the
     default; `epochs`, the previous default; the fast preset with a stricter retain
     margin and twice its step budget; the fast preset with a quarter of each batch
     from the at-risk retain images, `fv_serving.sampling`), time each learning run (stopping-rule checks
     included, evaluation not), and measure UA / RA / TA / MIA-Efficacy against the
     original model. Acceptance, per vector of the fast preset: learning time at most
     0.1x the classifier's training time, UA >= 99, MIA >= 99, RA and TA within 1 point;
  3. unless --no-processes: torch.distributed through the CLI (`--nproc`, gloo, one
     thread per process): `fv learn` of the first class on 1 vs 2 processes
     (data-parallel; the two vectors' largest difference is recorded) and `fv bank`
     of all classes on 1 vs 2 processes (class-parallel).

    python benchmarks/learning_speed.py        # ~40 min on 2 CPU cores
    python benchmarks/learning_speed.py --rows fast fast_at_risk --no-processes --classes 0 1 2 3 4 5 6 7 8 9 \
        --out-dir benchmarks/results/learning_speed_all --work-dir runs/learning_speed_all   # ~35 min
Writes <out-dir>/{learning_speed.json, learning_speed.md, learning_speed.png} (the PNG: RA
points lost per class by each row, against the 1-point line).

How the fast preset's settings were chosen (validation hold-out only; never the test
set, never the reported classes): `python benchmarks/learning_speed.py --tune` learns
the vectors of --tune-classes for a small grid and records, per setting, the steps and
seconds to meet the stopping rule (forget monitor and hold-out accuracy) and whether it
was met; it writes tuning.{json,md} beside the results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from fv_serving.bench.machine import load_average
from fv_serving.bench.record import torch_machine_line, torch_provenance, vector_settings, write_report
from fv_serving.bench.report import ordered
from fv_serving.config import METRIC_NAMES, VectorConfig
from fv_serving.data import ForgetSpec
from fv_serving.metrics import evaluate_unlearning
from fv_serving.models import PerturbedClassifier
from fv_serving.pipeline import Workspace, learn_vector, open_workspace, train_model
from fv_serving.plots import plot_drops_per_class
from fv_serving.vectors import load_bank, load_vector


class Row(NamedTuple):
    name: str
    stem: str  # file names in --work-dir: <stem>_<class>.safetensors
    config: VectorConfig


# The two presets, and what holding the hold-out to half a point costs (a stricter rule
# with twice the step budget), for users who need RA closer to the original.
ROWS = (
    Row("fast", "fast", VectorConfig.preset("fast")),
    Row("epochs", "epochs", VectorConfig.preset("epochs")),
    Row("fast, retain margin 0.5", "fast_margin05", replace(VectorConfig(), retain_margin=0.5, max_epochs=30)),
    # A quarter of each batch from the retain images a perturbation flips first (`--at-risk-share 0.25`).
    Row("fast, at-risk quarter", "fast_at_risk", replace(VectorConfig(), at_risk_share=0.25)),
)
RATIO_LIMIT = 0.1  # acceptance: learning time / classifier training time
# The tuning grid: the fast preset's neighbours, one knob at a time (`--tune`).
TUNING_GRID: dict[str, dict[str, Any]] = {
    "fast (chosen)": {},
    "SGD lr 0.2 (the authors' optimiser)": {"optimizer": "sgd", "lr": 0.2},
    "Adam lr 0.003": {"lr": 0.003},
    "Adam lr 0.03": {"lr": 0.03},
    "batch 64": {"batch_size": 64},
    "batch 256": {"batch_size": 256},
    "a quarter of each batch from D_f": {"forget_fraction": 0.25},
    "flips (the authors' augmentation)": {"augment": True},
    "beta 3": {"beta": 3.0},
}


def _metrics(metrics: Any) -> dict[str, float]:
    return {k: round(float(getattr(metrics, k)), 2) for k in METRIC_NAMES}


def learn_row(ws: Workspace, c: int, config: VectorConfig, out: Path, train_seconds: float) -> dict[str, Any]:
    """Learn, time and evaluate one class vector; judge it against the acceptance thresholds."""
    spec = ForgetSpec(classes=(c,))
    start = time.perf_counter()
    vector, metrics = learn_vector(ws, spec, out, config=config, evaluate=False)
    seconds = time.perf_counter() - start
    split = ws.forget_split(spec)
    original, _ = evaluate_unlearning(ws.model, ws.data, split)
    unlearned, _ = evaluate_unlearning(PerturbedClassifier(ws.model, torch.from_numpy(vector.delta)), ws.data, split)
    row = {
        "class": ws.data.class_names[c],
        "seconds": round(seconds, 2),
        "ratio_to_training": round(seconds / train_seconds, 4),
        "steps": metrics["stopping"]["steps_run"],
        "images_seen": metrics["stopping"]["steps_run"] * config.batch_size,
        "stopping": metrics["stopping"],
        "delta_l2": round(vector.l2_norm, 3),
        "original": _metrics(original),
        "vector": _metrics(unlearned),
        "RA_drop": round(original.RA - unlearned.RA, 2),
        "TA_drop": round(original.TA - unlearned.TA, 2),
        # What the stopping rule saw: the whole hold-out's drop when the run stopped.
        "holdout_drop": round(metrics["stopping"]["holdout_acc_original"] - metrics["stopping"]["holdout_acc"], 2),
    }
    row["accepted"] = bool(
        row["ratio_to_training"] <= RATIO_LIMIT
        and unlearned.UA >= 99
        and unlearned.MIA >= 99
        and row["RA_drop"] <= 1
        and row["TA_drop"] <= 1
    )
    return row


def _fv(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fv_serving.cli.main", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"fv {' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start, done


def processes(classifier: Path, classes: list[int], work: Path) -> dict[str, Any]:
    """`fv learn` and `fv bank` on 1 vs 2 processes, end to end (process start and data loading included)."""
    out: dict[str, Any] = {"learn": {}, "bank": {}}
    first = str(classes[0])
    for n in ("1", "2"):
        path = work / f"learn_{n}proc.safetensors"
        wall, _ = _fv("learn", "--classifier", str(classifier), "--forget-class", first, "--no-eval",
                      "--nproc", n, "--out", str(path))  # fmt: skip
        stop = load_vector(path).metrics["stopping"]
        out["learn"][n] = {
            "wall_seconds": round(wall, 1),
            "learning_seconds": stop["seconds"],
            "steps": stop["steps_run"],
        }
        bank_path = work / f"bank_{n}proc.safetensors"
        wall, _ = _fv("bank", "--classifier", str(classifier), "--classes", *map(str, classes),
                      "--nproc", n, "--out", str(bank_path))  # fmt: skip
        per_class = load_bank(bank_path).metrics["per_class_stopping"]
        out["bank"][n] = {
            "wall_seconds": round(wall, 1),
            "learning_seconds_per_class": {c: r["seconds"] for c, r in per_class.items()},
        }
    one, two = (load_vector(work / f"learn_{n}proc.safetensors").delta for n in ("1", "2"))
    out["learn_max_abs_difference"] = float(np.abs(one - two).max())
    out["learn_max_abs_value"] = float(np.abs(one).max())
    banks = [load_bank(work / f"bank_{n}proc.safetensors").vectors for n in ("1", "2")]
    out["bank_max_abs_difference"] = float(np.abs(banks[0] - banks[1]).max())
    return out


def markdown(result: dict[str, Any]) -> str:
    # The JSON file sorts keys: rows take their order from ROWS.
    presets = {p: result["presets"][p] for p in ordered(list(result["presets"]), [row.name for row in ROWS])}
    train = result["classifier"]
    lines = [
        f"# Forget-vector learning cost on Fashion-MNIST ({result['date']})",
        "",
        torch_machine_line(result["machine"]) + " (the cores are shared with other work: compare times within "
        "this run).",
        f"Command: `{result['command']}`. Wall time {result['seconds']:.0f} s.",
        "",
        f"Yardstick: training the classifier (`fv train` defaults, {train['config']['epochs']} epochs on "
        f"{train['train_size']} images) took **{train['seconds']:.1f} s**; "
        f"test accuracy {train['accuracy']['test']:.2f}%.",
        "",
        "| preset | class | time (s) | x training | steps | images seen | UA | RA (drop) | TA (drop) | MIA "
        "| hold-out drop (rule) | rule met | accepted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, rows in presets.items():
        for r in rows:
            v = r["vector"]
            lines.append(
                f"| {preset} | {r['class']} | {r['seconds']:.1f} | {r['ratio_to_training']:.3f} | {r['steps']} | "
                f"{r['images_seen']:,} | {v['UA']} | {v['RA']} ({r['RA_drop']}) | {v['TA']} ({r['TA_drop']}) | "
                f"{v['MIA']} | {r['holdout_drop']} | {'yes' if r['stopping']['rule_met'] else 'NO'} | "
                + ("yes" if r["accepted"] else "no")
                + " |"
            )
    totals = {p: sum(r["seconds"] for r in rows) for p, rows in presets.items()}
    gaps = [r["RA_drop"] - r["holdout_drop"] for rows in presets.values() for r in rows]
    lines += [
        "",
        "Totals: "
        + "; ".join(f"{p} {t:.1f} s ({t / train['seconds']:.3f}x training)" for p, t in totals.items())
        + (f"; speed-up {totals['epochs'] / totals['fast']:.1f}x." if {"fast", "epochs"} <= set(totals) else "."),
        "",
        "RA on D_r (the training images) drops more than the hold-out the stopping rule checks: by "
        f"{min(gaps):.2f} to {max(gaps):.2f} points (mean {sum(gaps) / len(gaps):.2f}) in this run.",
        "",
        "Original model per class (UA / RA / TA / MIA): "
        + "; ".join(
            f"{r['class']} " + " / ".join(str(r["original"][k]) for k in METRIC_NAMES)
            for r in next(iter(presets.values()))
        ),
        "",
        f"Acceptance (fast preset, every class): time <= {RATIO_LIMIT}x training, UA >= 99, MIA >= 99, "
        f"RA and TA drop <= 1 point: **{'met' if result['accepted'] else 'NOT met'}**.",
        "",
        "Settings: " + "; ".join(f"{p}: {vector_settings(result['configs'][p])}" for p in presets) + ".",
    ]
    proc = result.get("processes")
    if proc:
        learn, bank = proc["learn"], proc["bank"]
        lines += [
            "",
            "## torch.distributed (gloo, 1 thread per process), through `--nproc`",
            "",
            "| command | 1 process (s) | 2 processes (s) | speed-up |",
            "|---|---|---|---|",
            f"| `fv learn` (data-parallel), end to end | {learn['1']['wall_seconds']} | {learn['2']['wall_seconds']} | "
            f"{learn['1']['wall_seconds'] / learn['2']['wall_seconds']:.2f}x |",
            f"| `fv learn`, learning only | {learn['1']['learning_seconds']} | {learn['2']['learning_seconds']} | "
            f"{learn['1']['learning_seconds'] / learn['2']['learning_seconds']:.2f}x |",
            f"| `fv bank` of {len(result['classes'])} classes (class-parallel), end to end | "
            f"{bank['1']['wall_seconds']} | {bank['2']['wall_seconds']} | "
            f"{bank['1']['wall_seconds'] / bank['2']['wall_seconds']:.2f}x |",
            "",
            f"Same vector on 1 and 2 processes: largest difference {proc['learn_max_abs_difference']:.2e} "
            f"(largest value {proc['learn_max_abs_value']:.3f}); steps {learn['1']['steps']} vs {learn['2']['steps']}. "
            f"Banks: largest difference {proc['bank_max_abs_difference']:.2e}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """RA points lost per class, one bar per row of the run, against the acceptance's 1-point line."""
    presets = result["presets"]
    rows = ordered(list(presets), [row.name for row in ROWS])
    plot_drops_per_class(
        [r["class"] for r in presets["fast"]],
        {name: [r["RA_drop"] for r in presets[name]] for name in rows},
        limit=1.0,
        path=path,
        title=f"RA (accuracy on D_r) lost per forgotten class ({result['date'][:10]})",
    )


def tune(ws: Workspace, classes: list[int], work: Path, out: Path, load_start: list[float]) -> int:
    """The grid behind the fast preset, judged on what a user has: the stopping rule on D_f and the hold-out."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, overrides in tqdm(TUNING_GRID.items(), desc="tuning grid"):
        config = replace(VectorConfig(), **overrides)
        rows[name] = []
        for c in classes:
            start = time.perf_counter()
            _, metrics = learn_vector(
                ws, ForgetSpec(classes=(c,)), work / "tune.safetensors", config=config, evaluate=False
            )
            stop = metrics["stopping"]
            rows[name].append(
                {"class": ws.data.class_names[c], "seconds": round(time.perf_counter() - start, 2), **stop}
            )
    result = {
        **torch_provenance(load_start),
        "classes": [ws.data.class_names[c] for c in classes],
        "grid": TUNING_GRID,
        "rows": rows,
    }
    write_report(out, result, tuning_markdown, name="tuning")
    return 0


def tuning_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Tuning the fast preset ({result['date']}): validation hold-out and forget monitor only",
        "",
        f"Command: `{result['command']}`. Classes {', '.join(result['classes'])} (not the reported ones).",
        "",
        "| setting | rule met | total steps | total time (s) | worst hold-out drop (points) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in result["rows"].items():
        drop = max(r["holdout_acc_original"] - r["holdout_acc"] for r in rs)
        lines.append(
            f"| {name} | {sum(r['rule_met'] for r in rs)}/{len(rs)} | {sum(r['steps_run'] for r in rs)} | "
            f"{sum(r['seconds'] for r in rs):.1f} | {drop:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results/learning_speed")
    parser.add_argument("--work-dir", default="runs/learning_speed", help="checkpoint and vectors (not committed)")
    parser.add_argument("--classes", nargs="+", type=int, default=[2, 5, 8], help="classes reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-processes", action="store_true", help="skip the 1 vs 2 processes timings")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[row.stem for row in ROWS],
        default=[row.stem for row in ROWS],
        help="rows to run (fast always; e.g. fast and fast_at_risk over all ten classes: which pass)",
    )
    parser.add_argument("--classifier", help="reuse a classifier trained by `fv train` (tuning only)")
    parser.add_argument("--tune", action="store_true", help="run the tuning grid instead (validation hold-out only)")
    parser.add_argument("--tune-classes", nargs="+", type=int, default=[1, 3, 6, 9])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    load_start, start = load_average(), time.perf_counter()
    classifier = work / "classifier.safetensors"
    if args.tune:
        if not args.classifier:
            train_model("fashion-mnist", classifier)
        return tune(open_workspace(args.classifier or classifier), args.tune_classes, work, out, load_start)
    if args.classifier:
        parser.error("--classifier is for --tune: the benchmark times the classifier's training itself")
    trained = train_model("fashion-mnist", classifier)
    ws = open_workspace(classifier)
    rows = [row for row in ROWS if row.stem == "fast" or row.stem in args.rows]
    presets: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    for row in rows:
        for c in tqdm(args.classes, desc=row.name):
            path = work / f"{row.stem}_{c}.safetensors"
            presets[row.name].append(learn_row(ws, c, row.config, path, trained["seconds"]))
    result: dict[str, Any] = {
        "classifier": {k: trained[k] for k in ("seconds", "train_size", "config", "accuracy")},
        "classes": args.classes,
        "configs": {row.name: row.config.to_json() for row in rows},
        "presets": presets,
        "accepted": all(r["accepted"] for r in presets["fast"]),
    }
    if not args.no_processes:
        result["processes"] = processes(classifier, args.classes, work)
    result = {
        **torch_provenance(load_start),
        "seconds": round(time.perf_counter() - start, 1),
        **result,
    }
    write_report(out, result, markdown, name="learning_speed")
    plot(result, out / "learning_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
