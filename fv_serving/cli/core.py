"""`fv train | learn | bank | compose | evaluate | inspect`: the PyTorch side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fv_serving.cli.common import (
    add_data_root,
    add_device,
    add_forget_target,
    add_graph_input,
    add_nproc,
    add_vector_config,
    forget_kind,
    normalized_input,
    print_json,
    print_table,
    torchrun_argv,
    vector_config,
)
from fv_serving.errors import InvalidInputError

if TYPE_CHECKING:
    from fv_serving.data import ForgetSpec
    from fv_serving.vectors import ForgetVector
from fv_serving.config import (
    ARCHITECTURES,
    DATASETS,
    DEFAULT_VAL_SIZE,
    METRIC_NAMES,
    TrainConfig,
    VectorConfig,
    combination_config,
    with_overrides,
)


def _forget_given(args: argparse.Namespace) -> bool:
    """Whether a forget target was given; a one-line error for none (where one is required) or both."""
    if args.forget_class is None and args.forget_percent is None:
        if args._forget_required:
            raise InvalidInputError("say what to forget: --forget-class C or --forget-percent P")
        return False
    if args.forget_class is not None and args.forget_percent is not None:
        raise InvalidInputError("give --forget-class or --forget-percent, not both")
    return True


def _forget_spec(args: argparse.Namespace, ws: object) -> ForgetSpec | None:
    from fv_serving.pipeline import Workspace, parse_forget_spec

    assert isinstance(ws, Workspace)
    if not _forget_given(args):
        return None
    return parse_forget_spec(ws.data, args.forget_class, args.forget_percent, args.forget_seed)


def cmd_train(args: argparse.Namespace) -> int:
    from fv_serving.data import ForgetSpec, SplitSpec
    from fv_serving.pipeline import train_model

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment, seed=args.seed
    )
    exclude = None
    if args.exclude_percent is not None:
        exclude = ForgetSpec(percent=args.exclude_percent, seed=args.exclude_seed)
    report = train_model(
        args.data,
        args.out,
        arch=args.arch,
        config=config,
        split=SplitSpec(seed=args.split_seed, val_size=args.val_size, train_size=args.train_size),
        exclude=exclude,
        exclude_classes=args.exclude_class,
        data_root=args.data_root,
        device=args.device,
    )
    acc = report["accuracy"]
    print(
        f"trained {args.arch} on {report['train_size']} images in {report['seconds']:.0f} s: "
        f"train {acc['train']:.2f}%  val {acc['val']:.2f}%  test {acc['test']:.2f}%"
    )
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def _learn_for_onnx(args: argparse.Namespace, config: VectorConfig) -> tuple[ForgetVector, ForgetSpec, dict[str, Any]]:
    """`fv learn --onnx`: a vector for the user's own classifier graph (fv_serving/byo.py)."""
    from fv_serving.byo import learn_vector_for_onnx
    from fv_serving.data import ForgetSpec
    from fv_serving.pipeline import resolve_device

    if args.nproc > 1:
        raise InvalidInputError("--onnx learns in one process (--nproc is for --classifier checkpoints)")
    _forget_given(args)  # `fv learn` requires one: this returns True or raises
    forget = args.forget_class or ForgetSpec(percent=args.forget_percent, seed=args.forget_seed)
    vector, metrics = learn_vector_for_onnx(
        args.onnx,
        forget,
        config,
        args.out,
        data=args.data,
        data_root=args.data_root,
        input_name=args.input_name,
        normalized_input=normalized_input(args),
        device=resolve_device(args.device),
        evaluate=not args.no_eval,
    )
    return vector, ForgetSpec.from_json(vector.forget), metrics


def cmd_learn(args: argparse.Namespace) -> int:
    from fv_serving.distributed import launch, process_group
    from fv_serving.matching import check_objective
    from fv_serving.pipeline import learn_vector, open_workspace, resolve_device

    config = vector_config(args)
    if args.onnx:
        learned, forget, results = _learn_for_onnx(args, config)
        return _report_learned(args, config, learned, forget, results, world=1)
    if args.input_name or args.normalized_input or args.data != "fashion-mnist":
        raise InvalidInputError("--data, --input-name and --normalized-input describe an --onnx graph")
    check_objective(config.objective, forget_kind(args), world=args.nproc, augment=config.augment)
    if args.nproc > 1:
        return launch(args.nproc, torchrun_argv(args))
    with process_group(resolve_device(args.device)) as (dist, device):
        ws = open_workspace(args.classifier, args.data_root, device)
        spec = _forget_spec(args, ws)
        assert spec is not None
        vector, metrics = learn_vector(ws, spec, args.out, config=config, evaluate=not args.no_eval, dist=dist)
    return _report_learned(args, config, vector, spec, metrics, dist.world) if dist.is_main else 0


