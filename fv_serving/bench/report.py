"""The unlearning benchmark's report: summary over tasks, the Markdown page, the PNG chart, the files.

Reads only the report dictionary that `fv_serving.bench.runner` produces (and that
`unlearning.json` stores), so a results file can be re-rendered without running anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.record import vector_settings, vector_terms
from fv_serving.config import COMBINATION_LAM, COMBINATION_LR, METRIC_NAMES

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
    COMPOSED_LEARNED,
)


def ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


SUMMARY_COLUMNS = (*METRIC_NAMES, "avg_gap", "seconds", "tuning_seconds", "params_changed")


def summarise(tasks: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario and method: mean and std (ddof=1; 0 for a single task) of every column."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        group = [t for t in tasks if t["scenario"] == scenario]
        if not group:
            continue
        methods = ordered([m for m in group[0]["rows"] if all(m in t["rows"] for t in group)], METHOD_ORDER)
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
        f"- forget vectors, class-wise: {_vector_recipe(config['vector'])}; learned bank coefficients: "
        f"lr {COMBINATION_LR}, lambda {COMBINATION_LAM} (on ||w||_2)",
        f"- forget vectors, random subsets: {_vector_recipe(config['random_vector'])}; the stopping rule on one half "
        "of the hold-out, the other half the matching objective's reference",
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
    for scenario in ordered(list(report["summary"]), SCENARIOS):
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
        for method in ordered(list(block["methods"]), METHOD_ORDER):
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
    return f"{vector_terms(vector)}; {vector_settings(vector)} ('no retain floor' rows: none)"


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
        for method in ordered(list(task["rows"]), METHOD_ORDER):
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

    summary = {k: report["summary"][k] for k in ordered(list(report["summary"]), SCENARIOS)}
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
        methods = ordered(list(block["methods"]), METHOD_ORDER)
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
