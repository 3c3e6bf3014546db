"""The STN against what a user would do instead, on `stnpadim synth` data, over seeds.

For every synthetic category (but grain and mesh) and every (data seed, model seed) pair it
fits the arms of cli/experiment.run_arms with the same backbone, channel subset,
calibration split and seeds: plain PaDiM, PaDiM on pose-augmented images, STN+PaDiM and
the oracle (aligned by the true poses synth records). Decisions are measured twice: at the
threshold calibrated on held-out training images (posed within the STN's range for the pose
arms) and at one calibrated on 24 good line images posed like the test images
(CATEGORY/calibration/good). Every run also checks the STN against the true poses of the
good test images (an independent check of train_stn's own collapse check).

    python python/stn_ablation.py --json results/stn_ablation.json --readme README.md

writes the data (data seeds 1-5; seed 0 is the tuning seed and is never reported), runs
model seeds 0 and 1 on one CPU thread, writes every run to --json after every run (a
stopped run keeps what it finished) and, with --readme, replaces README's results section
(between its `<!-- stn-ablation -->` markers) with tables rendered from the JSON.
Intervals are clustered: runs on one data seed share their test images, so each interval
is the t-interval over the data-seed means (metrics.clustered_interval).

    python python/stn_ablation.py --stn-only --seeds 0 1 2 3 4 5 --json results/stn_collapse.json

trains and checks only the STNs (more runs per category for the collapse count);
--categories, --data-seeds and --seeds split the work over processes, and --from-json
renders earlier files (several, merged; with --json, written as one) without running.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stnpadim_ext.cli.experiment import run_arms
from stnpadim_ext.cli.model_options import AUGMENTED, ORACLE, PADIM, STN_PADIM, ModelOptions
from stnpadim_ext.data.images import load_image
from stnpadim_ext.data.mvtec import load_category
from stnpadim_ext.data.synth import CATEGORIES as SYNTH
from stnpadim_ext.data.synth import make_dataset
from stnpadim_ext.metrics import clustered_interval, threshold_metrics
from stnpadim_ext.models.padim.calibration import split_holdout
from stnpadim_ext.models.stn import STN, compose, invert_theta, theta_pose, train_stn
from stnpadim_ext.report import write_json, write_text

REPO = Path(__file__).resolve().parents[1]
# Random-pose parts have no pose to go back to: their STN is trained for invariance.
CATEGORIES = {name: "canonical" if spec["pose"] == "random" else "reconstruct"
              for name, spec in SYNTH.items() if name not in ("grain", "mesh")}
SYMMETRY = {name: 2 if spec.get("shape") == "link" else 1 for name, spec in SYNTH.items()}
# STN budgets looked at on the tuning data seed 0 only: reconstruct aligned part_drift's
# held-out views to 0.9-1.2 deg in 12 epochs of 256 views (3-7 deg in 6); canonical aligned
# part_random to 4.4-5.0 deg in 20 of 512 (5.1 in train_stn's default 40).
BUDGET = {"reconstruct": {"stn_epochs": 12, "stn_train": {"samples_per_epoch": 256}},
          "canonical": {"stn_epochs": 20, "stn_train": {"samples_per_epoch": 512}}}
# Posed views each pose arm fits on (tuning seed, part_drift: image AUROC of PaDiM+aug
# 0.984 with 1024, 0.988 with 3072; STN+PaDiM and oracle 1.000 with both).
VIEWS = 1024
DATA = {"image_size": 128, "n_train": 48, "n_test_good": 24, "n_test_defect": 6, "n_calibration": 24}
ARMS = {PADIM: "padim", AUGMENTED: "padim_augmented", STN_PADIM: "stn_padim", ORACLE: "oracle"}
# A run counts as collapsed when the STN's error against the true test poses is over this
# share of not warping's (the same bar train_stn's own check sets on held-out views), where
# the test poses vary enough for that to mean something (aligned categories jitter by 1 deg).
COLLAPSE_RATIO = 0.5
MIN_SPREAD_DEG = 5.0
MARKERS = ("<!-- stn-ablation:begin -->", "<!-- stn-ablation:end -->")


def options_for(name: str, seed: int) -> ModelOptions:
    objective = CATEGORIES[name]
    # 12 held-out calibration images support a false-reject rate of 1/13 at best. An STN
    # that fails train_stn's check after its retries is kept and counted, not fatal here.
    return ModelOptions(backbone="efficientnet_lite0", image_size=DATA["image_size"],
                        false_reject_rate=0.1, stn=objective, stn_symmetry=SYMMETRY[name],
                        accept_weak_stn=True, pose_views=VIEWS, seed=seed, **BUDGET[objective])


def category_for(root: Path, name: str, data_seed: int):
    folder = root / f"seed{data_seed}"
    if not (folder / name).is_dir():
        make_dataset(folder, categories=[name], seed=data_seed, progress=False, **DATA)
    return load_category(folder, name)


def run(args) -> dict:
    """Runs every category; returns the results document, which is also written to --json
    after every run, so a stopped run keeps what it finished."""
    start = time.perf_counter()
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": _commit(), "cpu": _cpu(), "threads": torch.get_num_threads(),
           "stn_only": args.stn_only, "data_seeds": args.data_seeds, "seeds": args.seeds,
           "data": DATA, "budget": BUDGET, "views": VIEWS, "backbone": "efficientnet_lite0",
           "runs": []}
    for name in args.categories:
        for data_seed in args.data_seeds:
            category = category_for(Path(args.data), name, data_seed)
            for seed in args.seeds:
                options = options_for(name, seed)
                record = {"category": name, "objective": options.stn, "data_seed": data_seed,
                          "seed": seed}
                record.update(_stn_only(category, options) if args.stn_only else
                              _all_arms(category, options))
                doc["runs"].append(record)
                doc["wall_seconds"] = time.perf_counter() - start
                if args.json:
                    write_json(args.json, doc)
                print(_progress_line(record, doc["wall_seconds"]), flush=True)
    return doc


def _all_arms(category, options: ModelOptions) -> dict:
    metrics, predictions, models = run_arms(category, options, progress=False)
    arms = {}
    for label, key in ARMS.items():
        model, found = models[label], predictions[label]
        # The same model at a threshold from the line images (as they are, not posed).
        model.calibrate(category.calibration_paths, options.false_reject_rate,
                        poses=category.poses if label == ORACLE else None)
        line = threshold_metrics(found.labels, found.scores, model.threshold)
        arms[key] = {**metrics[label], "line": {**line, "false_reject_bound":
                                                model.calibration.guaranteed_rate}}
    return {"arms": arms, "stn": _true_pose_check(models[STN_PADIM].stn, category,
                                                  SYMMETRY[category.name])}


def _stn_only(category, options: ModelOptions) -> dict:
    train, _ = split_holdout(category.train_paths, seed=options.seed)
    stn = STN(padding_mode="border", seed=options.seed)
    history = train_stn(stn, train, objective=options.stn, seed=options.seed,
                        epochs=options.stn_epochs, symmetry=options.stn_symmetry,
                        accept_weak=True, progress=False, **options.stn_train)
    check = _true_pose_check(stn, category, options.stn_symmetry)
    check["attempts"] = history["attempts"]
    return {"stn": check}


@torch.no_grad()
def _true_pose_check(stn: STN, category, symmetry: int) -> dict:
    """The STN against the true poses of the good test images: the spread of its residual
    rotations (modulo 360/symmetry; 0 for a perfect STN, whatever constant canonical frame
    it chose) beside the spread of the true rotations themselves (not warping), plus what
    train_stn recorded."""
    paths = [item.path for item in category.test_items if item.label == 0]
    images = torch.stack([load_image(p, (DATA["image_size"],) * 2) for p in paths])
    truth = torch.tensor([category.poses[p] for p in paths], dtype=torch.float32)
    residual = compose(invert_theta(truth), stn.predict_theta(images))
    spread = {name: _circular_spread(theta_pose(t)["rotation_deg"], symmetry)
              for name, t in (("stn", residual), ("identity", invert_theta(truth)))}
    record = stn.record
    return {"alignment": record["alignment"], "retries": record["retries"],
            "accepted_weak": record["accepted_weak"],
            "test_rotation_spread_deg": spread["stn"],
            "identity_test_rotation_spread_deg": spread["identity"]}


def collapsed(check: dict) -> bool | None:
    """Whether the STN failed to undo the true test poses; None where they hardly vary."""
    if check["identity_test_rotation_spread_deg"] < MIN_SPREAD_DEG:
        return None
    return check["test_rotation_spread_deg"] > COLLAPSE_RATIO * check["identity_test_rotation_spread_deg"]


def _circular_spread(degrees: torch.Tensor, symmetry: int) -> float:
    """Mean absolute deviation of angles from their circular mean, modulo 360/symmetry deg."""
    angle = torch.deg2rad(degrees.double()) * symmetry
    mean = torch.atan2(angle.sin().mean(), angle.cos().mean())
    deviation = torch.atan2((angle - mean).sin(), (angle - mean).cos()).abs() / symmetry
    return float(torch.rad2deg(deviation).mean())


def _progress_line(record: dict, wall: float) -> str:
    head = f"{record['category']} data seed {record['data_seed']} seed {record['seed']}"
    stn = record["stn"]
    tail = (f"STN held-out {stn['alignment']['rotation_deg']:.1f} deg (ratio "
            f"{stn['alignment']['error_ratio']:.2f}, {stn['retries']} retries), test spread "
            f"{stn['test_rotation_spread_deg']:.1f} of {stn['identity_test_rotation_spread_deg']:.1f} deg"
            f"{' COLLAPSED' if collapsed(stn) else ''} ({wall:.0f} s)")
    if "arms" not in record:
        return f"{head}: {tail}"
    aurocs = ", ".join(f"{key} {arm['image_auroc']:.3f}" for key, arm in record["arms"].items())
    return f"{head}: image AUROC {aurocs}; {tail}"


# ---------------------------------------------------------------------------------- tables


def merge(documents: list[dict]) -> dict:
    """One document from several runs of this script (split by category or seed)."""
    runs = [run for doc in documents for run in doc["runs"]]
    return {**documents[0], "runs": runs,
            "commit": ", ".join(dict.fromkeys(doc["commit"] for doc in documents)),
            "date": ", ".join(dict.fromkeys(doc["date"] for doc in documents)),
            "cpu": ", ".join(dict.fromkeys(doc["cpu"] for doc in documents)),
            "data_seeds": sorted({s for doc in documents for s in doc["data_seeds"]}),
            "seeds": sorted({s for doc in documents for s in doc["seeds"]}),
            "wall_seconds": [wall for doc in documents for wall in np.atleast_1d(doc.get("wall_seconds", 0.0))]}


def cell(runs: list[dict], value, signed: bool = False) -> str:
    """mean ± sd [clustered 95% interval] of value(run) over runs (clusters: data seeds)."""
    pairs = [(run["data_seed"], value(run)) for run in runs]
    pairs = [(d, v) for d, v in pairs if v is not None and math.isfinite(v)]
    if not pairs:
        return "n/a"
    values = np.array([v for _, v in pairs])
    groups = [[v for d, v in pairs if d == seed] for seed in sorted({d for d, _ in pairs})]
    interval = clustered_interval(groups)
    fmt = "+.3f" if signed else ".3f"
    text = f"{values.mean():{fmt}} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"
    return text if interval is None else text + f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def render(documents: list[dict], collapse_documents: list[dict] = ()) -> str:
    """Markdown: how the numbers were made, then the tables."""
    doc = merge(documents)
    names = list(dict.fromkeys(run["category"] for run in doc["runs"]))
    by_name = {name: [run for run in doc["runs"] if run["category"] == name] for name in names}
    n_runs = sorted({len(runs) for runs in by_name.values()})
    walls = " + ".join(f"{float(wall) / 60:.0f}" for wall in doc["wall_seconds"])
    lines = [
        f"Runs of `python python/stn_ablation.py` started {doc['date']} at commit {doc['commit']} "
        f"({len(doc['wall_seconds'])} process(es), {doc['threads']} thread each, wall {walls} min, on "
        f"{doc['cpu']}); every run is in `results/stn_ablation.json`. {doc['backbone']}, "
        f"{doc['data']['image_size']} px; per category {doc['data']['n_train']} training images "
        f"(12 held out for calibration), {doc['data']['n_test_good']} good + 4 x "
        f"{doc['data']['n_test_defect']} defective test images and {doc['data']['n_calibration']} "
        f"good line images. Data seeds {_list(doc['data_seeds'])} (tuning used data seed 0 "
        f"only) x model seeds {_list(doc['seeds'])}: {'/'.join(map(str, n_runs))} runs per "
        "cell, shown as mean ± sd [95% interval of the mean: t-interval over the data-seed "
        "means, since runs on one data seed share their test images]. STN budget: reconstruct "
        f"{_budget(doc['budget']['reconstruct'])}, canonical {_budget(doc['budget']['canonical'])}; "
        f"the three pose arms each fit on the same {doc['views']} posed views. Gain = STN+PaDiM "
        "minus the better of PaDiM and PaDiM+aug, per run.", ""]
    arms = list(ARMS.values())
    header = "| category | STN | " + " | ".join(ARMS) + " | STN gain |"
    for metric, title in (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC")):
        lines += [f"{title}:", "", header, "|---|---" + "|---" * (len(arms) + 1) + "|"]
        for name, runs in by_name.items():
            cells = [cell(runs, _getter(a, metric)) for a in arms]
            gain = cell(runs, _getter("stn_padim", f"{metric}_gain"), signed=True)
            lines.append(f"| {name} | {runs[0]['objective']} | " + " | ".join(cells) + f" | {gain} |")
        lines.append("")
    for where, title in ((None, "held-out training images, posed within the STN's range for the "
                                "three pose arms"), ("line", "24 good line images")):
        lines += [f"False-reject rate / miss rate at the threshold calibrated on {title} "
                  "(target 0.1):", "", "| category | " + " | ".join(ARMS) + " |",
                  "|---" + "|---" * len(arms) + "|"]
        for name, runs in by_name.items():
            cells = [f"{_mean(runs, _getter(a, 'false_reject_rate', where)):.2f} / "
                     f"{_mean(runs, _getter(a, 'miss_rate', where)):.2f}" for a in arms]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["STN alignment, out of view and retries (STN+PaDiM runs):", "",
              "| category | held-out error (deg / px) | ratio to not warping | test rotation spread "
              "vs true poses (deg) | retries | collapsed | out-of-view share of pixels / of defect pixels |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in by_name.items():
        stn = [r["stn"] for r in runs]
        lines.append(
            f"| {name} | {np.mean([s['alignment']['rotation_deg'] for s in stn]):.2f} / "
            f"{np.mean([s['alignment']['translation_px'] for s in stn]):.2f} | "
            f"{np.mean([s['alignment']['error_ratio'] for s in stn]):.2f} | "
            f"{np.mean([s['test_rotation_spread_deg'] for s in stn]):.1f} (not warping "
            f"{np.mean([s['identity_test_rotation_spread_deg'] for s in stn]):.1f}) | "
            f"{sum(s['retries'] for s in stn)} | {_collapses(stn)} | "
            f"{_mean(runs, _getter('stn_padim', 'out_of_view_fraction')):.3f} / "
            f"{_fmt(_mean(runs, _getter('stn_padim', 'defect_out_of_view_fraction')))} |")
    lines.append("")
    if collapse_documents:  # with the runs above: every STN trained for these categories
        lines += _collapse_table(merge(list(documents) + list(collapse_documents)))
    return "\n".join(lines) + "\n"


def _collapse_table(doc: dict) -> list[str]:
    names = list(dict.fromkeys(run["category"] for run in doc["runs"]))
    lines = [f"Collapse check over more seeds (the runs above and `--stn-only` runs, data seeds "
             f"{_list(doc['data_seeds'])} x model seeds {_list(doc['seeds'])}, "
             "`results/stn_collapse.json`): how often train_stn's held-out check retried or "
             "failed after its retries, and how often an STN that passed it collapsed on the "
             f"true test poses anyway (a silent collapse: test rotation spread over "
             f"{COLLAPSE_RATIO:g} of not warping's; not judged where the test poses vary by "
             f"less than {MIN_SPREAD_DEG:g} deg):", "",
             "| category | runs | retried | failed the check after its retries | silent collapses "
             "(passed, yet collapsed on the test poses) |", "|---|---|---|---|---|"]
    for name in names:
        runs = [r["stn"] for r in doc["runs"] if r["category"] == name]
        failed = [r for r in runs if r["accepted_weak"]]
        silent = ("n/a (no drift)" if all(collapsed(r) is None for r in runs)
                  else str(sum(bool(collapsed(r)) and not r["accepted_weak"] for r in runs)))
        lines.append(f"| {name} | {len(runs)} | {sum(r['retries'] > 0 for r in runs)} | "
                     f"{len(failed)} | {silent} |")
    return lines + [""]


def _collapses(checks: list[dict]) -> str:
    flags = [collapsed(c) for c in checks]
    if all(f is None for f in flags):
        return "n/a (no drift)"
    return f"{sum(bool(f) for f in flags)} of {len(flags)}"


def _getter(arm: str, key: str, where: str | None = None):
    """run -> run's value of `key` for `arm` (in its `where` sub-dict, e.g. "line")."""
    def value(run):
        metrics = run["arms"][arm]
        return (metrics if where is None else metrics[where]).get(key)
    return value


