"""ONNX export of a fitted PaDiM: the whole `predict_batch` path as one standard-ONNX graph.

The graph is traced from `PaDiM.predict_batch` itself by torch.onnx's exporter
(``dynamo=True``, torch.export underneath), so it is the code `predict` runs: resize, STN
(localisation net and affine warp), backbone, embedding, Mahalanobis distance, upsampling
and blur, warp back to the input frame, max. The two custom ops are lowered to standard
ONNX through the exporter's custom translation table (`stnpadim_ext.ops.onnx`); nothing
else is patched.

Graph (B is dynamic unless a batch size is fixed; H, W = the model's image_size):

    input   images             [B, 3, H, W] float32 in [0, 1], or uint8 in [0, 255]
    outputs scores             [B] float32   (max of each map, as predict)
            maps               [B, H, W] float32
    and, when the model has a calibrated threshold:
            normalized_scores  [B] float32   (score / threshold: 1.0 is the boundary)
            anomalous          [B] bool      (score > threshold)
            masks              [B, H, W] bool (map > threshold: the defect regions)

The per-patch precision factor is stored packed (the lower triangle, C(C+1)/2 floats per
patch, half of a full inverse covariance); ONNX Runtime unpacks it once when the session
loads (constant folding), so packed and dense files run at the same speed.
``factor="dense"`` stores the unpacked [P, C, C] factor instead.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ...catalog import ONNX_FACTOR_STORAGE, ONNX_INPUT_DTYPES
from ...errors import InputError
from ...ops.onnx import translation_table
from ...report import atomic_file
from ..stn import STN
from .calibration import decide

OUTPUTS = ("scores", "maps")
DECISION_OUTPUTS = ("normalized_scores", "anomalous", "masks")
OPSET = 20
# A protobuf file holds at most 2 GiB: larger models keep their weights in PATH.data.
_SINGLE_FILE_LIMIT = 2**31 - 2**26


class _PredictGraph(nn.Module):
    """images -> predict_batch's (scores, maps) [+ decisions]: the module torch.onnx traces."""

    def __init__(self, model, threshold: float | None):
        super().__init__()
        self.model, self.threshold = model, threshold
        # Registered so that the exporter sees their parameters as the graph's weights.
        self.embedding, self.stn = model.embedding, model.stn

    def forward(self, images: torch.Tensor):
        scores, maps = self.model.predict_batch(images)  # uint8 too: predict's own conversion
        if self.threshold is None:
            return scores, maps
        decisions = decide(scores, maps, self.threshold)
        return scores, maps, decisions.normalized_scores, decisions.anomalous, decisions.masks


def check_exportable(model) -> None:
    """One InputError line when `model` cannot be exported (unfitted, foreign STN)."""
    if model.gaussian is None:
        raise InputError("the model is not fitted: nothing to export (call fit(images) first)")
    if model.stn is not None and not isinstance(model.stn, STN):
        raise InputError(f"cannot export an STN of type {type(model.stn).__name__}: only "
                         "stnpadim_ext.STN has an ONNX form")


