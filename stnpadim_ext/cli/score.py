"""`stnpadim score`: scores images with a saved model; decisions at its calibrated threshold,
heatmap overlays with the defect region outlined, a scores CSV, optional masks and report.

Heatmap colours of a calibrated model are fixed in units of its threshold (report.heat_range),
so the same colour means the same normalized score in every run.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..catalog import HEATMAP_MAX_SIDE
from ..data.images import IMAGE_SUFFIXES, iter_batches, load_image
from ..data.mvtec import OS_CLUTTER
from ..distributed.shards import reassemble, reassemble_tensors, share_indices
from ..errors import InputError
from ..models.padim import load
from ..report import heat_range, heatmap_overlay, staged_folder, write_image, write_scores_csv
from ..report_html import HtmlReport
from .model_options import ModelOptions
from .outputs import check_outputs, check_writable_folder
from .reporting import aligned_views


def run(args) -> int:
    paths = collect_images(args.inputs)
    out = Path(args.out)
    names = heatmap_names(paths)
    # Checked before any work, under torchrun once (rank 0) before any rank works.
    distributed.on_main(_check_outputs, args, out, names, paths)
    options = ModelOptions.from_args(args)
    model = load(args.model, device=options.device, batch_size=options.batch_size,
                 factor_dtype=args.factor_dtype, progress=False)
    threshold = model.threshold
    if args.masks and threshold is None:
        raise InputError(f"{args.model}: --masks needs a calibrated model (refit it with this version)")
    if threshold is None:
        print(f"{args.model}: uncalibrated model (saved without a threshold): scores only; "
              "refit it to get decisions")
    # Under torchrun each rank takes every world-th batch: the same batches as one process.
    mine = share_indices(len(paths), model.batch_size, distributed.shard())
    # All predictions first: a bad image stops the run before anything is written.
    scores, maps = [], []
    with tqdm(total=len(mine), desc="score", unit="img", disable=not args.progress) as bar:
        for batch in iter_batches([paths[i] for i in mine], model.batch_size, size=model.image_size,
                                  allow_empty=True):
            distributed.check_peers()
            batch_scores, batch_maps = model.predict_batch(batch)
            scores.append(batch_scores.cpu())
            maps.append(batch_maps.cpu().half())  # half the memory; plenty for colours
            bar.update(batch.shape[0])
    scores, maps = (torch.cat(parts) if parts else torch.empty(0) for parts in (scores, maps))
    if threshold:
        vmin, vmax = heat_range(threshold)
    else:  # over all ranks' maps
        vmin = distributed.all_reduce_float(float(maps.min()) if maps.numel() else math.inf, "min")
        vmax = distributed.all_reduce_float(float(maps.max()) if maps.numel() else -math.inf, "max")
    vmax = args.vmax or vmax
    rows = []
    # Every rank writes into rank 0's staging folder, moved in once all have written: all
    # outputs or none; scores.csv comes last.
    main = distributed.is_main()
    with staged_folder(out, last=["scores.csv"]) if main else contextlib.nullcontext() as stage:
        stage = _shared_stage(out, stage)
        for i, score, amap in tqdm(list(zip(mine, scores.tolist(), maps, strict=True)),
                                   desc="heatmaps", unit="img", disable=not args.progress):
            distributed.check_peers()
            path, name = paths[i], names[i]
            # Overlays of huge images are written downscaled: memory stays bounded.
            image = load_image(path, max_side=HEATMAP_MAX_SIDE)
            heat, region = heatmap_overlay(image, amap, threshold, vmin, vmax)
            row = {"image": str(path), "score": f"{score:.6g}", "normalized_score": "", "anomalous": ""}
            if threshold:
                row.update(normalized_score=f"{score / threshold:.6g}",
                           anomalous=str(score > threshold).lower())
                if args.masks:
                    write_image(stage / mask_name(name), region.astype("uint8") * 255)
            write_image(stage / name, heat)
            rows.append({**row, "heatmap": name})
        # Every rank's heatmaps are written once rank 0 holds every rank's rows.
        gathered = distributed.gather_objects_to_main((rows, scores, maps if args.report else None))
        if not main:
            return 0
        rows = reassemble([part[0] for part in gathered], model.batch_size)
        scores = reassemble_tensors([part[1] for part in gathered], model.batch_size)
        if args.report is not None:
            maps = reassemble_tensors([part[2] for part in gathered], model.batch_size)
        write_scores_csv(stage / "scores.csv", rows)
    line = f"scored {len(paths)} images: scores {min(scores.tolist()):.4g} .. {max(scores.tolist()):.4g}"
    if threshold:
        line += f"; {int((scores > threshold).sum())} anomalous at threshold {threshold:.4g}"
    print(f"{line}; wrote {out / 'scores.csv'} and {len(paths)} heatmaps"
          + (f" and {len(paths)} masks" if args.masks else ""))
    if args.report is not None:
        report = HtmlReport(args.report, "stnpadim score")
        # The model file does not know its category: the section is named by the inputs.
        label = f"{'PaDiM' if model.stn is None else 'STN+PaDiM'} ({Path(args.model).name})"
        report.add(image_set_name(args.inputs), label, paths, scores, maps, threshold,
                   aligned=aligned_views(model, paths),
                   calibration=None if model.calibration is None else model.calibration.to_config())
        print(f"wrote {report.write()}")
    return 0


def image_set_name(inputs: list[str], shown: int = 3) -> str:
    """The report's name for what was scored: the inputs' names, the first few."""
    names = [Path(name).name or str(name) for name in inputs]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _check_outputs(args, out: Path, names: list[str], paths: list[Path]) -> None:
    """Never over an input image or the model, nor a foreign file (outputs.check_outputs)."""
    check_writable_folder(out)
    outputs = {out / "scores.csv": "scores CSV", **{out / n: "heatmap PNG" for n in names}}
    if args.masks:
        outputs.update({out / mask_name(n): "heatmap PNG" for n in names})
    if args.report is not None:
        check_writable_folder(args.report)
        outputs[Path(args.report) / "index.html"] = "HTML report"
    check_outputs(outputs, [*paths, args.model], args.force)


def _shared_stage(out: Path, stage: Path | None) -> Path:
    """Rank 0's staging folder on every rank; it must be visible to all of them."""
    stage = distributed.broadcast_from_main(stage)
    if not stage.is_dir():
        raise InputError(f"{out}: rank 0's staging folder {stage.name} is not visible here: under torchrun "
                         "on several hosts, --out must be on a file system that every host shares")
    return stage


