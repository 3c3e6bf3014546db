"""`stnpadim score`: scores images with a saved model; heatmap overlays and a scores CSV."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.images import IMAGE_SUFFIXES, iter_batches, load_image
from ..data.mvtec import OS_CLUTTER
from ..errors import InputError
from ..models.padim import load
from ..report import staged_folder, write_heatmap, write_scores_csv
from .experiment import ModelOptions
from .outputs import check_outputs, check_writable_folder
from .parser import add_force_option, add_run_options, positive_float

# Longest side of a heatmap overlay: images beyond it get a downscaled overlay (a 10000 px
# overlay at full size would need gigabytes for no visible gain).
HEATMAP_MAX_SIDE = 2048


def register(commands, common) -> None:
    parser = commands.add_parser(
        "score", parents=[common], help="score images with a saved model",
        description="Scores images (files, or every image in the given folders) and writes "
                    "one heatmap overlay PNG per image (longest side at most "
                    f"{HEATMAP_MAX_SIDE} px) and scores.csv to --out.")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file from `fit`")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    parser.add_argument("--out", default="stnpadim_scores", metavar="DIR",
                        help="output folder (default: ./stnpadim_scores)")
    parser.add_argument("--vmax", type=positive_float, default=None,
                        help="anomaly value shown in the hottest colour (default: the highest "
                             "value over all scored images, so overlays are comparable)")
    add_run_options(parser)
    add_force_option(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    paths = collect_images(args.inputs)
    out = Path(args.out)
    names = heatmap_names(paths)
    check_writable_folder(out)
    # Checked before any work: never over an input image or the model, nor a foreign file.
    outputs = {out / "scores.csv": "scores CSV", **{out / n: "heatmap PNG" for n in names}}
    check_outputs(outputs, [*paths, args.model], args.force)
    options = ModelOptions.from_args(args)
    model = load(args.model, device=options.device, batch_size=options.batch_size, progress=False)
    # All predictions first: a bad image stops the run before anything is written.
    scores, maps = [], []
    with tqdm(total=len(paths), desc="score", unit="img", disable=not args.progress) as bar:
        for batch in iter_batches(paths, model.batch_size, size=model.image_size):
            batch_scores, batch_maps = model.predict_batch(batch)
            scores.append(batch_scores.cpu())
            maps.append(batch_maps.cpu().half())  # half the memory; plenty for colours
            bar.update(batch.shape[0])
    scores, maps = torch.cat(scores), torch.cat(maps)
    vmin, vmax = float(maps.min()), args.vmax or float(maps.max())
    rows = []
    # Written to a staging folder and moved in at the end: all outputs or none.
    with staged_folder(out, last=["scores.csv"]) as stage:
        for path, name, score, amap in tqdm(list(zip(paths, names, scores.tolist(), maps, strict=True)),
                                            desc="heatmaps", unit="img", disable=not args.progress):
            # Overlays of huge images are written downscaled: memory stays bounded.
            write_heatmap(stage / name, load_image(path, max_side=HEATMAP_MAX_SIDE), amap, vmin, vmax)
            rows.append({"image": str(path), "score": f"{score:.6g}", "heatmap": name})
        write_scores_csv(stage / "scores.csv", rows)
    print(f"scored {len(paths)} images: scores {min(scores.tolist()):.4g} .. "
          f"{max(scores.tolist()):.4g}; wrote {out / 'scores.csv'} and {len(paths)} heatmaps")
    return 0


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named on the command line, and those directly inside named folders.

    Hidden files and OS clutter are skipped, sub-folders too; any other non-image file is
    an InputError naming it, as is an input that does not exist or a folder without images.
    """
    paths: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = []
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or child.name in OS_CLUTTER or child.is_dir():
                    continue
                found.append(_check_suffix(child))
            if not found:
                raise InputError(f"{path}: no images in this folder")
            paths += found
        elif path.exists():
            paths.append(_check_suffix(path))
        else:
            raise InputError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))


def _check_suffix(path: Path) -> Path:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
    return path


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
