"""Argument groups and printing shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from fv_serving.config import OBJECTIVES, OPTIMIZERS, PRESETS, VectorConfig, with_overrides
from fv_serving.errors import InvalidInputError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="override where the data set's files are (default: as trained)")


def add_forget_target(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("what to forget")
    group.add_argument("--forget-class", nargs="+", metavar="CLASS", help="class index or name (several allowed)")
    group.add_argument("--forget-percent", type=float, metavar="P", help="random P%% of the training set")
    group.add_argument("--forget-seed", type=int, default=0, help="seed of the random forget set (default 0)")
    parser.set_defaults(_forget_required=required)


def add_vector_config(parser: argparse.ArgumentParser) -> None:
    d, m = VectorConfig(), VectorConfig.match()
    g = parser.add_argument_group(
        "objective and optimiser (docs/method.md sec. 2; defaults: the fast preset, or match for random subsets)"
    )
    g.add_argument(
        "--preset",
        choices=PRESETS,
        help="fast (default for classes): Adam on drawn batches, cheap frequent checks (see VectorConfig); "
        "epochs: the previous default, the authors' SGD passes over the forget+retain set with the stopping rule; "
        "parity: the authors' protocol (200 epochs, no stopping rule); "
        "match (default for --forget-percent): the fast preset with a confidence-matching forget term",
    )
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help=f"forget term: margin (the authors'), or confidence / loss matching for random subsets "
        f"(see fv_serving.matching; default {d.objective}, --forget-percent: {m.objective})",
    )
    g.add_argument("--beta", type=float, help=f"forget-term weight (default {d.beta}; match preset {m.beta})")
    g.add_argument("--alpha", type=float, help=f"retain-term weight (default {d.alpha})")
    g.add_argument("--tau", type=float, help=f"margin floor (default {d.tau})")
    g.add_argument("--lam", type=float, help=f"norm regulariser weight (default {d.lam})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--max-epochs", type=int, help=f"(default {d.max_epochs})")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        help=f"draw this many batches per epoch instead of passing over the data (default {d.steps_per_epoch}; "
        "--preset epochs: passes)",
    )
    g.add_argument(
        "--forget-fraction",
        type=float,
        help=f"share of each drawn batch taken from the forget set (default {d.forget_fraction}: the natural "
        f"share; match preset {m.forget_fraction})",
    )
    g.add_argument(
        "--at-risk-share",
        type=float,
        help="share of each drawn batch taken from the retain images a perturbation flips first (default none; "
        "see fv_serving.sampling)",
    )
    g.add_argument("--clamp", action="store_true", help="clamp x+delta to [0,1] (training, evaluation and export)")
    flips = g.add_mutually_exclusive_group()
    flips.add_argument("--augment", action="store_true", help="crop/flip augmentation while learning (epochs: on)")
    flips.add_argument("--no-augment", action="store_true", help="no crop/flip augmentation while learning")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    s = parser.add_argument_group("stopping rule (uses the validation hold-out, never the test set)")
    s.add_argument("--no-stopping", action="store_true", help="run all epochs, keep the last vector")
    s.add_argument("--forget-target", type=float, help=f"class-wise: forget accuracy %% to reach ({d.forget_target})")
    s.add_argument(
        "--match-tolerance",
        type=float,
        help=f"random: allowed |forget acc - hold-out acc| in points ({d.match_tolerance})",
    )
    s.add_argument("--retain-margin", type=float, help=f"allowed hold-out accuracy drop in points ({d.retain_margin})")
    s.add_argument("--checks-per-epoch", type=int, help=f"(default {d.checks_per_epoch})")
    s.add_argument("--monitor-size", type=int, help=f"forget images per check (default {d.monitor_size})")
    s.add_argument(
        "--holdout-size",
        type=int,
        help=f"validation images per check, confirmed on all of them before stopping (default {d.holdout_size})",
    )


def forget_kind(args: argparse.Namespace) -> str:
    """ "random" for --forget-percent, else "class" (commands without a forget target learn class vectors)."""
    return "random" if getattr(args, "forget_percent", None) is not None else "class"


def vector_config(args: argparse.Namespace) -> VectorConfig:
    """The preset (by default the task's: match for random subsets, fast for classes) with the given flags."""
    return with_overrides(
        VectorConfig.preset(args.preset) if args.preset else VectorConfig.default_for(forget_kind(args)),
        objective=args.objective,
        beta=args.beta,
        alpha=args.alpha,
        tau=args.tau,
        lam=args.lam,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        steps_per_epoch=args.steps_per_epoch,
        forget_fraction=args.forget_fraction,
        at_risk_share=args.at_risk_share,
        seed=args.seed,
        forget_target=args.forget_target,
        match_tolerance=args.match_tolerance,
        retain_margin=args.retain_margin,
        checks_per_epoch=args.checks_per_epoch,
        monitor_size=args.monitor_size,
        holdout_size=args.holdout_size,
        clamp=(0.0, 1.0) if args.clamp else None,
        augment=True if args.augment else False if args.no_augment else None,
        stopping=False if args.no_stopping else None,
    )


def add_graph_input(parser: argparse._ActionsContainer) -> None:
    """Which input of a user's classifier graph takes the image, and in what space."""
    parser.add_argument("--input-name", help="the image input, when the graph has several [N,C,H,W] float inputs")
    parser.add_argument("--normalized-input", action="store_true", help="the graph takes (x - mean)/std, not pixels")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel pixel mean of that normalisation")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel pixel std of that normalisation")


def normalized_input(args: argparse.Namespace) -> tuple[list[float], list[float]] | None:
    """(mean, std) of --normalized-input, or None for a graph that takes pixels."""
    if not args.normalized_input:
        if args.mean is not None or args.std is not None:
            raise InvalidInputError("--mean/--std are only used with --normalized-input")
        return None
    if args.mean is None or args.std is None:
        raise InvalidInputError("--normalized-input needs --mean and --std (one value per channel)")
    return list(args.mean), list(args.std)


def add_nproc(parser: argparse.ArgumentParser) -> None:
    """--nproc N: run the command on N local processes under torch.distributed.run (torchrun)."""
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="learn on N local processes (torch.distributed, gloo on CPU / nccl on GPU); "
        "the same as `torchrun --standalone --nproc_per_node N -m fv_serving.cli.main ...`",
    )
    parser.set_defaults(_parser=parser)


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The command line that parses back to `args`, without --nproc: what every torchrun process runs.

    Rebuilt from the parsed arguments rather than taken from sys.argv, so it holds for
    `main([...])` called from Python too.
    """
    argv = [args.command]
    for action in args._parser._actions:
        value = getattr(args, action.dest, action.default)
        if action.dest in ("help", "nproc") or value == action.default:
            continue
        if not action.option_strings:
            argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif action.nargs == 0:  # a switch (store_true)
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return argv


def print_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """A plain fixed-width table on stdout."""
    if title:
        print(title)
    name_width = max([len(n) for n in rows] + [6])
    print(f"{'':<{name_width}}  " + "  ".join(f"{c:>8}" for c in columns))
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:>8.2f}" if isinstance(v, (int, float)) else f"{'-' if v is None else str(v):>8}")
        print(f"{name:<{name_width}}  " + "  ".join(cells))


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    print()
