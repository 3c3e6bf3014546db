"""`stnpadim export`: writes a saved model's whole predict path as one ONNX graph."""
from __future__ import annotations

from pathlib import Path

from ..models.padim import load
from ..models.padim.export import DECISION_OUTPUTS, OUTPUTS
from .outputs import check_outputs


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
