"""Random-subset forgetting with one universal vector, honestly: an objective aimed at indistinguishability, swept.

For a random forget set the goal is not error but indistinguishability: D_f should
look like data the model never saw (Retrain's forget accuracy and MIA-Efficacy),
while D_r and the test set keep their accuracy. The authors' margin objective pushes
D_f towards misclassification and, in the unlearning benchmark, its stopping rule
returns the zero vector (Avg. Gap = doing nothing). Tried here instead:

  confidence / loss matching   alpha * CE(D_r) / B + beta * W1(s(D_f), s(H_A))
      s = the true-class softmax confidence ("confidence", the feature the membership
      attack reads) or the cross-entropy ("loss"), of the perturbed model, on the
      batch's forget samples and on as many samples of a reference half H_A of the
      validation hold-out (detached: it is the target, not moved); W1 = the mean
      absolute difference of the sorted values (1-D Wasserstein distance);
  the authors' margin objective with a small beta, as a control.

Settings (objective x beta x lr) are chosen per task, like the baselines' grids, on
the OTHER half H_B of the hold-out only: the setting whose vector comes closest to the
stopping rule "match" (|forget acc - H_B acc| <= tolerance, H_B accuracy at most the
retain margin below the original's; `fv_serving.stopping`), which also stops each run.
The test set is used only to report. The unlearning benchmark's own rows (original,
Retrain, FT, GA, RL, l1-sparse, SalUn, forget vector) are recomputed in the same run
with its code (`fv_serving.bench.runner`), from the same original weights.

    python benchmarks/random_forgetting.py            # ~20-30 min on 2 CPU cores
Writes benchmarks/results/random_forgetting/{random_forgetting.json, random_forgetting.md}.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.config import BenchConfig
from fv_serving.bench.report import METHOD_ORDER, ORIGINAL, RETRAIN, ordered
from fv_serving.bench.runner import (
    _Context,
    _resolve_split,
    _run_task,
    _task_split,
    _train_original,
    bench_tasks,
    run_machine,
)
from fv_serving.config import METRIC_NAMES, VectorConfig
from fv_serving.data import Dataset, ForgetSplit, iterate_batches, load_dataset
from fv_serving.metrics import UnlearningMetrics, evaluate_unlearning
from fv_serving.models import Classifier, ModelSpec, PerturbedClassifier
from fv_serving.perturbation import apply_delta
from fv_serving.unlearn import DirectDelta, learn_perturbation

OBJECTIVES = ("confidence", "loss", "margin")
BETAS = {"confidence": (1.0, 3.0, 10.0), "loss": (0.3, 1.0, 3.0), "margin": (0.5, 1.0)}
LRS = (0.003, 0.01)  # Adam, as the fast preset
# The learning run of every setting: the fast preset with the unlearning benchmark's batch
# size, a quarter of each batch from D_f (the forget set is 10% of the pool: a quarter
# gives 16 forget scores per batch to compare), no flips (the original was trained
# without augmentation), the whole hold-out half H_B at every check.
BASE = VectorConfig(
    batch_size=64,
    steps_per_epoch=25,
    max_epochs=8,
    checks_per_epoch=5,
    forget_fraction=0.25,
    holdout_size=None,
    augment=False,
)


@dataclass(frozen=True)
class Setting:
    objective: str
    beta: float
    lr: float

    @property
    def name(self) -> str:
        return f"{self.objective}, beta {self.beta:g}, lr {self.lr:g}"


def settings() -> list[Setting]:
    return [Setting(o, b, lr) for o in OBJECTIVES for b, lr in itertools.product(BETAS[o], LRS)]


class DistributionMatching:
    """alpha * CE(retain) / B + beta * W1 between the batch's forget scores and as many reference scores."""

    def __init__(
        self,
        score: str,
        classifier: nn.Module,
        delta: DirectDelta,
        data: Dataset,
        reference: torch.Tensor,
        config: VectorConfig,
    ) -> None:
        self.score, self.classifier, self.delta, self.data = score, classifier, delta, data
        self.reference, self.config = reference, config
        self.generator = torch.Generator().manual_seed(config.seed + 1)

    def _scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.score == "loss":
            return F.cross_entropy(logits, labels, reduction="none")
        return torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, is_forget: torch.Tensor, *, batch_size: int
    ) -> torch.Tensor:
        retain = F.cross_entropy(logits[~is_forget], labels[~is_forget], reduction="sum") / batch_size
        n = int(is_forget.sum())
        drawn = self.reference[torch.randint(len(self.reference), (n,), generator=self.generator)]
        x, y, _ = next(iterate_batches(self.data.train, drawn, n))
        with torch.no_grad():  # the target distribution: unseen data under the current delta
            target = self._scores(self.classifier(apply_delta(x, self.delta(), self.config.clamp)), y).sort().values
        mine = self._scores(logits[is_forget], labels[is_forget]).sort().values
        return self.config.alpha * retain + self.config.beta * (mine - target).abs().mean()