def mask_name(heatmap: str) -> str:
    """The mask PNG beside a heatmap PNG: <stem>_mask.png."""
    return heatmap.removesuffix("_heatmap.png") + "_mask.png"


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named on the command line, and those anywhere below named folders (sorted
    folder by folder, so MVTec's test/<defect>/ works as one input).

    In folders, hidden files and folders and OS clutter are skipped, and so are files
    without an image suffix (one note on stderr counts them); a named file without one, an
    input that does not exist, or a folder tree without images is an InputError. A file
    with an image suffix that does not decode stays an error when it is read.
    """
    paths: list[Path] = []
    skipped: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = []
            for child in _walk(path):
                (found if child.suffix.lower() in IMAGE_SUFFIXES else skipped).append(child)
            if not found:
                raise InputError(f"{path}: no images in this folder or below it (looked for "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.exists():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if skipped and distributed.is_main():  # once, under torchrun too
        print(f"stnpadim: note: skipped {len(skipped)} file(s) that are not images "
              f"(e.g. {skipped[0]})", file=sys.stderr)
    return list(dict.fromkeys(paths))


def _walk(folder: Path) -> list[Path]:
    """Files below `folder`, each folder's files sorted before its sorted sub-folders; no
    hidden entries, no OS clutter, no symlinked folders (no loops)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names)
                  if not n.startswith(".") and n not in OS_CLUTTER and (Path(root) / n).is_file()]
    return files


def heatmap_names(paths: list[Path]) -> list[str]:
    """Distinct PNG names: the path below the inputs' common folder, '/' -> '_'."""
    parents = [str(p.resolve().parent) for p in paths]
    common = Path(os.path.commonpath(parents))
    names, seen = [], set()
    for path in paths:
        stem = "_".join(path.resolve().relative_to(common).with_suffix("").parts)
        name, n = f"{stem}_heatmap.png", 1
        while name in seen:  # a.png and a.jpg in one folder
            n += 1
            name = f"{stem}-{n}_heatmap.png"
        seen.add(name)
        names.append(name)
    return names
