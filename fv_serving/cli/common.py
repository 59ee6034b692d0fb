"""Argument groups and printing shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from fv_serving.config import VectorConfig, with_overrides


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
    d = VectorConfig()
    g = parser.add_argument_group("objective and optimiser (docs/method.md sec. 2; defaults = authors' values)")
    g.add_argument(
        "--preset",
        choices=("default", "parity"),
        default="default",
        help="parity: the authors' protocol (200 epochs, no stopping rule)",
    )
    g.add_argument("--beta", type=float, help=f"forget-term weight (default {d.beta})")
    g.add_argument("--alpha", type=float, help=f"retain-term weight (default {d.alpha})")
    g.add_argument("--tau", type=float, help=f"margin floor (default {d.tau})")
    g.add_argument("--lam", type=float, help=f"norm regulariser weight (default {d.lam})")
    g.add_argument("--lr", type=float, help=f"SGD learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--max-epochs", type=int, help=f"(default {d.max_epochs})")
    g.add_argument("--clamp", action="store_true", help="clamp x+delta to [0,1] (training, evaluation and export)")
    g.add_argument("--no-augment", action="store_true", help="no crop/flip augmentation while learning")
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


def vector_config(args: argparse.Namespace) -> VectorConfig:
    base = VectorConfig.parity() if args.preset == "parity" else VectorConfig()
    return with_overrides(
        base,
        beta=args.beta,
        alpha=args.alpha,
        tau=args.tau,
        lam=args.lam,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        seed=args.seed,
        forget_target=args.forget_target,
        match_tolerance=args.match_tolerance,
        retain_margin=args.retain_margin,
        checks_per_epoch=args.checks_per_epoch,
        clamp=(0.0, 1.0) if args.clamp else None,
        augment=False if args.no_augment else None,
        stopping=False if args.no_stopping else None,
    )


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