def _report_learned(
    args: argparse.Namespace,
    config: VectorConfig,
    vector: ForgetVector,
    spec: ForgetSpec,
    metrics: dict[str, Any],
    world: int,
) -> int:
    from fv_serving.stopping import goal_for

    stop = metrics["stopping"]
    processes = f" on {world} processes" if world > 1 else ""
    print(
        f"learned vector {vector.vector_id} for {spec.to_json()} in {stop['seconds']:.0f} s{processes} "
        f"({stop['steps_run']} steps, epoch {stop['chosen_epoch']}, "
        f"stopping rule {'met' if stop['rule_met'] else 'NOT met'}), ||delta||_2 = {vector.l2_norm:.3f}"
    )
    if not stop["rule_met"]:
        print(f"warning: the stopping rule ({config.rule(goal_for(spec.kind)).describe()}) was not met")
    if stop["chosen_epoch"] == 0 and stop["rule_met"]:
        print(
            "warning: the unperturbed model already meets the stopping rule, so the vector is zero: "
            "there is nothing to forget (a model that did not memorise a random subset already treats it "
            "like unseen data)"
        )
    elif stop["chosen_epoch"] == 0:
        print(
            "warning: no point of the run came closer to the stopping rule than the unperturbed model, "
            "so the vector is zero"
            + (
                " (for random subsets the margin objective rarely helps: try the default match preset)"
                if spec.kind == "random" and config.objective == "margin"
                else ""
            )
        )
    if "UA" in metrics:
        print_table({"forget vector": metrics}, METRIC_NAMES)
    print(f"wrote {args.out}")
    return 0