def export_onnx(model, path: str | os.PathLike, batch_size: int | None = None,
                input_dtype: str = "float32", factor: str = "packed") -> Path:
    """Writes `model`'s predict path as an ONNX graph to `path` (atomically).

    Args:
        model: a fitted `PaDiM`.
        path: the .onnx file to write. A graph over 2 GiB (wide_resnet50_2 at 256 px) keeps
            its weights in `path` + ".data" beside it.
        batch_size: fixed batch size; None (default) makes the batch dimension dynamic.
        input_dtype: "float32" (images in [0, 1], as predict takes them) or "uint8"
            (decoded 8-bit pixels; the graph divides by 255).
        factor: "packed" (default, half the size) or "dense" storage of the precision factor.

    Returns:
        path.

    Raises:
        InputError: unfitted model, an STN other than stnpadim_ext.STN, a bad option, a
            path that cannot be written, or onnx / onnxscript not installed.
    """
    check_exportable(model)
    if input_dtype not in ONNX_INPUT_DTYPES:
        raise InputError(f"input_dtype must be one of {', '.join(ONNX_INPUT_DTYPES)}; got {input_dtype!r}")
    if factor not in ONNX_FACTOR_STORAGE:
        raise InputError(f"factor must be one of {', '.join(ONNX_FACTOR_STORAGE)}; got {factor!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise InputError(f"batch_size must be None (dynamic) or an int >= 1; got {batch_size!r}")
    table = translation_table()
    threshold = model.threshold
    path = Path(path)
    # The target is checked (and its folder made) before the tracing minute, not after.
    with atomic_file(path) as tmp:
        onnx_model = _trace(model, batch_size, input_dtype, threshold, table)
        _fold(onnx_model, model.gaussian.factor_packed if factor == "packed" else None)
        _describe(onnx_model, model, input_dtype, threshold)
        _save(onnx_model, path, tmp)
    return path


def _trace(model, batch_size: int | None, input_dtype: str, threshold: float | None, table: dict):
    """The ONNX model (onnx_ir) of `_PredictGraph`, from torch.onnx's dynamo exporter."""
    graph = _PredictGraph(model, threshold).eval()
    example = _example_input(model, batch_size or 2, input_dtype)
    dynamic = None if batch_size else ({0: torch.export.Dim("batch")},)
    outputs = OUTPUTS + (DECISION_OUTPUTS if threshold is not None else ())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False,
                                    opset_version=OPSET, dynamic_shapes=dynamic,
                                    custom_translation_table=table,
                                    input_names=["images"], output_names=list(outputs))
    return program.model


def _example_input(model, batch: int, input_dtype: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 3, *model.image_size)
    if input_dtype == "uint8":
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(model.device)
    return torch.rand(shape, generator=generator).to(model.device)


def _fold(onnx_model, keep_packed: torch.Tensor | None) -> None:
    """Folds every constant subgraph into initializers, except the packed factor's unpacking.

    The exporter folds only small constants, which leaves e.g. the map's upsample+blur
    operators (built in float64, a dtype ONNX Runtime's CPU Conv lacks) as subgraphs to run.
    With `keep_packed` (the model's factor_packed), the nodes reading that initializer stay,
    so the file holds the packed factor and ONNX Runtime unpacks it when the session loads.
    """
    from onnxscript.optimizer import fold_constants

    packed = None
    if keep_packed is not None:
        shape = tuple(keep_packed.shape)
        packed = {v for v in onnx_model.graph.initializers.values() if tuple(v.shape) == shape}

    def should_fold(node):
        return False if packed and any(value in packed for value in node.inputs) else None

    fold_constants(onnx_model, input_size_limit=2**40, output_size_limit=2**40, should_fold=should_fold)


def _describe(onnx_model, model, input_dtype: str, threshold: float | None) -> None:
    """Names us as the producer and records what the graph expects in the metadata."""
    from ... import __version__

    onnx_model.producer_name, onnx_model.producer_version = "stnpadim", __version__
    props = {"backbone": model.backbone_name,
             "image_size": "x".join(map(str, model.image_size)), "input": input_dtype,
             "stn": "none" if model.stn is None else model.stn.config["transform"]}
    if threshold is not None:
        props["threshold"] = repr(float(threshold))
    onnx_model.metadata_props.update(props)


def _save(onnx_model, path: Path, tmp: Path) -> None:
    """Writes the model to `tmp` (atomic_file renames it onto `path`)."""
    import onnx_ir as ir

    weights = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values()
                  if v.const_value is not None)
    if weights < _SINGLE_FILE_LIMIT:
        ir.save(onnx_model, tmp)
        return
    # Weights in PATH.data: both files are written in a private folder beside `path`; the
    # weights move in place first, so a reader never sees a graph with incomplete weights.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        data = f"{path.name}.data"
        ir.save(onnx_model, Path(folder) / path.name, external_data=data)
        os.replace(Path(folder) / data, path.parent / data)
        os.replace(Path(folder) / path.name, tmp)
