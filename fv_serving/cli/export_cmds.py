"""`fv export classifier | fused | forget`: the ONNX side.

Each command builds the graph in memory, verifies it (ONNX checker full check,
onnxruntime against PyTorch or against apply_delta), and only then writes one file
atomically; a refusal leaves no output behind. What was verified is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fv_serving.cli.common import add_graph_input, normalized_input
from fv_serving.cli.serving_args import (
    add_admission,
    add_vector_choice,
    admission_policy,
    print_warnings,
    vector_choice,
)
from fv_serving.errors import DataNotFoundError, InvalidInputError


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)


def cmd_classifier(args: argparse.Namespace) -> int:
    import torch

    from fv_serving.data import load_dataset, to_numpy_images
    from fv_serving.models import load_classifier
    from fv_serving.onnx.export import export_classifier

    loaded = load_classifier(args.classifier)
    images, note = None, None
    if args.parity_images > 0:
        try:
            data = load_dataset(loaded.info["dataset"], args.data_root or loaded.info.get("data_root"))
            n = min(args.parity_images, len(data.test))
            images = to_numpy_images(data.test, torch.arange(n))
        except (KeyError, DataNotFoundError) as exc:
            note = f"parity on real images skipped (data set not available: {exc}); probe images only"
    summary = export_classifier(
        loaded.model, args.out, args.opset, exporter=args.exporter, images=images, provider=args.provider
    )
    _print(summary.lines())
    print(f"  classifier sha256 {summary.metadata.get('fv_serving.classifier_sha256', '?')[:12]} recorded in metadata")
    if note:
        print(f"  note: {note}")
    return 0


def cmd_fused(args: argparse.Namespace) -> int:
    from fv_serving.onnx.checked import fuse_gated_vector, fuse_vector
    from fv_serving.onnx.graph import GraphSummary, find_image_input, load_model, save_model
    from fv_serving.vectors import load_vector

    if Path(args.out).absolute() == Path(args.onnx).absolute() or (
        Path(args.out).exists() and Path(args.out).samefile(args.onnx)
    ):
        raise InvalidInputError(f"--out {args.out} is the input graph itself; write the fused graph to another file")
    normalized = normalized_input(args)
    vector = load_vector(args.vector)
    original = load_model(args.onnx, "classifier graph")
    fuse = fuse_gated_vector if args.gated else fuse_vector
    fused = fuse(
        original,
        vector,
        input_name=args.input_name,
        normalized_input=normalized,
        force=args.force,
        provider=args.provider,
        policy=admission_policy(args),
        id_output=args.id_output,
    )
    written = save_model(fused.graph, args.out, "the fused graph")
    image = find_image_input(original, args.input_name)
    space = f"normalised input (delta/std added; mean {normalized[0]}, std {normalized[1]})" if normalized else "pixels"
    clamp = f", clamp {list(vector.clamp)}" if vector.clamp else ""
    _print(GraphSummary.of(fused.graph, written, list(fused.checks)).lines())
    print_warnings(fused.warnings)
    where = "added to input" if not args.gated else "added, where the classifier predicts a forgotten class, to input"
    print(f"  vector {vector.vector_id}{clamp} {where} {image.name!r} ({space}); inputs outside [0,1] clipped")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from fv_serving.onnx.checked import forget_step
    from fv_serving.onnx.graph import GraphSummary, load_model, save_model

    choice = vector_choice(args)
    vector = choice.resolve()
    if vector is None and args.shape is None:
        raise InvalidInputError("--off needs --shape C H W")
    if vector is None and args.classifier_onnx:
        raise InvalidInputError("--classifier-onnx checks a vector; the off step has none")
    shape = (args.shape[0], args.shape[1], args.shape[2]) if args.shape else None
    chw = shape or vector.delta.shape if vector is not None else shape
    assert chw is not None
    classifier = load_model(args.classifier_onnx, "classifier graph") if args.classifier_onnx else None
    step = forget_step(
        vector,
        (int(chw[0]), int(chw[1]), int(chw[2])),
        classifier=classifier,
        force=args.force,
        provider=args.provider,
        policy=admission_policy(args),
    )
    written = save_model(step.graph, args.out, "the forget step graph")
    _print(GraphSummary.of(step.graph, written, list(step.checks)).lines())
    print_warnings(step.warnings)
    what = "identity (off) step" if vector is None else f"vector {vector.vector_id} ({choice.describe()['kind']})"
    print(f"  forget step: {what}")
    return 0


def _add_provider(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime provider for the checks (cuda: gpu)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    from fv_serving.cli.common import OneLineErrorParser
    from fv_serving.config import EXPORTERS
    from fv_serving.onnx.graph import DEFAULT_OPSET

    export = sub.add_parser("export", help="ONNX: export the classifier, fuse a vector, build a forget step")
    kinds = export.add_subparsers(dest="export_kind", required=True, parser_class=OneLineErrorParser)

    p = kinds.add_parser("classifier", help="PyTorch checkpoint -> one ONNX file (raw pixels in, logits out)")
    p.add_argument("--classifier", required=True, help="checkpoint written by `fv train`")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"default {DEFAULT_OPSET}")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch.onnx exporter (default dynamo)")
    p.add_argument("--parity-images", type=int, default=256, help="real test images for the parity check (0: none)")
    p.add_argument("--data-root", help="where the classifier's data set is (default: as trained)")
    _add_provider(p)
    p.set_defaults(func=cmd_classifier)

    p = kinds.add_parser("fused", help="bake a forget vector into a classifier graph (drop-in)")
    p.add_argument("--onnx", required=True, help="the classifier graph (ours or any other exporter's)")
    p.add_argument("--vector", required=True, help="forget-vector file (.safetensors)")
    p.add_argument("--out", required=True, type=Path)
    add_graph_input(p)
    p.add_argument("--id-output", action="store_true", help="add a vector_id output (changes the outputs)")
    p.add_argument(
        "--gated",
        action="store_true",
        help="gated mode: delta only where the classifier predicts one of the vector's forgotten classes "
        "(class-wise vectors; a second classifier pass on those images; not input-agnostic)",
    )
    add_admission(p)
    _add_provider(p)
    p.set_defaults(func=cmd_fused)

    p = kinds.add_parser("forget", help="the forget step alone (image -> image_fv, vector_id) for the Triton ensemble")
    add_vector_choice(p)
    p.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="image shape (--off)")
    p.add_argument("--classifier-onnx", help="also check the vector against this classifier graph")
    p.add_argument("--out", required=True, type=Path)
    _add_provider(p)
    p.set_defaults(func=cmd_forget)