def cmd_bank(args: argparse.Namespace) -> int:
    from fv_serving.distributed import launch, process_group
    from fv_serving.matching import check_objective
    from fv_serving.pipeline import bank_figure, learn_bank, open_workspace, resolve_device

    check_objective(vector_config(args).objective, "class")
    if args.nproc > 1:
        return launch(args.nproc, torchrun_argv(args))
    with process_group(resolve_device(args.device)) as (dist, device):
        ws = open_workspace(args.classifier, args.data_root, device)
        classes = [ws.data.class_index(c) for c in args.classes] if args.classes else None
        bank = learn_bank(ws, vector_config(args), args.out, classes, dist=dist)
    if not dist.is_main:
        return 0
    rows = {ws.data.class_names[int(c)]: r for c, r in bank.metrics["per_class_stopping"].items()}
    print_table(
        rows, ("forget_acc_monitor", "holdout_acc", "chosen_epoch", "steps_run", "seconds"), "per-class vectors:"
    )
    figure = bank_figure(bank, Path(args.out).with_suffix(".png"))
    print(
        f"wrote {args.out} and {figure}" + (f" (classes learned on {dist.world} processes)" if dist.world > 1 else "")
    )
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from fv_serving.arithmetic import bank_class_names, class_ids
    from fv_serving.pipeline import compose_vector, load_bank, open_workspace

    bank = load_bank(args.bank)
    ws = open_workspace(args.classifier, args.data_root, args.device) if args.classifier else None
    classes = [ws.data.class_index(c) for c in args.classes] if ws else class_ids(args.classes, bank_class_names(bank))
    # Coefficients need a smaller step and regulariser than vectors, unless the user sets them.
    config = with_overrides(combination_config(vector_config(args)), lr=args.lr, lam=args.lam)
    vector, metrics = compose_vector(bank, classes, args.mode, args.out, ws=ws, config=config)
    coefficients = vector.forget["composed"]["coefficients"]
    print(f"composed vector {vector.vector_id} ({args.mode}) for classes {classes}; coefficients {coefficients}")
    if "UA" in metrics:
        print_table(
            {"composed": {**metrics, **{f"UA[{c}]": v for c, v in metrics["per_forgotten_class_UA"].items()}}},
            (*METRIC_NAMES, *(f"UA[{c}]" for c in classes)),
        )
    print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fv_serving.pipeline import evaluate_vector, load_vector, open_workspace

    ws = open_workspace(args.classifier, args.data_root, args.device)
    vector = load_vector(args.vector) if args.vector else None
    retrain = open_workspace(args.retrain, args.data_root, args.device) if args.retrain else None
    report = evaluate_vector(ws, vector, args.out_dir, forget=_forget_spec(args, ws), retrain=retrain, force=args.force)
    columns = (*METRIC_NAMES, "avg_gap") if retrain else METRIC_NAMES
    print_table(report["rows"], columns, f"task {report['task']['kind']}: {report['task']}")
    print(f"wrote {Path(args.out_dir) / 'evaluation.json'} and {', '.join(report['figures'])}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fv_serving.vectors import ForgetVector, load_any

    loaded = load_any(args.file)
    if isinstance(loaded, ForgetVector):
        print_json(loaded.describe())
        return 0
    print_json(
        {
            "kind": "bank",
            "classes": loaded.classes,
            "shape": list(loaded.vectors.shape),
            "classifier_sha256": loaded.classifier.weights_sha256,
            "metrics": loaded.metrics,
        }
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier (or the Retrain reference)")
    p.add_argument("--data", default="fashion-mnist", choices=DATASETS)
    add_data_root(p)
    p.add_argument("--arch", default="small-cnn", choices=ARCHITECTURES)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak one-cycle learning rate")
    p.add_argument("--no-augment", action="store_true", help="train without flips (memorises faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation hold-out")
    p.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE, help="images held out from training")
    p.add_argument("--train-size", type=int, help="train on a seeded subset of this many images")
    g = p.add_argument_group("Retrain reference: train without a forget set")
    g.add_argument("--exclude-class", nargs="+", metavar="CLASS")
    g.add_argument("--exclude-percent", type=float, metavar="P")
    g.add_argument("--exclude-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors); metrics go next to it (.json)")
    add_device(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("learn", help="learn one forget vector for a class-wise or random forget set")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--classifier", help="a checkpoint of `fv train`")
    model.add_argument("--onnx", help="or any ONNX classifier graph (converted with onnx2torch; see README)")
    g = p.add_argument_group("with --onnx: the data set and the graph's input")
    g.add_argument("--data", default="fashion-mnist", choices=DATASETS, help="(imagefolder: --data-root DIR)")
    add_graph_input(g)
    add_forget_target(p, required=True)
    add_vector_config(p)
    p.add_argument("--no-eval", action="store_true", help="skip the UA/RA/TA/MIA evaluation at creation")
    p.add_argument("--out", required=True)
    add_data_root(p)
    add_device(p)
    add_nproc(p)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("bank", help="learn one class-wise vector per class into a bank file")
    p.add_argument("--classifier", required=True)
    p.add_argument("--classes", nargs="+", help="classes to learn (default: all)")
    add_vector_config(p)
    p.add_argument("--out", required=True)
    add_data_root(p)
    add_device(p)
    add_nproc(p)
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("compose", help="forget-vector arithmetic: a new vector from a bank")
    p.add_argument("--bank", required=True)
    p.add_argument("--classes", nargs="+", required=True, help="classes the new vector forgets")
    p.add_argument("--mode", choices=("sum", "mean", "learned"), default="sum")
    p.add_argument("--classifier", help="needed for --mode learned; also evaluates the result")
    add_vector_config(p)
    p.add_argument("--out", required=True)
    add_data_root(p)
    add_device(p)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("evaluate", help="UA/RA/TA/MIA (and Avg. Gap) of a vector against the original model")
    p.add_argument("--classifier", required=True)
    p.add_argument("--vector", help="vector file (omit to evaluate the original model alone)")
    p.add_argument("--retrain", help="Retrain reference checkpoint (trained without the forget set)")
    add_forget_target(p, required=False)
    p.add_argument("--force", action="store_true", help="evaluate even if the vector was made for another model")
    p.add_argument("--out-dir", required=True)
    add_data_root(p)
    add_device(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="print a vector's or bank's metadata")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