def _mean(runs, value) -> float:
    values = [value(r) for r in runs]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def _list(values) -> str:
    values = list(values)
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def _budget(budget: dict) -> str:
    return f"{budget['stn_epochs']} epochs x {budget['stn_train']['samples_per_epoch']} views"


def _commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def update_readme(path: Path, section: str) -> None:
    """Replaces the text between README's two MARKERS with `section`."""
    text = path.read_text()
    pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.S)
    if not pattern.search(text):
        sys.exit(f"stn_ablation: error: {path} has no {MARKERS[0]} ... {MARKERS[1]} section")
    write_text(path, pattern.sub(lambda _: f"{MARKERS[0]}\n{section}{MARKERS[1]}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/stn_ablation",
                        help="synth root (categories are generated there per data seed)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))
    parser.add_argument("--data-seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                        help="model seeds (channel subset, STN weights and training, views)")
    parser.add_argument("--stn-only", action="store_true",
                        help="train and check the STNs only (the collapse count)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the bits "
                        "of STN training depend on it)")
    parser.add_argument("--json", help="write the results here (with --from-json: the files merged)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="render these earlier --json files instead of running")
    parser.add_argument("--collapse-json", nargs="+", metavar="FILE", default=[],
                        help="--stn-only results to render as the collapse table")
    parser.add_argument("--readme", help="replace this README's results section")
    args = parser.parse_args()
    if args.from_json:
        documents = [json.loads(Path(f).read_text()) for f in args.from_json]
        if args.json:  # one file from the per-process ones
            write_json(args.json, merge(documents))
    else:
        torch.set_num_threads(args.threads)
        documents = [run(args)]
    if all(doc["stn_only"] for doc in documents):
        print("\n".join(_collapse_table(merge(documents))))
        return
    section = render(documents, [json.loads(Path(f).read_text()) for f in args.collapse_json])
    print(section)
    if args.readme:
        update_readme(Path(args.readme), section)


if __name__ == "__main__":
    main()
