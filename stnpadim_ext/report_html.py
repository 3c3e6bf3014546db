"""The visual report: DIR/index.html with its images beside it in DIR/assets/.

Opens from disk (relative links only, no script, no network): a summary table per category
and model; per category the ROC and PRO curves and the histograms of normalized scores with
the threshold line (matplotlib, Agg); per category and model a gallery sorted by normalized
score, misclassified images first, each row with the input, the STN's aligned view (when
there is one), the heatmap with the defect region (map > threshold) outlined, the ground
truth (when known), the score and the decision. Gallery panels are small JPEG thumbnails,
lazily loaded, so a thousand images stay light.

    report = HtmlReport("report", title="stnpadim eval")
    report.add("bottle", "PaDiM", paths, scores, maps, threshold, labels=..., masks=...)
    report.write()                                   # -> report/index.html
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.images import load_image, resize
from .metrics import pro_curve, roc_curve
from .report import (
    COLORMAP,
    DECISION_METRICS,
    NORMALIZED_RANGE,
    TABLE_METRICS,
    atomic_file,
    heat_range,
    mask_overlay,
    outline,
    overlay,
    to_rgb8,
    write_text,
)

matplotlib.use("Agg")  # files only, no display (must precede pyplot's import)
import matplotlib.pyplot as plt  # noqa: E402

THUMB = 112          # gallery thumbnail height, px
CURVE_POINTS = 400   # points kept per plotted curve
PRO_FPR_LIMIT = 0.3  # the AUPRO integration limit, shaded on the PRO plot
# ROC / PRO curve style per model, in order: colour, dash and width all differ.
CURVE_STYLES = [{"color": "tab:blue", "linestyle": "-", "linewidth": 3.0, "alpha": 0.6},
                {"color": "tab:orange", "linestyle": "--", "linewidth": 2.0},
                {"color": "tab:green", "linestyle": "-.", "linewidth": 1.5},
                {"color": "tab:red", "linestyle": ":", "linewidth": 1.5}]
OUTLINE = (255, 255, 255)
SHARED_PANELS = ("input", "ground truth")
# Marks our index.html, so that a later run may replace it (cli/outputs.py).
HTML_GENERATOR = '<meta name="generator" content="stnpadim">'


@dataclass
class _Section:
    """One model on one category: summary values, plot data and gallery rows."""

    category: str
    label: str
    summary: dict
    threshold: float | None
    normalized: np.ndarray            # scores / threshold (raw scores when uncalibrated)
    labels: np.ndarray | None
    roc: tuple | None = None
    pro: tuple | None = None
    rows: list = field(default_factory=list)


class HtmlReport:
    """Collects sections (a model's results on one category) and writes index.html.

    Args:
        folder: output folder; index.html and assets/ are written into it.
        title: page title.
    """

    def __init__(self, folder: str | os.PathLike, title: str):
        self.folder, self.title = Path(folder), title
        self.sections: list[_Section] = []
        self.shared: dict[tuple, str] = {}  # (category, image, panel) -> thumbnail written

    def add(self, category: str, label: str, paths: list, scores, maps, threshold: float | None, *,
            labels=None, defects: list[str] | None = None, masks=None, aligned=None,
            metrics: dict | None = None, calibration: dict | None = None) -> None:
        """Adds one model's results on one set of images; writes its thumbnails now.

        Args:
            category: category (or image set) name; sections of one category share plots.
            label: model label, e.g. "PaDiM" or "STN+PaDiM".
            paths: [N] image files.
            scores: [N] image scores; maps: [N, H, W] anomaly maps in the image frame (the
                images are read at H x W).
            threshold: the model's calibrated threshold, or None (uncalibrated).
            labels: [N] 0 good / 1 defective, when known; defects: [N] defect type names.
            masks: [N, H, W] bool ground truth, when known.
            aligned: [N, 3, h, w] float in [0, 1], the STN's aligned views (any h, w).
            metrics: summary values (eval's metrics dict).
            calibration: the model's calibration entry (alpha, n, guaranteed_rate).
        """
        scores = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
        labels = None if labels is None else np.asarray(torch.as_tensor(labels)).astype(bool)
        index = len(self.sections)
        summary = {"images": len(paths), **(metrics or {})}
        if labels is not None:
            summary["images"] = f"{int((~labels).sum())} good, {int(labels.sum())} defective"
        if threshold is not None:
            summary["anomalous"] = int((scores > threshold).sum())
        if calibration is not None:
            summary.update(target=calibration["alpha"], calibration_images=calibration["n"],
                           guaranteed=calibration["guaranteed_rate"])
        section = _Section(category, label, summary, threshold,
                           scores / threshold if threshold else scores, labels)
        if labels is not None and 0 < labels.sum() < labels.size:
            section.roc = _thin(*roc_curve(labels, scores))
            if masks is not None and 0 < int(masks.sum()) < masks.numel():
                section.pro = _thin(*pro_curve(masks.numpy(), maps.float().numpy()))
        vmin, vmax = heat_range(threshold) if threshold else (float(maps.min()), float(maps.max()))
        size = tuple(maps.shape[-2:])
        for i, path in enumerate(paths):
            image = load_image(path, size)
            thumb = thumb_size(size)
            panels = {"input": to_rgb8(resize(image[None], thumb)[0])}
            if aligned is not None:
                panels["aligned (STN)"] = to_rgb8(resize(aligned[i:i + 1].float(), thumb)[0])
            heat = overlay(panels["input"], resize(maps[i][None, None].float(), thumb)[0, 0], vmin, vmax)
            if threshold:
                # Max-pooled, so a region of a few pixels still shows at thumbnail size.
                region = F.adaptive_max_pool2d((maps[i] > threshold)[None].float(), thumb)[0] > 0
                heat = outline(heat, region, OUTLINE)
            panels["heatmap"] = heat
            if masks is not None:
                truth = F.adaptive_max_pool2d(masks[i][None].float(), thumb)[0] > 0
                panels["ground truth"] = mask_overlay(panels["input"], truth)
            files = {}
            for j, (name, rgb) in enumerate(panels.items()):
                # The input and its ground truth are the same for every model of a category.
                key = (category, str(path), name)
                if name in SHARED_PANELS and key in self.shared:
                    files[name] = self.shared[key]
                    continue
                files[name] = self._write_jpeg(f"s{index}_{i}_{j}.jpg", rgb)
                if name in SHARED_PANELS:
                    self.shared[key] = files[name]
            section.rows.append({"path": Path(path), "score": float(scores[i]),
                                 "normalized": float(section.normalized[i]),
                                 "label": None if labels is None else bool(labels[i]),
                                 "defect": None if defects is None else defects[i], "panels": files})
        self.sections.append(section)

    def write(self) -> Path:
        """Writes the plots and index.html; returns the index.html path."""
        categories = list(dict.fromkeys(s.category for s in self.sections))
        plots = {c: self._plot(f"plots_{k}_{_slug(c)}.png", [s for s in self.sections if s.category == c])
                 for k, c in enumerate(categories)}
        legend = self._legend() if any(s.threshold for s in self.sections) else None
        body = [f"<h1>{_e(self.title)}</h1>", self._summary_table()]
        if legend:
            body.append(f'<p class="legend">heatmap colours, fixed in units of each model\'s threshold '
                        f'(the same colour means the same normalized score in every report); the '
                        f'defect region (map above the threshold) is outlined in white:<br>'
                        f'<img src="{legend}" alt="colour scale"></p>')
        for category in categories:
            body.append(f"<h2>{_e(category)}</h2>")
            body.append(f'<img class="plot" src="{plots[category]}" alt="{_e(category)} plots">')
            members = [s for s in self.sections if s.category == category]
            for k, section in enumerate(members):
                body.append(self._gallery(section, open_=k == len(members) - 1))
        page = _PAGE.format(generator=HTML_GENERATOR, title=_e(self.title), body="\n".join(body))
        return write_text(self.folder / "index.html", page)

    # ------------------------------------------------------------------ pieces

    def _write_jpeg(self, name: str, rgb: np.ndarray) -> str:
        with atomic_file(self.folder / "assets" / name) as tmp:
            Image.fromarray(rgb).save(tmp, format="JPEG", quality=85)
        return f"assets/{name}"

    def _save_figure(self, fig, name: str) -> str:
        with atomic_file(self.folder / "assets" / name) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        return f"assets/{name}"

    def _plot(self, name: str, sections: list[_Section]) -> str:
        curves = any(s.roc for s in sections)
        n = len(sections) + 2 * curves
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False, layout="constrained")
        axes = list(axes[0])
        if curves:
            roc, pro = axes.pop(0), axes.pop(0)
            # Each model its own colour, dash and width: equal curves stay visible, one on the other.
            for s, style in zip(sections, CURVE_STYLES * len(sections), strict=False):
                if s.roc:
                    roc.plot(*s.roc, **style, label=f"{s.label} ({_fmt(s.summary.get('image_auroc'))})")
                if s.pro:
                    pro.plot(*s.pro, **style, label=f"{s.label} ({_fmt(s.summary.get('aupro'))})")
            roc.plot([0, 1], [0, 1], ":", color="grey")
            roc.set(title="image ROC", xlabel="false positive rate", ylabel="true positive rate")
            pro.axvspan(0, PRO_FPR_LIMIT, color="grey", alpha=0.12, label=f"AUPRO range (FPR <= {PRO_FPR_LIMIT})")
            pro.set(title="pixel PRO", xlabel="false positive rate (pixels)", ylabel="per-region overlap")
            for ax in (roc, pro):
                ax.legend(fontsize=7, loc="lower right")
        for ax, s in zip(axes, sections, strict=True):
            groups = ({"all images": s.normalized} if s.labels is None else
                      {"good": s.normalized[~s.labels], "defective": s.normalized[s.labels]})
            bins = np.histogram_bin_edges(s.normalized, bins=30)
            for (group, values), colour in zip(groups.items(), ("tab:blue", "tab:red"), strict=False):
                if values.size:
                    ax.hist(values, bins=bins, alpha=0.6, color=colour, label=group)
            if s.threshold:
                ax.axvline(1.0, color="black", linestyle="--", label="threshold")
            ax.set(title=f"{s.label} scores", ylabel="images",
                   xlabel="normalized score (score / threshold)" if s.threshold else "score (uncalibrated)")
            ax.legend(fontsize=7)
        return self._save_figure(fig, name)

    def _legend(self) -> str:
        fig, ax = plt.subplots(figsize=(4.5, 0.75), layout="constrained")
        norm = matplotlib.colors.Normalize(*NORMALIZED_RANGE)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=COLORMAP), cax=ax,
                           orientation="horizontal")
        bar.set_ticks([0, 0.5, 1.0, 1.5, 2.0], labels=["0", "0.5", "1 = threshold", "1.5", ">= 2"])
        bar.ax.tick_params(labelsize=8)
        return self._save_figure(fig, "legend.png")

    def _summary_table(self) -> str:
        names = {"images": "images", "anomalous": "called anomalous", **TABLE_METRICS,
                 "threshold": "threshold", **DECISION_METRICS, "target": "target false-reject rate",
                 "calibration_images": "calibration images",
                 "guaranteed": "false-reject bound, for images like the calibration images"}
        present = [k for k in names if any(k in s.summary for s in self.sections)]
        head = "".join(f"<th>{_e(names[k])}</th>" for k in present)
        rows = []
        for s in self.sections:
            cells = "".join(_summary_cell(s.summary, k) for k in present)
            rows.append(f"<tr><td>{_e(s.category)}</td><td>{_e(s.label)}</td>{cells}</tr>")
        return (f'<table class="summary"><tr><th>category / images</th><th>model</th>{head}</tr>'
                + "".join(rows) + "</table>")

    def _gallery(self, s: _Section, open_: bool) -> str:
        def wrong(row) -> bool:
            return s.threshold is not None and row["label"] is not None and (row["normalized"] > 1) != row["label"]

        rows = sorted(s.rows, key=lambda r: (not wrong(r), -r["normalized"]))
        n_wrong = sum(map(wrong, rows))
        panel_names = list(rows[0]["panels"]) if rows else []
        head = "".join(f"<th>{_e(n)}</th>" for n in panel_names)
        truth = s.labels is not None
        lines = []
        for rank, r in enumerate(rows, 1):
            decision = ("n/a" if s.threshold is None else "anomalous" if r["normalized"] > 1 else "good")
            known = f"<td>{_e(r['defect'] or ('defective' if r['label'] else 'good'))}</td>" if truth else ""
            imgs = "".join(f'<td><img src="{src}" alt="{_e(n)}" loading="lazy"></td>'
                           for n, src in r["panels"].items())
            lines.append(f'<tr class="{"wrong" if wrong(r) else ""}"><td>{rank}</td>'
                         f'<td class="name">{_e(_short(r["path"]))}</td>{known}'
                         f'<td>{r["score"]:.4g}</td><td>{_fmt(r["normalized"]) if s.threshold else "n/a"}</td>'
                         f'<td class="{decision}">{decision}</td>{imgs}</tr>')
        summary = f"{s.label} gallery: {len(rows)} images, sorted by normalized score"
        if truth and s.threshold is not None:
            summary += f"; {n_wrong} misclassified first (highlighted)"
        truth_head = "<th>truth</th>" if truth else ""
        return (f'<details{" open" if open_ else ""}><summary>{_e(summary)}</summary>'
                f'<table class="gallery"><tr><th>#</th><th>image</th>{truth_head}<th>score</th>'
                f'<th>normalized</th><th>decision</th>{head}</tr>' + "\n".join(lines)
                + "</table></details>")


def thumb_size(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of a gallery thumbnail of an image of `size`: THUMB high, same aspect."""
    height, width = size
    return THUMB, max(1, round(width * THUMB / height))


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.unique(np.linspace(0, x.size - 1, min(x.size, CURVE_POINTS)).round().astype(int))
    return x[keep], y[keep]


def _short(path: Path) -> str:
    return "/".join(path.parts[-2:])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _e(text) -> str:
    return html.escape(str(text))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{generator}<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: middle; }}
th {{ background: #f0f0f0; }}
td.name {{ text-align: left; font-family: monospace; }}
.gallery td {{ padding: 2px; }}
.gallery img {{ display: block; height: 112px; }}
tr.wrong, td.wrong {{ background: #ffe4e1; }}
td.anomalous {{ color: #b00; font-weight: bold; }}
td.good {{ color: #060; }}
img.plot {{ max-width: 100%; }}
summary {{ cursor: pointer; font-weight: bold; margin: 0.5em 0; }}
</style></head>
<body>
{body}
</body></html>
"""


def _summary_cell(summary: dict, key: str) -> str:
    """A summary table cell; a measured false-reject rate over twice its bound is flagged:
    the test images are not like the calibration images."""
    value, bound = summary.get(key), summary.get("guaranteed")
    if key == "false_reject_rate" and value is not None and bound is not None and value > 2 * bound:
        return (f'<td class="wrong" title="over twice the bound: calibrate with good images from '
                f'the line (--calibration DIR)">{_e(_fmt(value))} (over 2x the bound)</td>')
    return f"<td>{_e(_fmt(value))}</td>"
