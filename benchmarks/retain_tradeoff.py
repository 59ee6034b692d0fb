"""Why a cheap forget vector misses "RA within 1 point": what learning does to D_r, step by step.

The learning-speed benchmark's stopping rule holds the validation hold-out's drop to
1 point, yet RA (accuracy on D_r, the training images) drops 0.4-1.0 points more. This
script follows single runs of the fast preset's optimisation for a fixed number of
steps and measures, every --every steps, the forget accuracy (1,000 D_f images), the
drop of D_r accuracy (5,000 D_r images) and of the whole hold-out, for a few variants
of the objective or the batches:

  fast preset            the library's loss and Adam settings (`VectorConfig()`);
  alpha 3                three times the retain term's weight;
  at-risk quarter        a quarter of each batch from D_r images the classifier gets right
                         by the lowest fifth of margins (in a pool of 10,000 D_r images):
                         the images a perturbation flips first (`unlearn.at_risk_images`,
                         the library's `at_risk_share`).

Classes default to the tuning classes (Trouser, Dress, Ankle boot), never the reported
ones; the test set is not used.

    python benchmarks/retain_tradeoff.py          # ~5 min on 2 CPU cores
Writes benchmarks/results/retain_tradeoff/{retain_tradeoff.json, retain_tradeoff.md, retain_tradeoff.png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from fv_serving.bench.machine import load_average
from fv_serving.bench.record import provenance, write_report
from fv_serving.config import VectorConfig
from fv_serving.data import ForgetSpec
from fv_serving.distributed import SINGLE
from fv_serving.metrics import predict
from fv_serving.models import PerturbedClassifier, learning_copy
from fv_serving.pipeline import Workspace, open_workspace
from fv_serving.plots import save_figure
from fv_serving.sampling import BatchPlan
from fv_serving.unlearn import DirectDelta, at_risk_images, forget_vector_loss, make_optimizer

VARIANTS: dict[str, dict[str, Any]] = {
    "fast preset": {},
    "alpha 3": {"alpha": 3.0},
    "at-risk quarter": {"at_risk_share": 0.25},
}


def trace(ws: Workspace, c: int, name: str, steps: int, every: int) -> list[dict[str, float]]:
    """One run of `steps` Adam steps; the three accuracies every `every` steps."""
    config = replace(VectorConfig(), **VARIANTS[name])
    split = ws.forget_split(ForgetSpec(classes=(c,)))
    model = learning_copy(ws.model)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    train_probe = split.retain[torch.randperm(len(split.retain), generator=generator)[:5000]]
    forget_probe = split.forget[torch.randperm(len(split.forget), generator=generator)[:1000]]
    risky = (
        at_risk_images(model, ws.data.train, split.retain, generator, SINGLE, "cpu") if config.at_risk_share else None
    )
    is_forget = torch.zeros(len(ws.data.train), dtype=torch.bool)
    is_forget[split.forget] = True
    originals = [predict(model, ws.data.train, s).accuracy for s in (train_probe, split.val)]
    delta = DirectDelta(ws.data.input_shape)
    optimizer = make_optimizer(delta, config)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    plan = BatchPlan(ws.data, split, config, generator, None, "cpu", risky)

    def measure(step: int) -> dict[str, float]:
        g = PerturbedClassifier(model, delta().detach())
        train_acc, holdout_acc = (predict(g, ws.data.train, s).accuracy for s in (train_probe, split.val))
        return {
            "step": step,
            "forget_acc": round(predict(g, ws.data.train, forget_probe).accuracy, 2),
            "train_drop": round(originals[0] - train_acc, 2),
            "holdout_drop": round(originals[1] - holdout_acc, 2),
        }

    rows, step = [], 0
    while step < steps:  # the library's batches (`fv_serving.sampling`), epoch by epoch, as `fv learn` takes them
        for x, y, idx in plan.epoch():
            loss = forget_vector_loss(model(x + delta()), y, is_forget[idx], config)
            loss = loss + config.lam * delta.regulariser(len(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % every == 0:
                rows.append(measure(step))
            if step == steps:
                break
        scheduler.step()
    return rows


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The first step where the rule's own test would pass (forget <= 0.5%, hold-out drop <= 1), and D_r there."""
    passing = [r for r in rows if r["forget_acc"] <= 0.5 and r["holdout_drop"] <= 1.0]
    first = passing[0] if passing else None
    return {
        "first_pass_step": first["step"] if first else None,
        "train_drop_there": first["train_drop"] if first else None,
        "holdout_drop_there": first["holdout_drop"] if first else None,
        "best_train_drop_forgotten": min((r["train_drop"] for r in rows if r["forget_acc"] <= 0.5), default=None),
        "last": rows[-1],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    classes = list(result["traces"])
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.4), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        for (name, rows), colour in zip(result["traces"][cls].items(), ("C0", "C1", "C2"), strict=False):
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["train_drop"] for r in rows], color=colour, label=f"{name}: D_r")
            ax.plot(steps, [r["holdout_drop"] for r in rows], color=colour, linestyle="--", label=f"{name}: hold-out")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylim(-1, 6)
        ax.set_title(f"forgetting {cls}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy drop (points)")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# D_r against the hold-out during learning ({result['date']})",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']} (1 thread), load average "
        f"{m['loadavg_start']} at start, {m['loadavg_end']} at end.",
        f"Command: `{result['command']}`. Wall time {result['seconds']:.0f} s. Classifier `{result['classifier']}`.",
        "",
        "Per run: the first step where forget accuracy <= 0.5% and the hold-out drop <= 1 point (the stopping "
        "rule's test, here on 1,000 D_f images and the whole hold-out), the D_r drop there, the smallest D_r "
        "drop once forgotten, and the last measurement.",
        "",
        "| class | variant | first pass (step) | D_r drop there | hold-out drop there | best D_r drop | "
        "last: forget % / D_r / hold-out |",
        "|---|---|---|---|---|---|---|",
    ]
    for cls, per_variant in result["summary"].items():
        for name, s in per_variant.items():
            last = s["last"]
            lines.append(
                f"| {cls} | {name} | {s['first_pass_step']} | {s['train_drop_there']} | {s['holdout_drop_there']} | "
                f"{s['best_train_drop_forgotten']} | {last['forget_acc']} / {last['train_drop']} / "
                f"{last['holdout_drop']} |"
            )
    lines += ["", "Trajectories: retain_tradeoff.png (solid: D_r drop, dashed: hold-out drop)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default="runs/learning_speed/classifier.safetensors",
                        help="made by benchmarks/learning_speed.py (or any `fv train` checkpoint)")  # fmt: skip
    parser.add_argument("--classes", nargs="+", type=int, default=[1, 3, 9])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/retain_tradeoff"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start, start = load_average(), time.perf_counter()
    ws = open_workspace(args.classifier)
    traces: dict[str, Any] = {}
    for c in tqdm(args.classes, desc="classes"):
        traces[ws.data.class_names[c]] = {v: trace(ws, c, v, args.steps, args.every) for v in VARIANTS}
    result: dict[str, Any] = {
        **provenance(load_start, torch=torch.__version__),
        "seconds": round(time.perf_counter() - start, 1),
        "classifier": args.classifier,
        "traces": traces,
        "summary": {name: {v: summary(rows) for v, rows in per.items()} for name, per in traces.items()},
    }
    write_report(args.out_dir, result, markdown, name="retain_tradeoff")
    plot(result, args.out_dir / "retain_tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
