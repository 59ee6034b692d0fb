"""Entry point of `fv`: builds the parser from the command modules; expected errors become one line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fv_serving.cli import bench_cmds, core, export_cmds, fleet_cmds, k8s_cmds, triton_cmds
from fv_serving.cli.common import OneLineErrorParser
from fv_serving.errors import FVError

COMMAND_MODULES = (core, export_cmds, triton_cmds, bench_cmds, fleet_cmds, k8s_cmds)
#: Modules of the [learn] extra: a serving-only install lacks them.
LEARN_MODULES = ("torch", "torchvision", "sklearn", "matplotlib", "onnxscript")


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="fv", description="Forget vectors: learn, export, serve and switch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FVError as exc:
        print(f"fv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in LEARN_MODULES:
            raise
        print(
            f"fv {args.command}: error: this command needs the learning extra (no module {exc.name!r}): "
            "pip install 'fv-serving[learn]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"fv {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fv status | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
