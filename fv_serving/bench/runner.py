"""Running the side-by-side unlearning benchmark: forget vectors against model-based baselines.

This is the evidence a user chooses on, so every method is run on the same data,
from the same original weights, measured by the same code (metrics.evaluate_unlearning
on any nn.Module) and tuned by the same rule on the validation hold-out:

  1. An original classifier is trained on a seeded subset of the training set
     WITHOUT augmentation until it fits it (train accuracy near 100%). Random
     forgetting only separates methods when the original memorised its data: on a
     briefly trained model, Retrain ~= original (unseen and seen images get the
     same accuracy) and every method "wins" by doing nothing.
  2. Tasks: class-wise forgetting of each class in `classes`; random forgetting of
     `percent`% of the training subset for each seed in `random_seeds`; one
     two-class task (`pair`) for forget-vector arithmetic.
  3. Rows per task: original (no unlearning), Retrain (from scratch on D_r with the
     original recipe; the gold standard), FT, GA, RL, l1-sparse, SalUn, the forget
     vector with the stopping rule's retain floor and without it, and, class-wise
     only, the gated forget vector (fv_serving.gating) and output masking. The pair
     task adds the composed vector from the bank of class vectors learned in step 2
     (zero-shot sum, and learned coefficients).
  4. Columns: UA, RA, TA, MIA-Efficacy, Avg. Gap to Retrain, wall time, tuning
     time, weight entries changed; mean and std over the tasks of a scenario.

Baseline hyper-parameters (learning rate, epochs) are chosen by `baselines.grid_search`
for every task, on that task's forget set and validation hold-out, with the rule the
forget vectors' stopping rule uses (which also runs per task): both kinds of method
pick their stopping point per request by the same criterion, and the test set is
never used to choose anything. `tune_every_task=False` tunes on the first task of a
kind only and reuses the choice (cheaper; it measured worse: a choice that suits one
class need not suit another). `fv_serving.bench.report` turns the result into files.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fv_serving.arithmetic import combine, zero_shot_weights
from fv_serving.baselines import (
    BaselineConfig,
    UnlearnedModel,
    count_parameters,
    grid_search,
    retrain,
    unlearn_model,
)
from fv_serving.bench.config import BenchConfig
from fv_serving.bench.machine import load_average, machine_info
from fv_serving.bench.report import (
    COMPOSED_LEARNED,
    COMPOSED_SUM,
    FV,
    FV_NO_FLOOR,
    GATED,
    GATED_NO_FLOOR,
    MASKING,
    ORIGINAL,
    RETRAIN,
    summarise,
    write_results,
)
from fv_serving.config import combination_config
from fv_serving.data import (
    Dataset,
    ForgetSpec,
    ForgetSplit,
    SplitSpec,
    default_augmentation,
    load_dataset,
    make_forget_split,
)
from fv_serving.errors import InvalidInputError
from fv_serving.gating import GatedPerturbedClassifier
from fv_serving.masking import OutputMaskedClassifier
from fv_serving.metrics import UnlearningMetrics, evaluate_unlearning, predict
from fv_serving.models import Classifier, ModelSpec, PerturbedClassifier, freeze
from fv_serving.pipeline import resolve_device
from fv_serving.stopping import goal_for
from fv_serving.train import train_classifier
from fv_serving.unlearn import BankCombination, LearnResult, learn_forget_vector, learn_perturbation


@dataclass
class Task:
    name: str
    scenario: str  # one of SCENARIOS
    spec: ForgetSpec


def bench_tasks(config: BenchConfig) -> list[Task]:
    """Class-wise tasks first (the pair needs their vectors), then random, then the pair."""
    tasks = [Task(f"class {c}", "class", ForgetSpec(classes=(c,))) for c in config.classes]
    tasks += [
        Task(f"random {config.percent:g}% seed {s}", "random", ForgetSpec(percent=config.percent, seed=s))
        for s in config.random_seeds
    ]
    if config.pair is not None:
        tasks.append(Task(f"classes {config.pair[0]}+{config.pair[1]}", "pair", ForgetSpec(classes=config.pair)))
    return tasks


def run_machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        **machine_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_average_at_start"] = load_average()
    return info


# ------------------------------------------------------------------ running


@dataclass
class BenchContext:
    """What the tasks of one run share: the original model, the tuned baselines' choices, the class vectors."""

    config: BenchConfig
    data: Dataset
    split: SplitSpec
    original: Classifier
    device: str
    progress: tqdm
    tuned: dict[tuple[str, str], tuple[str, BaselineConfig]] = field(default_factory=dict)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)
    class_vectors: dict[int, np.ndarray] = field(default_factory=dict)


