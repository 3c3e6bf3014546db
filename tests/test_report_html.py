"""The HTML report: content and order, and a real render in headless Chromium.

The browser test needs Debian's `chromium` (.ci/run installs it); it is skipped, saying so,
only where no Chromium is installed.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stnpadim_ext.report_html import THUMB, HtmlReport

SIZE = 64
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def make_images(folder: Path, n: int, rng) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def fake_results(rng, n: int = 12):
    """Labels, masks and maps where defective images mostly (not always) score higher."""
    labels = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    maps = torch.rand(n, SIZE, SIZE, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    for i in range(n // 2, n):
        y, x = rng.integers(8, SIZE - 16, 2)
        masks[i, y:y + 8, x:x + 8] = True
        maps[i, y:y + 8, x:x + 8] += 1.0 + rng.random()
    maps[0, 5:9, 5:9] += 2.0  # a good image above the threshold: a false reject
    return labels, masks, maps, maps.flatten(1).amax(1)


@pytest.fixture
def report_dir(tmp_path) -> Path:
    rng = np.random.default_rng()
    paths = make_images(tmp_path / "images", 12, rng)
    labels, masks, maps, scores = fake_results(rng)
    report = HtmlReport(tmp_path / "report", "test report")
    aligned = torch.rand(12, 3, 40, 40)
    for label, threshold, extra in (("PaDiM", 1.5, {}), ("STN+PaDiM", 1.5, {"aligned": aligned})):
        report.add("widget", label, paths, scores, maps, threshold, labels=labels,
                   defects=["good"] * 6 + ["hole"] * 6, masks=masks,
                   metrics={"image_auroc": 0.9, "false_reject_rate": 1 / 6},
                   calibration={"alpha": 0.05, "n": 30, "guaranteed_rate": 1 / 31}, **extra)
    report.add("unlabelled", "PaDiM", paths[:5], scores[:5], maps[:5], None)  # uncalibrated, no truth
    report.write()
    return tmp_path / "report"


def image_sources(report: Path) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', (report / "index.html").read_text())


def test_report_content_order_and_files(report_dir):
    html = (report_dir / "index.html").read_text()
    for text in ("<h2>widget</h2>", "<h2>unlabelled</h2>", "PaDiM gallery", "STN+PaDiM gallery",
                 "aligned (STN)", "ground truth", "heatmap", "1 misclassified first",
                 "false-reject bound, for images like the calibration images", "n/a"):
        assert text in html, text
    # 1/6 of the good images rejected against a bound of 1/31: flagged, naming the remedy.
    assert html.count("(over 2x the bound)") == 2 and "--calibration DIR" in html
    sources = image_sources(report_dir)
    for src in sources:
        assert not src.startswith(("/", "http", "file:")) and (report_dir / src).is_file(), src
    # Gallery thumbnails are THUMB px high and small; the false reject (image 000) leads.
    thumbs = [s for s in sources if s.endswith(".jpg")]
    with Image.open(report_dir / thumbs[0]) as img:
        assert img.size[1] == THUMB
    assert max((report_dir / s).stat().st_size for s in thumbs) < 20_000
    first_row = html.split('<tr class="wrong">')[1].split("</tr>")[0]
    assert "images/000.png" in first_row and ">anomalous<" in first_row
    # Sorted by normalized score after the misclassified rows.
    gallery = html.split("STN+PaDiM gallery")[1].split("</table>")[0]
    values = [float(v) for v in re.findall(r"</td><td>[0-9.]+</td><td>([0-9.]+)</td><td class=", gallery)]
    assert values[1:] == sorted(values[1:], reverse=True) and len(values) == 12


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__errors.push(args.join(" ")); original(...args); };
}
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = "eager"; });
  Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); })))
  .then(() => {
    const broken = images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src"));
    document.body.setAttribute("data-check", JSON.stringify({images: images.length, broken, errors: window.__errors}));
  });
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    index = report_dir / "index.html"
    # 1. The page as written: it holds no script, so any console line is a problem.
    shot = tmp_path / "report.png"
    run = chromium("--window-size=1280,1400", "--virtual-time-budget=5000", f"--screenshot={shot}",
                   index.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CONSOLE" not in run.stderr, [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    # 2. A copy with a checker: every image (lazy ones forced) loads, no error event fires.
    checked = report_dir / "check.html"
    checked.write_text(index.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    run = chromium("--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    found = re.search(r"data-check=\"([^\"]*)\"", run.stdout)
    assert found, run.stdout[:2000] + run.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] == len(image_sources(report_dir)) and check["images"] > 30
    assert check["broken"] == [] and check["errors"] == [], check
    # 3. The screenshot: the right size, and a page with content, not a blank one.
    with Image.open(shot) as img:
        assert img.size == (1280, 1400)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01
