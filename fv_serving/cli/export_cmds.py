"""`fv export classifier | fused | forget`: the ONNX side.

Each command builds the graph in memory, verifies it (ONNX checker full check,
onnxruntime against PyTorch or against apply_delta), and only then writes one file
atomically; a refusal leaves no output behind. What was verified is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def _normalized_input(args: argparse.Namespace) -> tuple[list[float], list[float]] | None:
    if not args.normalized_input:
        if args.mean is not None or args.std is not None:
            raise InvalidInputError("--mean/--std are only used with --normalized-input")
        return None
    if args.mean is None or args.std is None:
        raise InvalidInputError("--normalized-input needs --mean and --std (one value per channel)")
    return list(args.mean), list(args.std)


def cmd_fused(args: argparse.Namespace) -> int:
    from fv_serving.fingerprint import probe_batch
    from fv_serving.onnx.fuse import fuse_vector
    from fv_serving.onnx.graph import GraphSummary, find_image_input, graph_inputs, load_model, save_model
    from fv_serving.onnx.runtime import verify_fused
    from fv_serving.vectors import load_vector

    normalized = _normalized_input(args)
    vector = load_vector(args.vector)
    original = load_model(args.onnx, "classifier graph")
    fused = fuse_vector(
        original,
        vector,
        input_name=args.input_name,
        normalized_input=normalized,
        force=args.force,
        provider=args.provider,
    )
    image = find_image_input(original, args.input_name)
    verified = [
        "onnx.checker full check",
        "inputs and outputs identical to the original graph (drop-in replacement)",
        "classifier check SKIPPED (--force; recorded in metadata fv_serving.forced)"
        if args.force
        else "classifier check: the unfused graph reproduces the vector's probe logits",
    ]
    if len(graph_inputs(original)) == 1:
        err = verify_fused(
            original,
            fused,
            vector,
            probe_batch(image.chw),
            input_name=image.name,
            normalized_input=normalized,
            provider=args.provider,
        )
        verified.append(f"fused(x) == original(clamp(x + delta)) in onnxruntime on probe images: max |diff| {err:.2e}")
    else:
        verified.append("parity not run: the graph has inputs besides the image")
    written = save_model(fused, args.out, "the fused graph")
    space = f"normalised input (delta/std added; mean {normalized[0]}, std {normalized[1]})" if normalized else "pixels"
    clamp = f", clamp {list(vector.clamp)}" if vector.clamp else ""
    _print(GraphSummary.of(fused, written, verified).lines())
    print(f"  vector {vector.vector_id}{clamp} added to input {image.name!r} ({space})")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from fv_serving.arithmetic import bank_class_names, class_ids, vector_from_bank, zero_shot_vector
    from fv_serving.fingerprint import probe_batch
    from fv_serving.onnx.fuse import forget_step_graph
    from fv_serving.onnx.graph import GraphSummary, load_model, save_model
    from fv_serving.onnx.runtime import check_vector_matches, verify_forget_step
    from fv_serving.vectors import ForgetVector, load_bank, load_vector

    vector: ForgetVector | None = None
    if args.vector:
        vector = load_vector(args.vector)
        what = f"vector {vector.vector_id}"
    elif args.bank:
        bank = load_bank(args.bank)
        if (args.classes is None) == (args.coefficients is None):
            raise InvalidInputError("with --bank give either --classes (zero-shot sum/mean) or --coefficients")
        if args.coefficients is not None:
            vector = vector_from_bank(bank, args.coefficients, "coefficients")
        else:
            vector = zero_shot_vector(bank, class_ids(args.classes, bank_class_names(bank)), args.mode)
        composed = vector.forget["composed"]
        what = f"composed vector {vector.vector_id} ({composed['mode']}, coefficients {composed['coefficients']})"
    else:
        if args.shape is None:
            raise InvalidInputError("--off needs --shape C H W")
        what = "identity (off) step"
    shape = (args.shape[0], args.shape[1], args.shape[2]) if args.shape else None
    step = forget_step_graph(vector, shape)
    chw = vector.delta.shape if vector is not None else shape
    assert chw is not None
    verified = ["onnx.checker full check"]
    if args.classifier_onnx:
        if vector is None:
            raise InvalidInputError("--classifier-onnx checks a vector; the off step has none")
        check_vector_matches(load_model(args.classifier_onnx, "classifier graph"), vector, provider=args.provider)
        verified.append(f"{args.classifier_onnx} reproduces the vector's probe logits (same classifier)")
    err = verify_forget_step(step, vector, probe_batch(chw), provider=args.provider)
    verified.append(f"output == apply_delta(x, delta, clamp) on probe images: max |diff| {err:.1e}")
    written = save_model(step, args.out, "the forget step graph")
    _print(GraphSummary.of(step, written, verified).lines())
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

    p = kinds.add_parser("fused", help="bake a forget vector into a classifier graph (drop-in, non-bypassable)")
    p.add_argument("--onnx", required=True, help="the classifier graph (ours or any other exporter's)")
    p.add_argument("--vector", required=True, help="forget-vector file (.safetensors)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--input-name", help="the image input, when the graph has several [N,C,H,W] float inputs")
    p.add_argument("--normalized-input", action="store_true", help="the graph takes (x - mean)/std, not pixels")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel pixel mean of that normalisation")
    p.add_argument("--std", type=float, nargs="+", help="per-channel pixel std of that normalisation")
    p.add_argument("--force", action="store_true", help="skip the classifier check (recorded in the graph)")
    _add_provider(p)
    p.set_defaults(func=cmd_fused)

    p = kinds.add_parser("forget", help="the forget step alone (image -> image_fv) for the Triton ensemble")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", help="forget-vector file")
    src.add_argument("--bank", help="vector bank: combined at export into one vector")
    src.add_argument("--off", action="store_true", help="identity step (forgetting off), needs --shape")
    p.add_argument("--classes", nargs="+", help="with --bank: classes to forget (index or name)")
    p.add_argument("--mode", choices=("sum", "mean"), default="sum", help="with --classes: zero-shot rule")
    p.add_argument("--coefficients", type=float, nargs="+", help="with --bank: one coefficient per bank vector")
    p.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="image shape (--off)")
    p.add_argument("--classifier-onnx", help="also check the vector against this classifier graph")
    p.add_argument("--out", required=True, type=Path)
    _add_provider(p)
    p.set_defaults(func=cmd_forget)