def resolve_split(config: BenchConfig, n_train: int) -> SplitSpec:
    """The train/validation split of a run (a smoke run shrinks the hold-out to fit tiny data)."""
    val, size = config.val_size, config.train_size
    if config.quick:  # a smoke run adapts to tiny data sets (e.g. a test fixture)
        val = max(1, min(val, n_train // 5))
        size = None if size is None else max(1, min(size, n_train - val))
    return SplitSpec(seed=config.split_seed, val_size=val, train_size=size)


def train_original(ctx: BenchContext) -> dict[str, Any]:
    """Train `ctx.original` in place on the run's pool; its accuracies and sizes, for the report."""
    config, data = ctx.config, ctx.data
    pool, val = ctx.split.indices(len(data.train))
    history = train_classifier(
        ctx.original,
        data,
        pool,
        config.train,
        augmentation=default_augmentation(data),
        device=ctx.device,
        desc="original",
    )
    freeze(ctx.original)
    return {
        "train_size": len(pool),
        "val_size": len(val),
        "seconds": round(history["seconds"], 2),
        "epoch_losses": [round(v, 5) for v in history["epoch_losses"]],
        "train_accuracy": predict(ctx.original, data.train, pool, device=ctx.device).accuracy,
        "val_accuracy": predict(ctx.original, data.train, val, device=ctx.device).accuracy,
        "test_accuracy": predict(ctx.original, data.test, torch.arange(len(data.test)), device=ctx.device).accuracy,
        "params": count_parameters(ctx.original),
    }


def task_split(ctx: BenchContext, task: Task) -> ForgetSplit:
    """The task's D_f / D_r / hold-out / test pools, the test pool cut to `test_size` if set."""
    split = make_forget_split(ctx.data, ctx.split, task.spec)
    if ctx.config.test_size is not None and len(split.test) > ctx.config.test_size:
        gen = torch.Generator().manual_seed(ctx.config.seed)
        keep = torch.randperm(len(split.test), generator=gen)[: ctx.config.test_size].sort().values
        split = replace(split, test=split.test[keep])
    if len(split.forget) == 0:
        raise InvalidInputError(f"{task.name}: the forget set is empty in this training subset")
    return split


def _vector_row(result: LearnResult) -> dict[str, Any]:
    return {
        "delta_l2": round(float(np.linalg.norm(result.delta)), 4),
        "delta_values": int(result.delta.size),
        "stopping": result.stopping_report(),
    }


def _baseline(ctx: BenchContext, task: Task, split: ForgetSplit, method: str) -> tuple[UnlearnedModel, float]:
    """Grid-search the method on this task (or reuse an earlier task's choice); returns (model, search seconds)."""
    config = ctx.config
    kind = "class" if task.scenario in ("class", "pair") else "random"
    key = (kind, method)
    if not config.tune_every_task and key in ctx.tuned:
        source, chosen = ctx.tuned[key]
        ctx.selection.setdefault(task.name, {})[method] = {"reused_from": source, "chosen": chosen.to_json()}
        return unlearn_model(ctx.original, ctx.data, split, chosen, device=ctx.device), 0.0
    grid = next(g for g in config.grids if g.method == method)
    rule = config.vector.rule(goal_for(kind))
    base = BaselineConfig(method, lr=grid.lrs[0], epochs=1, batch_size=config.baseline_batch_size, seed=config.seed)
    result = grid_search(
        ctx.original,
        ctx.data,
        split,
        base,
        grid.lrs,
        grid.max_epochs,
        rule,
        device=ctx.device,
        monitor_size=config.vector.monitor_size,
    )
    ctx.tuned[key] = (task.name, result.chosen)
    ctx.selection.setdefault(task.name, {})[method] = {"kind": kind, "grid": grid.to_json(), **result.describe()}
    return result.best, result.seconds


def run_task(ctx: BenchContext, task: Task) -> dict[str, Any]:
    """Every method's row for one task, each scored against that task's Retrain model."""
    config, data, device, original = ctx.config, ctx.data, ctx.device, ctx.original
    split = task_split(ctx, task)
    rows: dict[str, dict[str, Any]] = {}
    metrics: dict[str, UnlearningMetrics] = {}

    def add(name: str, model: nn.Module, seconds: float, changed: int, tuning: float = 0.0, **extra: Any) -> None:
        ctx.progress.set_postfix_str(f"{task.name}: {name}")
        measured, details = evaluate_unlearning(model, data, split, seed=config.seed, device=device)
        metrics[name] = measured
        rows[name] = {
            **measured.to_json(),
            "seconds": round(seconds, 3),
            "tuning_seconds": round(tuning, 3),
            "params_changed": changed,
            **({"extra": extra} if extra else {}),
            "details": details,
        }
        ctx.progress.update(1)

    add(ORIGINAL, original, 0.0, 0)
    gold = retrain(original, data, split, config.train, augmentation=default_augmentation(data), device=device)
    retrain_report = {
        "train_accuracy": predict(gold.model, data.train, split.retain, device=device).accuracy,
        "test_accuracy": predict(gold.model, data.test, torch.arange(len(data.test)), device=device).accuracy,
        "seconds": round(gold.seconds, 2),
    }
    add(RETRAIN, gold.model, gold.seconds, gold.params_changed)
    del gold
    for grid in config.grids:
        ctx.progress.set_postfix_str(f"{task.name}: {grid.method}")
        result, search = _baseline(ctx, task, split, grid.method)
        add(grid.method, result.model, result.seconds, result.params_changed, search, config=result.config)

    ctx.progress.set_postfix_str(f"{task.name}: forget vector")
    settings = config.vector_config_for(task.scenario)
    fv = learn_forget_vector(original, data, split, settings, device=device)
    delta = torch.from_numpy(fv.delta).to(device)
    add(FV, PerturbedClassifier(original, delta, settings.clamp), fv.seconds, 0, **_vector_row(fv))
    if task.scenario == "class":
        ctx.class_vectors[task.spec.classes[0]] = fv.delta
    no_floor: LearnResult | None = None
    if task.scenario != "pair":
        no_floor = learn_forget_vector(
            original, data, split, replace(settings, retain_margin=config.no_floor_margin), device=device
        )
        loose = torch.from_numpy(no_floor.delta).to(device)
        add(
            FV_NO_FLOOR,
            PerturbedClassifier(original, loose, settings.clamp),
            no_floor.seconds,
            0,
            **_vector_row(no_floor),
        )
    if task.scenario in ("class", "pair"):
        classes = task.spec.classes
        add(
            GATED,
            GatedPerturbedClassifier(original, delta, classes, settings.clamp).to(device),
            fv.seconds,
            0,
            note="same vector as the forget-vector row; two classifier passes per input",
        )
        if no_floor is not None:
            loose = torch.from_numpy(no_floor.delta).to(device)
            add(
                GATED_NO_FLOOR,
                GatedPerturbedClassifier(original, loose, classes, settings.clamp).to(device),
                no_floor.seconds,
                0,
                note="same vector as the no-floor row",
            )
        add(MASKING, OutputMaskedClassifier(original, classes, data.num_classes).to(device), 0.0, 0)
    if task.scenario == "pair":
        _composition_rows(ctx, task, split, add)

    reference = metrics[RETRAIN]
    for name, row in rows.items():
        row["avg_gap"] = round(metrics[name].avg_gap(reference), 4)
    return {
        "name": task.name,
        "scenario": task.scenario,
        "forget": split.describe(),
        "sizes": {
            "forget": len(split.forget),
            "retain": len(split.retain),
            "val": len(split.val),
            "test_pool": len(split.test),
        },
        "retrain": retrain_report,
        "rows": rows,
    }


def _composition_rows(ctx: BenchContext, task: Task, split: ForgetSplit, add: Any) -> None:
    """Zero-shot sum of the pair's class vectors, and coefficients learned over the whole class bank."""
    config, device = ctx.config, ctx.device
    bank_classes = sorted(ctx.class_vectors)
    bank = np.stack([ctx.class_vectors[c] for c in bank_classes])
    init = zero_shot_weights(bank_classes, task.spec.classes, "sum")
    zero_shot = torch.from_numpy(combine(bank, init)).to(device)
    add(
        COMPOSED_SUM,
        PerturbedClassifier(ctx.original, zero_shot, config.vector.clamp),
        0.0,
        0,
        bank_classes=bank_classes,
        coefficients=init.tolist(),
        note="no learning; the bank's class vectors were learned in the class-wise tasks",
    )
    learned = learn_perturbation(
        ctx.original,
        ctx.data,
        split,
        BankCombination(torch.from_numpy(bank), torch.from_numpy(init)),
        combination_config(config.vector),
        goal="erase",
        device=device,
        desc="coefficients",
    )
    assert learned.weights is not None
    add(
        COMPOSED_LEARNED,
        PerturbedClassifier(ctx.original, torch.from_numpy(learned.delta).to(device), config.vector.clamp),
        learned.seconds,
        0,
        bank_classes=bank_classes,
        coefficients=[round(float(w), 4) for w in learned.weights],
        **_vector_row(learned),
    )


def _rows_per_task(config: BenchConfig, scenario: str) -> int:
    base = 2 + len(config.grids) + 1  # original, Retrain, baselines, forget vector
    if scenario == "class":
        return base + 4  # no-floor, gated, gated no-floor, masking
    if scenario == "random":
        return base + 1
    return base + 4  # gated, masking, composed sum, learned coefficients


def run_benchmark(config: BenchConfig, out_dir: str | Path, *, command: str = "") -> dict[str, Any]:
    """Run every task, write unlearning.json / .md / .png into `out_dir`, return the report.

    Torch's thread count is set to `config.threads` for the run and restored afterwards.
    """
    previous = torch.get_num_threads()
    if config.threads is not None:
        if config.threads < 1:
            raise InvalidInputError(f"threads must be >= 1, got {config.threads}")
        torch.set_num_threads(config.threads)
    try:
        return _run(config, out_dir, command)
    finally:
        torch.set_num_threads(previous)


def _run(config: BenchConfig, out_dir: str | Path, command: str) -> dict[str, Any]:
    start = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    device = resolve_device(config.device)
    data = load_dataset(config.data, config.data_root)
    bad = [c for c in config.classes if not 0 <= c < data.num_classes]
    if bad:
        raise InvalidInputError(f"unknown class(es) {bad}: {data.name} has classes 0..{data.num_classes - 1}")
    split = resolve_split(config, len(data.train))
    spec = ModelSpec(
        config.arch, data.input_shape[0], data.num_classes, data.input_shape[1:], data.mean, data.std, data.class_names
    )
    torch.manual_seed(config.train.seed)
    tasks = bench_tasks(config)
    total = sum(_rows_per_task(config, t.scenario) for t in tasks)
    progress = tqdm(total=total, desc="bench unlearning (rows)", mininterval=1.0)
    ctx = BenchContext(config, data, split, Classifier(spec).to(device), device, progress)
    progress.set_postfix_str("training the original")
    original = train_original(ctx)
    results = [run_task(ctx, task) for task in tasks]
    progress.close()
    report = {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "command": command,
            "machine": run_machine(device),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "quick": config.quick,
        },
        "config": config.to_json(),
        "dataset": {"name": data.name, "classes": list(data.class_names)},
        "split": split.to_json(),
        "original": original,
        "selection": ctx.selection,
        "tasks": results,
        "summary": summarise(results),
    }
    write_results(report, out_dir)
    return report
