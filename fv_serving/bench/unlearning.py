"""The side-by-side unlearning benchmark: forget vectors against model-based baselines.

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
class need not suit another).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.baselines import (
    BaselineConfig,
    SelectionRule,
    UnlearnedModel,
    count_parameters,
    grid_search,
    retrain,
    unlearn_model,
)
from fv_serving.bench.config import BenchConfig
from fv_serving.bench.machine import load_average, machine_info
from fv_serving.config import COMBINATION_LAM, COMBINATION_LR, combination_config
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
from fv_serving.metrics import METRIC_NAMES, UnlearningMetrics, evaluate_unlearning, predict
from fv_serving.models import Classifier, ModelSpec, PerturbedClassifier, freeze
from fv_serving.pipeline import resolve_device
from fv_serving.train import train_classifier
from fv_serving.unlearn import BankCombination, LearnResult, learn_forget_vector, learn_perturbation

RESULT_NAME = "unlearning"
ORIGINAL, RETRAIN = "original (no unlearning)", "Retrain"
FV, FV_NO_FLOOR = "forget vector", "forget vector, no retain floor"
GATED, GATED_NO_FLOOR = "gated forget vector", "gated forget vector, no retain floor"
MASKING = "output masking"
COMPOSED_SUM, COMPOSED_LEARNED = "composed vector, zero-shot sum", "composed vector, learned coefficients"
SCENARIOS = ("class", "random", "pair")
# Table order (the JSON file sorts keys, so order is restored from here when reading it back).
METHOD_ORDER = (
    ORIGINAL,
    RETRAIN,
    "FT",
    "GA",
    "RL",
    "l1-sparse",
    "SalUn",
    FV,
    FV_NO_FLOOR,
    GATED,
    GATED_NO_FLOOR,
    MASKING,
    COMPOSED_SUM,
)


def _ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


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
class _Context:
    config: BenchConfig
    data: Dataset
    split: SplitSpec
    original: Classifier
    device: str
    progress: tqdm
    tuned: dict[tuple[str, str], tuple[str, BaselineConfig]] = field(default_factory=dict)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)
    class_vectors: dict[int, np.ndarray] = field(default_factory=dict)


def _resolve_split(config: BenchConfig, n_train: int) -> SplitSpec:
    val, size = config.val_size, config.train_size
    if config.quick:  # a smoke run adapts to tiny data sets (e.g. a test fixture)
        val = max(1, min(val, n_train // 5))
        size = None if size is None else max(1, min(size, n_train - val))
    return SplitSpec(seed=config.split_seed, val_size=val, train_size=size)


def _train_original(ctx: _Context) -> dict[str, Any]:
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


def _task_split(ctx: _Context, task: Task) -> ForgetSplit:
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


def _baseline(ctx: _Context, task: Task, split: ForgetSplit, method: str) -> tuple[UnlearnedModel, float]:
    """Grid-search the method on this task (or reuse an earlier task's choice); returns (model, search seconds)."""
    config = ctx.config
    kind = "class" if task.scenario in ("class", "pair") else "random"
    key = (kind, method)
    if not config.tune_every_task and key in ctx.tuned:
        source, chosen = ctx.tuned[key]
        ctx.selection.setdefault(task.name, {})[method] = {"reused_from": source, "chosen": chosen.to_json()}
        return unlearn_model(ctx.original, ctx.data, split, chosen, device=ctx.device), 0.0
    grid = next(g for g in config.grids if g.method == method)
    rule = SelectionRule(
        goal="erase" if kind == "class" else "match",
        forget_target=config.vector.forget_target,
        match_tolerance=config.vector.match_tolerance,
        retain_margin=config.vector.retain_margin,
    )
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


def _run_task(ctx: _Context, task: Task) -> dict[str, Any]:
    config, data, device, original = ctx.config, ctx.data, ctx.device, ctx.original
    split = _task_split(ctx, task)
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
    fv = learn_forget_vector(original, data, split, config.vector, device=device)
    delta = torch.from_numpy(fv.delta).to(device)
    add(FV, PerturbedClassifier(original, delta, config.vector.clamp), fv.seconds, 0, **_vector_row(fv))
    if task.scenario == "class":
        ctx.class_vectors[task.spec.classes[0]] = fv.delta
    no_floor: LearnResult | None = None
    if task.scenario != "pair":
        no_floor = learn_forget_vector(
            original, data, split, replace(config.vector, retain_margin=config.no_floor_margin), device=device
        )
        loose = torch.from_numpy(no_floor.delta).to(device)
        add(
            FV_NO_FLOOR,
            PerturbedClassifier(original, loose, config.vector.clamp),
            no_floor.seconds,
            0,
            **_vector_row(no_floor),
        )
    if task.scenario in ("class", "pair"):
        classes = task.spec.classes
        add(
            GATED,
            GatedPerturbedClassifier(original, delta, classes, config.vector.clamp).to(device),
            fv.seconds,
            0,
            note="same vector as the forget-vector row; two classifier passes per input",
        )
        if no_floor is not None:
            loose = torch.from_numpy(no_floor.delta).to(device)
            add(
                GATED_NO_FLOOR,
                GatedPerturbedClassifier(original, loose, classes, config.vector.clamp).to(device),
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


def _composition_rows(ctx: _Context, task: Task, split: ForgetSplit, add: Any) -> None:
    """Zero-shot sum of the pair's class vectors, and coefficients learned over the whole class bank."""
    config, device = ctx.config, ctx.device
    bank_classes = sorted(ctx.class_vectors)
    bank = torch.from_numpy(np.stack([ctx.class_vectors[c] for c in bank_classes]))
    init = torch.tensor([1.0 if c in task.spec.classes else 0.0 for c in bank_classes])
    zero_shot = torch.einsum("k,kchw->chw", init, bank).to(device)
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
        BankCombination(bank, init),
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
    split = _resolve_split(config, len(data.train))
    spec = ModelSpec(
        config.arch, data.input_shape[0], data.num_classes, data.input_shape[1:], data.mean, data.std, data.class_names
    )
    torch.manual_seed(config.train.seed)
    tasks = bench_tasks(config)
    total = sum(_rows_per_task(config, t.scenario) for t in tasks)
    progress = tqdm(total=total, desc="bench unlearning (rows)", mininterval=1.0)
    ctx = _Context(config, data, split, Classifier(spec).to(device), device, progress)
    progress.set_postfix_str("training the original")
    original = _train_original(ctx)
    results = [_run_task(ctx, task) for task in tasks]
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


# ------------------------------------------------------------------ summarising and writing

SUMMARY_COLUMNS = (*METRIC_NAMES, "avg_gap", "seconds", "tuning_seconds", "params_changed")


def summarise(tasks: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario and method: mean and std (ddof=1; 0 for a single task) of every column."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        group = [t for t in tasks if t["scenario"] == scenario]
        if not group:
            continue
        methods = _ordered([m for m in group[0]["rows"] if all(m in t["rows"] for t in group)], METHOD_ORDER)
        table: dict[str, Any] = {}
        for method in methods:
            cells = {}
            for column in SUMMARY_COLUMNS:
                values = np.array([float(t["rows"][method][column]) for t in group])
                cells[column] = {
                    "mean": round(float(values.mean()), 4),
                    "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
                }
            table[method] = cells
        retrain_acc = np.array([[t["retrain"]["train_accuracy"], t["retrain"]["test_accuracy"]] for t in group])
        out[scenario] = {
            "tasks": [t["name"] for t in group],
            "n": len(group),
            "methods": table,
            "retrain_train_accuracy": round(float(retrain_acc[:, 0].mean()), 3),
            "retrain_test_accuracy": round(float(retrain_acc[:, 1].mean()), 3),
        }
    return out


SCENARIO_TITLES = {
    "class": "Class-wise forgetting",
    "random": "Random forgetting",
    "pair": "Two-class forgetting (forget-vector arithmetic)",
}


def _cell(cell: dict[str, float], n: int, digits: int = 2) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" if n > 1 else f"{cell['mean']:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page: setup, accuracy of original/Retrain, one table per scenario, choices."""
    meta, config, original = report["meta"], report["config"], report["original"]
    machine = meta["machine"]
    lines = [
        "# Unlearning benchmark: forget vectors vs model-based baselines",
        "",
        f"- date (UTC): {meta['date']}; wall time: {meta['wall_seconds']:.0f} s"
        + ("; QUICK smoke run (not evidence)" if meta["quick"] else ""),
        f"- command: `{meta['command'] or '(library call)'}`",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"(intra-op threads: {machine['torch_threads']}), device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + (f"; load average at start {machine['load_average_at_start']}" if "load_average_at_start" in machine else "")
        + " (times are wall seconds on a machine shared with other work: compare them within one run)",
        f"- data: {report['dataset']['name']}, model {config['arch']}; original trained on "
        f"{original['train_size']} images (seeded subset, split seed {report['split']['seed']}), "
        f"validation hold-out {original['val_size']} images; TA on "
        + (
            "the whole test pool"
            if config["test_size"] is None
            else f"a seeded {config['test_size']}-image subset of the test pool"
        ),
        f"- original recipe (also Retrain's): {_recipe(config['train'])}",
        f"- forget vectors: {_vector_recipe(config['vector'])}",
        "",
        "## Original and Retrain accuracy (%)",
        "",
        "| model | train | validation | test |",
        "|---|---|---|---|",
        f"| original | {original['train_accuracy']:.2f} | {original['val_accuracy']:.2f} | "
        f"{original['test_accuracy']:.2f} |",
    ]
    for task in report["tasks"]:
        r = task["retrain"]
        lines.append(
            f"| Retrain, {task['name']} (train = D_r) | {r['train_accuracy']:.2f} | - | {r['test_accuracy']:.2f} |"
        )
    lines += [
        "",
        "UA = 100 - accuracy on D_f; RA = accuracy on D_r; TA = accuracy on the test pool (class-wise: retained "
        "classes only); MIA = MIA-Efficacy (confidence attack, calibrated on each model's own outputs); "
        "Avg. Gap = mean |metric - Retrain| over the four (lower is better). Time = wall seconds of the "
        "unlearning step (baselines: the chosen setting's training; vectors: learning incl. stopping-rule checks; "
        "Retrain: training from scratch); tuning = the baselines' grid search on the validation hold-out, "
        "paid per request on top of it. Changed = weight entries that differ "
        "from the original (forget vectors change none; they add one input-sized vector).",
    ]
    for scenario in _ordered(list(report["summary"]), SCENARIOS):
        block = report["summary"][scenario]
        n = block["n"]
        lines += [
            "",
            f"## {SCENARIO_TITLES[scenario]}: {', '.join(block['tasks'])}"
            + (f" (mean ± std over {n})" if n > 1 else ""),
            "",
            "| method | UA | RA | TA | MIA | Avg. Gap | time (s) | tuning (s) | changed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method in _ordered(list(block["methods"]), METHOD_ORDER):
            cells = block["methods"][method]
            changed = round(cells["params_changed"]["mean"])
            lines.append(
                f"| {method} | "
                + " | ".join(_cell(cells[c], n) for c in (*METRIC_NAMES, "avg_gap"))
                + f" | {_cell(cells['seconds'], n, 1)} | {_cell(cells['tuning_seconds'], n, 1)} | {changed:,} |"
            )
    lines += _stopping_lines(report)
    lines += ["", "## How baseline hyper-parameters were chosen (validation hold-out, never the test set)", ""]
    lines += _selection_lines(report)
    lines += [
        "",
        "Forget vectors are not grid-searched: they use the authors' objective and optimiser with the stopping "
        "rule above choosing the stopping point (the same rule as the baselines' selection).",
        "",
    ]
    return "\n".join(lines)


def _selection_lines(report: dict[str, Any]) -> list[str]:
    """One line per kind (the rule), then per method: the grid and the setting chosen for each task."""
    lines: list[str] = []
    per_task = report["selection"]
    for kind in ("class", "random"):
        tuned = [
            (t, m, sel) for t, methods in per_task.items() for m, sel in methods.items() if sel.get("kind") == kind
        ]
        if not tuned:
            continue
        lines.append(
            f"- {kind}-wise tasks (the two-class task included), rule: {tuned[0][2]['rule']}."
            if kind == "class"
            else f"- random tasks, rule: {tuned[0][2]['rule']}."
        )
        for method in METHOD_ORDER:
            picks = [(t, sel) for t, m, sel in tuned if m == method]
            if not picks:
                continue
            first = picks[0][1]
            chosen = ", ".join(f"{t}: lr {sel['chosen']['lr']:g} x {sel['chosen']['epochs']}" for t, sel in picks)
            extra = (
                f"; l1 {first['chosen']['l1_alpha']:g} decaying over {first['chosen']['l1_decay_epochs']} epochs"
                if method == "l1-sparse"
                else ""
            )
            extra += f"; saliency fraction {first['chosen']['saliency_fraction']:g}" if method == "SalUn" else ""
            base = first["chosen"]
            lines.append(
                f"  - {method}: lr {first['grid']['lrs']} x epochs {first['grid']['epochs']} (constant lr, SGD "
                f"momentum {base['momentum']}, weight decay {base['weight_decay']}, batch {base['batch_size']}{extra})"
                f" -> {chosen}"
            )
    reused = sorted(
        {sel["reused_from"] for methods in per_task.values() for sel in methods.values() if "reused_from" in sel}
    )
    if reused:
        lines.append(f"- other tasks reused the choice made on {', '.join(reused)} (tune_every_task=False)")
    return lines


def _recipe(train: dict[str, Any]) -> str:
    return (
        f"SGD (Nesterov, momentum {train['momentum']}, weight decay {train['weight_decay']}), one-cycle peak lr "
        f"{train['lr']}, batch {train['batch_size']}, {train['epochs']} epochs, "
        + ("with augmentation" if train["augment"] else "no augmentation")
        + f", seed {train['seed']}"
    )


def _vector_recipe(vector: dict[str, Any]) -> str:
    return (
        f"beta {vector['beta']}, alpha {vector['alpha']}, tau {vector['tau']}, lambda {vector['lam']}, SGD lr "
        f"{vector['lr']} momentum {vector['momentum']}, ExponentialLR {vector['gamma']}, batch {vector['batch_size']}, "
        f"at most {vector['max_epochs']} epochs, {vector['checks_per_epoch']} stopping-rule checks per epoch; "
        f"retain floor {vector['retain_margin']} points of validation accuracy ('no retain floor' rows: none); "
        f"learned bank coefficients: lr {COMBINATION_LR}, lambda {COMBINATION_LAM} (on ||w||_2)"
    )


def _stopping_lines(report: dict[str, Any]) -> list[str]:
    """Did each learned vector meet its stopping rule, when, and how large is it."""
    lines = [
        "",
        "## Forget-vector stopping (validation hold-out)",
        "",
        "| task | vector | rule met | chosen epoch | epochs run | forget acc (monitor) | val acc (original) "
        "| l2 norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in report["tasks"]:
        for method in _ordered(list(task["rows"]), METHOD_ORDER):
            row = task["rows"][method]
            extra = row.get("extra", {})
            stop = extra.get("stopping")
            if stop is None:
                continue
            lines.append(
                f"| {task['name']} | {method} | {'yes' if stop['rule_met'] else 'NO'} | {stop['chosen_epoch']} | "
                f"{stop['epochs_run']} | {stop['forget_acc_monitor']:.1f} | {stop['holdout_acc']:.1f} "
                f"({stop['holdout_acc_original']:.1f}) | {extra['delta_l2']:.2f} |"
            )
    return lines


FAMILY_COLOURS = {
    ORIGINAL: "#9e9e9e",
    RETRAIN: "#212121",
    MASKING: "#2e7d32",
}


def _colour(method: str) -> str:
    if method in FAMILY_COLOURS:
        return FAMILY_COLOURS[method]
    if "gated" in method:
        return "#c62828"
    if "vector" in method:
        return "#ef6c00"
    return "#1565c0"


def plot_summary(report: dict[str, Any], path: str | Path) -> Path:
    """One row of panels per scenario (UA, RA, TA, MIA, Avg. Gap), one horizontal bar per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    summary = {k: report["summary"][k] for k in _ordered(list(report["summary"]), SCENARIOS)}
    columns = (*METRIC_NAMES, "avg_gap")
    titles = {
        "UA": "UA (%)",
        "RA": "RA (%)",
        "TA": "TA (%)",
        "MIA": "MIA-Efficacy (%)",
        "avg_gap": "Avg. Gap (lower better)",
    }
    heights = [max(2.0, 0.32 * len(b["methods"]) + 0.8) for b in summary.values()]
    fig, axes = plt.subplots(
        len(summary), len(columns), figsize=(19, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for row, (scenario, block) in enumerate(summary.items()):
        methods = _ordered(list(block["methods"]), METHOD_ORDER)
        y = np.arange(len(methods))
        for col, column in enumerate(columns):
            ax = axes[row][col]
            means = [block["methods"][m][column]["mean"] for m in methods]
            stds = [block["methods"][m][column]["std"] for m in methods]
            ax.barh(y, means, xerr=stds, color=[_colour(m) for m in methods], capsize=2)
            ax.set_yticks(y, methods if col == 0 else [""] * len(methods), fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=7)
            if column != "avg_gap":
                ax.set_xlim(0, 105)
            ax.set_title(
                f"{SCENARIO_TITLES[scenario].split(' (')[0]}: {titles[column]}" if col == 0 else titles[column],
                fontsize=8,
            )
    fig.suptitle(
        f"Unlearning benchmark, {report['dataset']['name']} / {report['config']['arch']} ({report['meta']['date']})",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def write_results(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {
        "json": write_json_atomic(out / f"{RESULT_NAME}.json", report),
        "markdown": write_bytes_atomic(out / f"{RESULT_NAME}.md", format_markdown(report).encode()),
        "png": plot_summary(report, out / f"{RESULT_NAME}.png"),
    }
    return paths