def halves(split: ForgetSplit, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hold-out cut in two: H_A for the objective, H_B for stopping and choices."""
    order = torch.randperm(len(split.val), generator=torch.Generator().manual_seed(seed))
    half = len(split.val) // 2
    return split.val[order[:half]].sort().values, split.val[order[half:]].sort().values


def learn_setting(
    original: nn.Module, data: Dataset, split: ForgetSplit, setting: Setting, reference: torch.Tensor
) -> tuple[np.ndarray, dict[str, Any]]:
    config = replace(BASE, beta=setting.beta, lr=setting.lr)
    delta = DirectDelta(data.input_shape)
    objective = (
        None
        if setting.objective == "margin"
        else DistributionMatching(setting.objective, original, delta, data, reference, config)
    )
    result = learn_perturbation(
        original, data, split, delta, config, goal="match", desc=setting.name, objective=objective
    )
    return result.delta, {**result.stopping_report(), "distance": round(result.chosen.distance, 3)}


def _row(metrics: UnlearningMetrics, reference: UnlearningMetrics) -> dict[str, float]:
    return {**{k: round(v, 2) for k, v in metrics.to_json().items()}, "avg_gap": round(metrics.avg_gap(reference), 3)}


def sweep_task(ctx: _Context, task: Any, bench_rows: dict[str, Any], seed: int) -> dict[str, Any]:
    split = _task_split(ctx, task)
    reference_half, choice_half = halves(split, seed)
    choice_split = replace(split, val=choice_half)
    retrain = UnlearningMetrics.from_row(bench_rows[RETRAIN])
    rows: dict[str, Any] = {}
    for setting in tqdm(settings(), desc=f"{task.name}: sweep", leave=False):
        start = time.perf_counter()
        delta, stopping = learn_setting(ctx.original, ctx.data, choice_split, setting, reference_half)
        seconds = time.perf_counter() - start
        g = PerturbedClassifier(ctx.original, torch.from_numpy(delta))
        metrics, _ = evaluate_unlearning(g, ctx.data, split, seed=ctx.config.seed)
        rows[setting.name] = {
            **_row(metrics, retrain),
            "seconds": round(seconds, 1),
            "delta_l2": round(float(np.linalg.norm(delta)), 3),
            "stopping": stopping,
        }
    # The choice: the hold-out half H_B only (smallest distance to the rule; ties: the smaller vector).
    chosen = min(rows, key=lambda n: (rows[n]["stopping"]["distance"], rows[n]["delta_l2"]))
    best_by_test = min(rows, key=lambda n: rows[n]["avg_gap"])
    return {
        "name": task.name,
        "forget_size": len(split.forget),
        "holdout_halves": {"objective": len(reference_half), "choice": len(choice_half)},
        "bench_rows": {
            m: {k: round(float(bench_rows[m][k]), 2) for k in (*METRIC_NAMES, "avg_gap")}
            for m in ordered(list(bench_rows), METHOD_ORDER)
        },
        "sweep": rows,
        "chosen": chosen,
        "best_by_test_not_a_choice": best_by_test,
    }


def summary(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean Avg. Gap over tasks: the benchmark's rows, the chosen vector, and the sweep's best by the test set."""
    out = {m: float(np.mean([t["bench_rows"][m]["avg_gap"] for t in tasks])) for m in tasks[0]["bench_rows"]}
    out["universal vector, chosen on the hold-out"] = float(
        np.mean([t["sweep"][t["chosen"]]["avg_gap"] for t in tasks])
    )
    out["universal vector, best of the sweep by the test set (not a valid choice)"] = float(
        np.mean([t["sweep"][t["best_by_test_not_a_choice"]]["avg_gap"] for t in tasks])
    )
    per_setting = {n: float(np.mean([t["sweep"][n]["avg_gap"] for t in tasks])) for n in tasks[0]["sweep"]}
    return {
        "avg_gap": {k: round(v, 3) for k, v in out.items()},
        "per_setting_avg_gap": {k: round(v, 3) for k, v in per_setting.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    meta, summ = result["meta"], result["summary"]
    gaps = summ["avg_gap"]
    lines = [
        "# Random-subset forgetting with a universal vector: an objective aimed at indistinguishability",
        "",
        f"- date (UTC): {meta['date']}; wall time {meta['wall_seconds']:.0f} s",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPUs, "
        f"torch {meta['machine']['torch']} ({meta['machine']['torch_threads']} thread), "
        f"load average at start {meta['machine']['load_average_at_start']}",
        f"- setting: `fv bench unlearning` defaults: {result['setting']}",
        f"- sweep: {len(result['settings'])} settings (objective x beta x lr), runs of {result['base_config_text']}",
        "- choice per task on the hold-out half H_B only: the vector closest to the stopping rule "
        f"'{result['rule']}'; H_A (the other half) is the objective's reference of unseen data",
        "",
        "## Avg. Gap to Retrain (mean over the random tasks; lower is better)",
        "",
        "| method | Avg. Gap |",
        "|---|---|",
    ]
    lines += [f"| {m} | {v:.2f} |" for m, v in gaps.items()]
    for task in result["tasks"]:
        lines += [
            "",
            f"## {task['name']} ({task['forget_size']} forget images)",
            "",
            "| method | UA | RA | TA | MIA | Avg. Gap | hold-out distance to the rule |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in task["bench_rows"].items():
            lines.append(f"| {m} | " + " | ".join(f"{r[k]:.2f}" for k in (*METRIC_NAMES, "avg_gap")) + " | |")
        for name, r in task["sweep"].items():
            mark = " **(chosen)**" if name == task["chosen"] else ""
            lines.append(
                f"| vector: {name}{mark} | "
                + " | ".join(f"{r[k]:.2f}" for k in (*METRIC_NAMES, "avg_gap"))
                + f" | {r['stopping']['distance']:.2f} |"
            )
    lines += ["", result["conclusion"], ""]
    return "\n".join(lines)


def conclusion(gaps: dict[str, float]) -> str:
    original = gaps[ORIGINAL]
    chosen = gaps["universal vector, chosen on the hold-out"]
    best = gaps["universal vector, best of the sweep by the test set (not a valid choice)"]
    if chosen < original:
        return (
            f"Conclusion: the universal vector chosen on the hold-out beats doing nothing "
            f"(Avg. Gap {chosen:.2f} vs {original:.2f}); FT {gaps.get('FT', float('nan')):.2f}, "
            f"SalUn {gaps.get('SalUn', float('nan')):.2f}."
        )
    return (
        f"Conclusion: no universal vector of this sweep beats doing nothing when chosen on the hold-out "
        f"(Avg. Gap {chosen:.2f} vs {original:.2f} for the original); the best of the sweep judged on the "
        f"test set itself reaches {best:.2f}. FT {gaps.get('FT', float('nan')):.2f}, "
        f"SalUn {gaps.get('SalUn', float('nan')):.2f}."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results/random_forgetting")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(BenchConfig.random_seeds))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = replace(BenchConfig(), classes=(), pair=None, random_seeds=tuple(args.seeds))
    data = load_dataset(config.data, config.data_root)
    split = _resolve_split(config, len(data.train))
    spec = ModelSpec(
        config.arch, data.input_shape[0], data.num_classes, data.input_shape[1:], data.mean, data.std, data.class_names
    )
    torch.manual_seed(config.train.seed)  # as the benchmark does: the same original weights
    progress = tqdm(desc="benchmark rows", mininterval=1.0)
    ctx = _Context(config, data, split, Classifier(spec), config.device, progress)
    machine = run_machine(config.device)
    original = _train_original(ctx)
    tasks = []
    for task in bench_tasks(config):
        bench = _run_task(ctx, task)
        tasks.append(sweep_task(ctx, task, bench["rows"], config.seed))
    progress.close()
    summ = summary(tasks)
    result = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine,
            "wall_seconds": round(time.perf_counter() - start, 1),
        },
        "setting": (
            f"{data.name}, {config.arch}, original trained on {original['train_size']} images "
            f"(train accuracy {original['train_accuracy']:.2f}%, test {original['test_accuracy']:.2f}%), "
            f"validation hold-out {original['val_size']}, {config.percent:g}% random forget sets, seeds {args.seeds}"
        ),
        "original": original,
        "settings": [s.name for s in settings()],
        "base_config": BASE.to_json(),
        "base_config_text": (
            f"{BASE.optimizer}, batch {BASE.batch_size} ({BASE.forget_fraction:.0%} from D_f, no flips), "
            f"{BASE.steps_per_epoch} steps x "
            f"{BASE.max_epochs} epochs, lr decay {BASE.gamma}/epoch, {BASE.checks_per_epoch} checks/epoch, alpha "
            f"{BASE.alpha}, lambda {BASE.lam}"
        ),
        "rule": BASE.rule("match").describe(),
        "tasks": tasks,
        "summary": summ,
        "conclusion": conclusion(summ["avg_gap"]),
    }
    out = Path(args.out_dir)
    write_json_atomic(out / "random_forgetting.json", result)
    text = markdown(result)
    write_bytes_atomic(out / "random_forgetting.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
