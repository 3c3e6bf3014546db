"""STN acceptance numbers of issue 6 on `stnpadim synth` data: PaDiM vs STN+PaDiM.

For each pose category (part_aligned, part_drift: reconstruct STN; part_random: canonical
STN) it fits both arms with the same backbone and pre-processing and reports image /
pixel AUROC, the STN's training time (wall; CPU for STN training + PaDiM fit), its
alignment error against the true poses the generator wrote to meta.json, and the
inference time STN alignment adds.

    python python/stn_ablation.py --data /tmp/synth --threads 1 --json stn_ablation.json

Alignment error on test images (defective ones included) is read against meta.json:
reconstruct: theta should equal the image's true pose T (canonical frame -> image), so the
residual T^-1 theta is the identity; canonical: the STN's frame may differ from the
generator's by one fixed transform G, so the residuals T_i^-1 theta_i are compared pairwise
(mean over all pairs of |angle| and centre displacement of R_i^-1 R_j).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from stnpadim_ext.cli.experiment import ModelOptions, fit_model, run_category
from stnpadim_ext.data.images import as_float, iter_batches
from stnpadim_ext.data.mvtec import load_category
from stnpadim_ext.data.synth import make_dataset
from stnpadim_ext.models.stn import compose, invert_theta, theta_pose

CATEGORIES = {"part_aligned": "reconstruct", "part_drift": "reconstruct",
              "part_random": "canonical"}
METRICS = ("image_auroc", "pixel_auroc", "images_per_second")


def pose_errors(stn, root: Path, name: str, size: int) -> dict:
    """Rotation (deg) and translation (px at `size`) error of stn on the test images."""
    meta = json.loads((root / name / "meta.json").read_text())
    items = [(p, r) for p, r in sorted(meta["images"].items()) if p.startswith("test/")]
    images = torch.cat([as_float(b) for b in iter_batches([root / name / p for p, _ in items], 64, size=size)])
    truth = torch.tensor([r["theta"] for _, r in items], dtype=torch.float32)
    with torch.no_grad():
        residual = compose(invert_theta(truth), stn.predict_theta(images))
    if CATEGORIES[name] == "canonical":
        i, j = torch.triu_indices(len(items), len(items), 1)
        residual = compose(invert_theta(residual[i]), residual[j])
    rotation = theta_pose(residual)["rotation_deg"].abs()
    shift = (residual[:, :, 2] * size / 2).norm(dim=-1)
    return {"rotation_deg": rotation.mean().item(), "rotation_deg_max": rotation.max().item(),
            "translation_px": shift.mean().item(), "n_images": len(items)}


def inference_overhead(model, root: Path, name: str, repeats: int = 3) -> dict:
    """CPU seconds per image of STN alignment vs the whole predict (best of `repeats`)."""
    paths = [p for p in sorted((root / name / "test" / "good").iterdir())]
    batch = as_float(next(iter_batches(paths, 32, size=model.image_size)))

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return min(times) / batch.shape[0]

    with torch.no_grad():
        stn_s = best(lambda: model.stn(batch))
        predict_s = best(lambda: model.predict_batch(batch))
    return {"stn_ms_per_image": 1e3 * stn_s, "predict_ms_per_image": 1e3 * predict_s,
            "stn_share_of_predict": stn_s / predict_s,
            "added_vs_padim": stn_s / max(predict_s - stn_s, 1e-12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True,
                        help="synth root (missing categories are generated there)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES),
                        choices=list(CATEGORIES))
    parser.add_argument("--image-size", type=int, default=128, help="PaDiM image size")
    parser.add_argument("--n-train", type=int, default=48,
                        help="training images per generated category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 makes CPU times "
                        "comparable on a shared machine)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(args.data)
    missing = [c for c in args.categories if not (root / c).is_dir()]
    if missing:
        make_dataset(root, categories=missing, seed=args.seed, n_train=args.n_train)
    base = ModelOptions(backbone="efficientnet_lite0", image_size=args.image_size, seed=args.seed)
    results = {}
    for name in args.categories:
        category = load_category(root, name)
        row = {}
        metrics, _, _ = run_category(category, replace(base, stn="none"))
        row["padim"] = {k: metrics[k] for k in METRICS}
        options = replace(base, stn=CATEGORIES[name])
        cpu = time.process_time()
        model, info = fit_model(category.train_paths, options)
        row["fit_cpu_seconds_with_stn"] = time.process_time() - cpu
        history = info["stn_history"]
        row["stn_training"] = {"wall_seconds": history["seconds"], "epochs": history["epochs_run"],
                               "val_alignment": history["val_alignment"]}
        metrics, _, _ = run_category(category, options, model=model)
        row["stn_padim"] = {k: metrics[k] for k in METRICS}
        row["objective"] = CATEGORIES[name]
        row["pose_error"] = pose_errors(model.stn, root, name, args.image_size)
        row["inference"] = inference_overhead(model, root, name)
        results[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)

    print("\n| category | STN | image AUROC PaDiM | STN+PaDiM | pixel AUROC PaDiM | STN+PaDiM "
          "| rot err (deg) | shift err (px) | STN adds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        p, s, e = row["padim"], row["stn_padim"], row["pose_error"]
        print(f"| {name} | {row['objective']} | {p['image_auroc']:.3f} | {s['image_auroc']:.3f} | "
              f"{p['pixel_auroc']:.3f} | {s['pixel_auroc']:.3f} | {e['rotation_deg']:.2f} | "
              f"{e['translation_px']:.2f} | {100 * row['inference']['added_vs_padim']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
