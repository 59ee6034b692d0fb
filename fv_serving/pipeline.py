"""The library's verbs, one per CLI command: train, learn, bank, compose, evaluate.

Each verb reads files made by the previous stage (a checkpoint, a vector, a bank)
and writes its own, so every stage is usable on its own. A checkpoint remembers
its data set and split, so later stages rebuild exactly the same D_f / D_r /
hold-out sets from a few stored numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fv_serving.arithmetic import vector_from_bank, zero_shot_vector, zero_shot_weights
from fv_serving.atomic import write_json_atomic
from fv_serving.config import TrainConfig, VectorConfig, combination_config
from fv_serving.data import (
    Dataset,
    ForgetSpec,
    ForgetSplit,
    SplitSpec,
    default_augmentation,
    load_dataset,
    make_forget_split,
)
from fv_serving.distributed import SINGLE, Dist
from fv_serving.errors import InvalidInputError, ModelMismatchError
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.metrics import UnlearningMetrics, evaluate_unlearning, per_class_accuracy, predict
from fv_serving.models import (
    Classifier,
    LoadedClassifier,
    ModelSpec,
    PerturbedClassifier,
    channels_last,
    freeze,
    load_classifier,
    save_classifier,
)
from fv_serving.plots import plot_bank, plot_per_class, plot_vector
from fv_serving.train import train_classifier
from fv_serving.unlearn import BankCombination, learn_forget_vector, learn_perturbation
from fv_serving.vectors import ForgetVector, VectorBank, load_bank, load_vector, save_bank, save_vector


def resolve_device(name: str) -> str:
    """'cpu' (default), 'cuda', or 'auto' (cuda when available)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} asked for, but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise InvalidInputError(f"unknown device {name!r}; expected cpu, cuda or auto")
    return name


@dataclass
class Workspace:
    """A classifier together with the data set and split it was trained on."""

    loaded: LoadedClassifier
    data: Dataset
    split: SplitSpec
    device: str

    @property
    def model(self) -> Classifier:
        return self.loaded.model

    def fingerprint(self) -> ClassifierFingerprint:
        spec = self.model.spec
        return ClassifierFingerprint.of(self.model, spec.input_shape, spec.num_classes)

    def forget_split(self, spec: ForgetSpec) -> ForgetSplit:
        return make_forget_split(self.data, self.split, spec)


def open_workspace(classifier: str | Path, data_root: str | Path | None = None, device: str = "cpu") -> Workspace:
    device = resolve_device(device)
    loaded = load_classifier(classifier, device=device)
    channels_last(loaded.model)  # learning, evaluation and baselines all run the classifier in torch
    info = loaded.info
    if "dataset" not in info or "split" not in info:
        raise InvalidInputError(f"{classifier} does not record its data set and split: was it written by `fv train`?")
    root = data_root if data_root is not None else info.get("data_root")
    data = load_dataset(info["dataset"], root)
    if data.input_shape != loaded.model.spec.input_shape:
        raise ModelMismatchError(
            f"{classifier} takes {list(loaded.model.spec.input_shape)} images, data set gives {list(data.input_shape)}"
        )
    return Workspace(loaded, data, SplitSpec.from_json(info["split"]), device)


def parse_forget_spec(data: Dataset, classes: list[str] | None, percent: float | None, seed: int) -> ForgetSpec:
    """Classes given by index or name, or a random percentage; exactly one of the two."""
    if classes:
        return ForgetSpec(classes=tuple(data.class_index(c) for c in classes))
    if percent is None:
        raise InvalidInputError("say what to forget: --forget-class or --forget-percent")
    return ForgetSpec(percent=percent, seed=seed)


# ------------------------------------------------------------------ train


