"""`stnpadim export`: writes a saved model's whole predict path as one ONNX graph."""
from __future__ import annotations

from pathlib import Path

from ..models.padim import load
from ..models.padim.export import DECISION_OUTPUTS, FACTOR_STORAGE, INPUT_DTYPES, OUTPUTS
from .commands import COMMANDS
from .outputs import check_outputs
from .parser import add_force_option, at_least


def register(commands, common) -> None:
    parser = commands.add_parser(
        "export", parents=[common], help=COMMANDS["export"],
        description="Writes MODEL as an ONNX graph: input images [B, 3, H, W] (H, W = the "
                    "model's image size), outputs scores [B] and maps [B, H, W] equal to "
                    "`score`'s, plus normalized_scores, anomalous and masks for a calibrated model. "
                    "Needs the export extra: pip install \"stnpadim[export]\".")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file from `fit`")
    parser.add_argument("--out", required=True, metavar="FILE", help="ONNX file to write")
    parser.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                        help="float32: pixels in [0, 1] (default); uint8: pixels in 0..255")
    parser.add_argument("--batch", type=at_least(1), metavar="N",
                        help="fix the batch size (default: dynamic)")
    parser.add_argument("--factor", choices=FACTOR_STORAGE, default="packed",
                        help="storage of the precision factors: packed (default, half the "
                             "size, same speed under ONNX Runtime) or dense")
    add_force_option(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    check_outputs({args.out: "ONNX model"}, [args.model], args.force)
    model = load(args.model, device="cpu", progress=False)
    out = model.export_onnx(args.out, args.batch, input_dtype=args.input_dtype, factor=args.factor)
    height, width = model.image_size
    batch = args.batch or "B"
    outputs = ", ".join(OUTPUTS + (DECISION_OUTPUTS if model.threshold is not None else ()))
    print(f"exported {args.model} to {out} ({Path(out).stat().st_size / 2**20:.1f} MiB): input "
          f"images [{batch}, 3, {height}, {width}] {args.input_dtype}; outputs {outputs}")
    return 0
