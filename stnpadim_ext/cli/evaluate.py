"""`stnpadim eval`: image/pixel AUROC, AUPRO and F1 per category; the Table-1-style table;
decisions at each model's calibrated threshold; optionally the HTML report.

Without --model, each category is fitted from its train/good images with the fit
options; with an STN, the baselines a user would try instead are fitted too (same
backbone, size, channel subset, calibration split: plain PaDiM, PaDiM on pose-augmented
images and, where the data records true poses, the oracle; experiment.run_arms). --seeds N
repeats everything for seeds seed..seed+N-1 and reports each metric's mean with
<name>_sd (and <name>_ci95, a t-interval over the seeds).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..data.mvtec import list_categories, load_category
from ..errors import InputError
from ..models.padim import load
from ..report import DECISION_METRICS, markdown_table, summarize, summarize_runs, write_json, write_text
from ..report_html import HtmlReport
from .experiment import run_arms, run_category
from .model_options import ModelOptions
from .outputs import category_inputs, check_outputs, check_writable_folder
from .parser import MODEL_OPTIONS
from .reporting import add_predictions, false_reject_warning, results_document


def run(args) -> int:
    # Everything is checked before minutes of fitting, not after.
    outputs = {name: kind for name, kind in ((args.json, "results JSON"),
                                             (args.table, "markdown table")) if name is not None}
    if args.report is not None:
        check_writable_folder(args.report)
        outputs[Path(args.report) / "index.html"] = "HTML report"
    inputs = [p for p in (args.model, args.weights) if p]
    # Before reading the data, then with its files; under torchrun on rank 0 alone.
    distributed.on_main(check_outputs, outputs, inputs, args.force)
    given = [f"--{k.replace('_', '-')}" for k in MODEL_OPTIONS if getattr(args, k) is not None]
    if args.model is not None and args.seeds > 1:
        given.append("--seeds")
    if args.model is not None and given:
        raise InputError(f"--model evaluates a fitted model; fit options cannot apply to it: "
                         f"{', '.join(given)}")
    names = list(dict.fromkeys(args.category or list_categories(args.data)))
    if args.model is not None and len(names) != 1:
        raise InputError(f"--model evaluates one category; got {len(names)} ({', '.join(names)}): "
                         "pass --category C")
    categories = [load_category(args.data, name) for name in names]
    for category in categories:
        if not category.test_items:
            raise InputError(f"{category.path / 'test'}: no test images to evaluate on")
    distributed.on_main(check_outputs, outputs, inputs + [f for c in categories for f in category_inputs(c)],
                        args.force)
    report = None if args.report is None or not distributed.is_main() else HtmlReport(args.report, "stnpadim eval")
    if args.model is not None:
        arms = _evaluate_model_file(args, categories, report)
    else:
        arms = _fit_and_evaluate(args, categories, report)
    if not distributed.is_main():
        return 0  # every rank holds the results; rank 0 prints and writes them
    table = markdown_table(arms) + "\nAt the calibrated threshold:\n\n" + markdown_table(arms, DECISION_METRICS)
    print(table, end="")
    warning = false_reject_warning(arms)
    if warning:
        warnings.warn(warning, stacklevel=1)
    results = results_document(arms)
    if args.json:
        write_json(args.json, results)
    if args.table:
        write_text(args.table, table)
    if report is not None:
        print(f"wrote {report.write()}")
    return 0


def _evaluate_model_file(args, categories, report) -> dict:
    options = ModelOptions.from_args(args)
    model = load(args.model, device=options.device, batch_size=options.batch_size,
                 progress=args.progress)
    if model.calibration is None:
        print(f"{args.model}: uncalibrated model (saved without a threshold): no decision metrics")
    metrics, predictions, _ = run_category(categories[0], options, args.progress, model=model)
    label = "PaDiM" if model.stn is None else "STN+PaDiM"
    if report is not None:
        add_predictions(report, categories[0].name, label, model, predictions, metrics)
    return {label: summarize({categories[0].name: metrics})}


def _fit_and_evaluate(args, categories, report) -> dict:
    options = ModelOptions.from_args(args)
    seeds = range(options.seed, options.seed + args.seeds)
    per_arm = {}
    for category in categories:
        runs = []
        for i, seed in enumerate(seeds):
            metrics, predictions, models = run_arms(category, replace(options, seed=seed),
                                                    args.progress, baseline=not args.no_baseline,
                                                    calibration_paths=category.calibration_paths or None)
            runs.append(metrics)
            if report is not None and i == 0:  # the report shows the first seed's models
                for label, values in metrics.items():
                    add_predictions(report, category.name, label, models[label],
                                    predictions[label], values)
        for label in runs[0]:
            per_arm.setdefault(label, {})[category.name] = [run[label] for run in runs]
    if args.seeds == 1:
        return {label: summarize({c: runs[0] for c, runs in per_category.items()})
                for label, per_category in per_arm.items()}
    return {label: summarize_runs(per_category) for label, per_category in per_arm.items()}