def train_model(
    dataset: str,
    out: str | Path,
    *,
    arch: str = "small-cnn",
    config: TrainConfig | None = None,
    split: SplitSpec | None = None,
    exclude: ForgetSpec | None = None,
    exclude_classes: list[str] | None = None,
    data_root: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a classifier on the train pool, or on D_r only (`exclude`: the Retrain reference)."""
    device = resolve_device(device)
    config = config or TrainConfig()
    split = split or SplitSpec()
    data = load_dataset(dataset, data_root)
    if exclude_classes:
        exclude = ForgetSpec(classes=tuple(data.class_index(c) for c in exclude_classes))
    spec = ModelSpec(
        arch,
        data.input_shape[0],
        data.num_classes,
        data.input_shape[1:],
        data.mean,
        data.std,
        data.class_names,
    )
    torch.manual_seed(config.seed)
    model = channels_last(Classifier(spec).to(device))
    pool, val = split.indices(len(data.train))
    train_idx = pool if exclude is None else make_forget_split(data, split, exclude).retain
    history = train_classifier(
        model,
        data,
        train_idx,
        config,
        augmentation=default_augmentation(data),
        device=device,
        desc="train" if exclude is None else "retrain",
    )
    freeze(model)
    test_all = torch.arange(len(data.test))
    report: dict[str, Any] = {
        "dataset": dataset,
        "data_root": str(data_root) if data_root is not None else None,
        "split": split.to_json(),
        "trained_on": "train pool" if exclude is None else {"retain_of": exclude.to_json()},
        "excluded": exclude.to_json() if exclude is not None else None,
        "train_size": len(train_idx),
        "config": config.to_json(),
        "seconds": round(history["seconds"], 2),
        "epoch_losses": [round(v, 5) for v in history["epoch_losses"]],
        "accuracy": {
            "train": predict(model, data.train, train_idx, device=device).accuracy,
            "val": predict(model, data.train, val, device=device).accuracy,
            "test": predict(model, data.test, test_all, device=device).accuracy,
        },
        "test_accuracy_per_class": per_class_accuracy(model, data.test, data.num_classes, device=device),
    }
    report["weights_sha256"] = ClassifierFingerprint.of(model, spec.input_shape, spec.num_classes).weights_sha256
    out = Path(out)
    save_classifier(model.cpu(), out, report)
    write_json_atomic(out.with_suffix(".json"), report)
    return report


# ------------------------------------------------------------------ vectors


def _evaluate(ws: Workspace, model: torch.nn.Module, split: ForgetSplit) -> tuple[UnlearningMetrics, dict[str, Any]]:
    return evaluate_unlearning(model, ws.data, split, device=ws.device)


def learn_vector(
    ws: Workspace,
    forget: ForgetSpec,
    out: str | Path,
    *,
    config: VectorConfig | None = None,
    evaluate: bool = True,
    dist: Dist = SINGLE,
) -> tuple[ForgetVector, dict[str, Any]]:
    """Learn one vector for a class-wise or random forget set and write it with its metadata.

    Without `config`, the task's default (`VectorConfig.default_for`), as `fv learn` without --preset.

    Data-parallel under torch.distributed (`dist`): every rank learns the same vector;
    rank 0 alone evaluates it and writes the file (the others return it unevaluated,
    once the file is there).
    """
    config = config or VectorConfig.default_for(forget.kind)
    split = ws.forget_split(forget)
    result = learn_forget_vector(ws.model, ws.data, split, config, device=ws.device, dist=dist)
    metrics: dict[str, Any] = {"stopping": {**result.stopping_report(), "processes": dist.world}}
    if evaluate and dist.is_main:
        g = PerturbedClassifier(ws.model, torch.from_numpy(result.delta).to(ws.device), config.clamp)
        unlearned, details = _evaluate(ws, g, split)
        metrics.update(unlearned.to_json(), details=details)
    vector = ForgetVector(
        classifier=ws.fingerprint(),
        delta=result.delta,
        clamp=config.clamp,
        forget=split.describe(),
        hparams=config.to_json(),
        metrics=metrics,
        notes={
            "dataset": ws.data.name,
            "split": ws.split.to_json(),
            "class_names": list(ws.data.class_names),
        },
    )
    if dist.is_main:
        save_vector(vector, out)
    dist.barrier()
    return vector, metrics


def learn_bank(
    ws: Workspace,
    config: VectorConfig,
    out: str | Path,
    classes: list[int] | None = None,
    *,
    dist: Dist = SINGLE,
) -> VectorBank:
    """Learn one class-wise vector per class (all classes by default) into a single bank file.

    Class-parallel under torch.distributed (`dist`): rank r learns classes r, r+N, ...
    alone, the vectors are gathered, and rank 0 writes the bank once; every rank
    returns the whole bank.
    """
    classes = list(range(ws.data.num_classes)) if classes is None else classes
    mine = {}
    for c in classes[dist.rank :: dist.world]:
        split = ws.forget_split(ForgetSpec(classes=(c,)))
        result = learn_forget_vector(ws.model, ws.data, split, config, device=ws.device)
        mine[c] = (result.delta, result.stopping_report())
    learned = {c: entry for part in dist.all_gather(mine) for c, entry in part.items()}
    bank = VectorBank(
        classifier=ws.fingerprint(),
        vectors=np.stack([learned[c][0] for c in classes]),
        classes=classes,
        clamp=config.clamp,
        hparams=config.to_json(),
        metrics={"per_class_stopping": {str(c): learned[c][1] for c in classes}, "processes": dist.world},
        notes={
            "dataset": ws.data.name,
            "split": ws.split.to_json(),
            "class_names": list(ws.data.class_names),
        },
    )
    if dist.is_main:
        save_bank(bank, out)
    dist.barrier()
    return bank


COMPOSE_MODES = ("sum", "mean", "learned")


def compose_vector(
    bank: VectorBank,
    classes: list[int],
    mode: str,
    out: str | Path,
    *,
    ws: Workspace | None = None,
    config: VectorConfig | None = None,
    evaluate: bool = True,
) -> tuple[ForgetVector, dict[str, Any]]:
    """A new vector from a bank: zero-shot (sum/mean of chosen classes) or learned coefficients.

    Learned coefficients (and evaluation) need the classifier (`ws`); zero-shot
    composition without `ws` needs only the bank file.
    """
    if mode not in COMPOSE_MODES:
        raise InvalidInputError(f"unknown composition mode {mode!r}; expected one of {COMPOSE_MODES}")
    if ws is not None:
        bank.classifier.check_weights(ws.model, "the bank")
    metrics: dict[str, Any] = {}
    split = ws.forget_split(ForgetSpec(classes=tuple(classes))) if ws is not None else None
    if mode == "learned":
        if ws is None or split is None:
            raise InvalidInputError("learned composition needs the classifier (--classifier)")
        cfg = config or combination_config(VectorConfig())
        init = torch.from_numpy(zero_shot_weights(bank.classes, classes, "sum"))
        result = learn_perturbation(
            ws.model,
            ws.data,
            split,
            BankCombination(torch.from_numpy(bank.vectors), init),
            cfg,
            goal="erase",
            device=ws.device,
            desc="coefficients",
        )
        assert result.weights is not None
        vector = vector_from_bank(bank, result.weights, mode, classes)
        vector.hparams = cfg.to_json()
        metrics["stopping"] = result.stopping_report()
    else:
        vector = zero_shot_vector(bank, classes, mode)
    if evaluate and ws is not None and split is not None:
        g = PerturbedClassifier(ws.model, torch.from_numpy(vector.delta).to(ws.device), bank.clamp)
        unlearned, details = _evaluate(ws, g, split)
        metrics.update(unlearned.to_json(), details=details)
        metrics["per_forgotten_class_UA"] = per_class_forget_ua(ws, g, split)
    vector.metrics = metrics
    save_vector(vector, out)
    return vector, metrics


def _forget_label(forget: ForgetSpec, class_names: Sequence[str]) -> str:
    if forget.classes:
        return " + ".join(class_names[c] for c in forget.classes)
    return f"a random {forget.percent:g}% of the training set (seed {forget.seed})"


def per_class_forget_ua(ws: Workspace, model: torch.nn.Module, split: ForgetSplit) -> dict[str, float]:
    """UA on each forgotten class's training images separately (a composed vector must forget every one)."""
    labels = ws.data.train.labels[split.forget]
    return {
        str(c): 100.0 - predict(model, ws.data.train, split.forget[labels == c], device=ws.device).accuracy
        for c in split.spec.classes
    }


# ------------------------------------------------------------------ evaluate


def evaluate_vector(
    ws: Workspace,
    vector: ForgetVector | None,
    out_dir: str | Path,
    *,
    forget: ForgetSpec | None = None,
    retrain: Workspace | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Original vs forget vector (vs Retrain): UA/RA/TA/MIA, Avg. Gap, per-class accuracy, PNGs, JSON."""
    start = time.perf_counter()
    if vector is not None and not force:
        vector.classifier.check_weights(ws.model, "the vector")
    if forget is None:
        if vector is None:
            raise InvalidInputError("say what was forgotten: give a vector or --forget-class/--forget-percent")
        forget = ForgetSpec.from_json(vector.forget)
    split = ws.forget_split(forget)
    if vector is not None and vector.forget.get("forget_indices_sha256") not in (
        None,
        split.describe()["forget_indices_sha256"],
    ):
        raise InvalidInputError("the vector's recorded forget set differs from the one rebuilt here (other split?)")
    rows: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {"original": ws.model}
    if vector is not None:
        models["forget vector"] = PerturbedClassifier(
            ws.model, torch.from_numpy(vector.delta).to(ws.device), vector.clamp
        )
    if retrain is not None:
        excluded = retrain.loaded.info.get("excluded")
        if excluded != forget.to_json() or retrain.split != ws.split:
            raise InvalidInputError(
                f"the Retrain model was trained without {excluded} (split {retrain.split}); "
                f"this task forgets {forget.to_json()} (split {ws.split})"
            )
        models["retrain"] = retrain.model
    for name, model in models.items():
        metrics, details = _evaluate(ws, model, split)
        rows[name] = {**metrics.to_json(), **details}
    if retrain is not None:
        reference = UnlearningMetrics.from_row(rows["retrain"])
        for row in rows.values():
            row["avg_gap"] = round(UnlearningMetrics.from_row(row).avg_gap(reference), 4)
    out_dir = Path(out_dir)
    per_class = {
        name: per_class_accuracy(m, ws.data.test, ws.data.num_classes, device=ws.device) for name, m in models.items()
    }
    figures = [
        str(
            plot_per_class(
                ws.data.class_names,
                per_class,
                list(forget.classes),
                out_dir / "per_class.png",
                f"Test accuracy per class, forgetting {_forget_label(forget, ws.data.class_names)}",
            )
        )
    ]
    if vector is not None:
        figures.append(str(plot_vector(vector.delta, out_dir / "vector.png", f"forget vector {vector.vector_id}")))
    report = {
        "task": split.describe(),
        "vector": vector.describe() if vector is not None else None,
        "rows": rows,
        "test_accuracy_per_class": per_class,
        "figures": figures,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(out_dir / "evaluation.json", report)
    return report


def bank_figure(bank: VectorBank, path: str | Path) -> Path:
    names = bank.notes.get("class_names") or [str(c) for c in bank.classes]
    return plot_bank(bank.vectors, [names[c] if c < len(names) else str(c) for c in bank.classes], path)


__all__ = [
    "COMPOSE_MODES",
    "Workspace",
    "bank_figure",
    "compose_vector",
    "evaluate_vector",
    "learn_bank",
    "learn_vector",
    "load_bank",
    "load_vector",
    "open_workspace",
    "parse_forget_spec",
    "resolve_device",
    "train_model",
]
