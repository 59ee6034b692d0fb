"""`fv bench unlearning`: the side-by-side unlearning benchmark (fv_serving.bench.runner)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from fv_serving.bench.config import BenchConfig
from fv_serving.cli.common import OneLineErrorParser, add_device, print_table
from fv_serving.config import ARCHITECTURES, DATASETS, METRIC_NAMES

DEFAULT_OUT = Path("benchmarks/results/unlearning")


def cmd_unlearning(args: argparse.Namespace) -> int:
    from fv_serving.bench.runner import run_benchmark

    d = BenchConfig()
    config = BenchConfig(
        data=args.data,
        data_root=args.data_root,
        arch=args.arch,
        device=args.device,
        train_size=None if args.train_size == 0 else args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        split_seed=args.split_seed,
        train=replace(
            d.train,
            epochs=args.train_epochs if args.train_epochs is not None else d.train.epochs,
            lr=args.train_lr if args.train_lr is not None else d.train.lr,
            batch_size=args.train_batch_size if args.train_batch_size is not None else d.train.batch_size,
            augment=args.augment,
        ),
        classes=tuple(args.classes),
        pair=None if args.no_pair else tuple(args.pair),
        percent=args.percent,
        random_seeds=tuple(args.random_seeds),
        seed=args.seed,
        threads=None if args.threads == 0 else args.threads,
    )
    if args.quick:
        config = config.quick_variant()
    command = args.command_line or "fv " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_benchmark(config, args.out_dir, command=command)
    for scenario, block in report["summary"].items():
        rows = {m: {k: v["mean"] for k, v in cells.items()} for m, cells in block["methods"].items()}
        print_table(rows, (*METRIC_NAMES, "avg_gap", "seconds"), f"{scenario} ({block['n']} task(s)), means:")
    print(f"wall time {report['meta']['wall_seconds']:.0f} s; wrote {args.out_dir}/unlearning.json, .md and .png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:

    d = BenchConfig()
    bench = sub.add_parser("bench", help="benchmarks whose results users choose on")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, parser_class=OneLineErrorParser)
    p = kinds.add_parser(
        "unlearning",
        help="forget vectors vs Retrain/FT/GA/RL/l1-sparse/SalUn/masking: UA, RA, TA, MIA, Avg. Gap, time",
        description="Defaults: Fashion-MNIST + small-cnn on CPU, about 25 min on 2 shared cores. CIFAR-10/ResNet-18: "
        "--data cifar10 --data-root DIR --arch resnet18 --device cuda.",
    )
    p.add_argument("--data", default=d.data, choices=DATASETS)
    p.add_argument("--data-root", help="folder of the data set's files (cifar10: the one holding cifar-10-batches-py/)")
    p.add_argument("--arch", default=d.arch, choices=ARCHITECTURES)
    add_device(p)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a minute or two on CPU): not evidence")
    g = p.add_argument_group("data and original model")
    g.add_argument(
        "--train-size", type=int, default=d.train_size, help=f"training subset (0: all; default {d.train_size})"
    )
    g.add_argument("--val-size", type=int, default=d.val_size, help=f"validation hold-out (default {d.val_size})")
    g.add_argument("--test-size", type=int, help="seeded subset of the test pool for TA/MIA (default: all)")
    g.add_argument("--split-seed", type=int, default=d.split_seed)
    g.add_argument("--train-epochs", type=int, help=f"original and Retrain epochs (default {d.train.epochs})")
    g.add_argument("--train-lr", type=float, help=f"peak one-cycle lr (default {d.train.lr})")
    g.add_argument("--train-batch-size", type=int, help=f"(default {d.train.batch_size})")
    g.add_argument("--augment", action="store_true", help="train with augmentation (default off: memorise)")
    t = p.add_argument_group("tasks")
    t.add_argument("--classes", type=int, nargs="+", default=list(d.classes), help=f"class-wise tasks ({d.classes})")
    t.add_argument("--pair", type=int, nargs=2, default=list(d.pair or ()), help=f"two-class task ({d.pair})")
    t.add_argument("--no-pair", action="store_true", help="skip the two-class composition task")
    t.add_argument("--percent", type=float, default=d.percent, help=f"random forgetting %% ({d.percent:g})")
    t.add_argument("--random-seeds", type=int, nargs="*", default=list(d.random_seeds), help=f"({d.random_seeds})")
    p.add_argument("--seed", type=int, default=d.seed, help="baselines and MIA shadow sets")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch CPU threads (default {d.threads}: 2 threads trained 10x slower on a shared 2-core machine; "
        "0: torch's default)",
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_unlearning)
