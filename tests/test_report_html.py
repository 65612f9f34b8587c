"""report.html: one self-contained page with stage 3's tables and plots, checked as rendered by
headless Chromium (Debian's `chromium`, installed by `make setup` / .ci/setup.sh)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from common.report import runner as report
from common.report.page import render, write_html
from tests.test_report import make_run, make_teacher

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A stage-3 report over hand-made runs: ce, kd and ours, two seeds each, plus a teacher."""
    root = tmp_path_factory.mktemp("html")
    art = root / "artifacts"
    make_teacher(art, [80.0, 90.0, 95.0])
    for seed in (0, 1):
        make_run(art, "ce", seed, [60.0, 70.0, 75.0 + seed])
        make_run(art, "kd", seed, [62.0, 72.0, 77.0 + seed])
        make_run(art, "ours", seed, [65.0, 78.0, 82.0 + seed])
    out = root / "reports"
    report.run(art, out)
    write_html(out)
    return out


@pytest.mark.stages
def test_every_table_and_plot_is_in_the_page_and_nothing_is_fetched(report_dir):
    page = (report_dir / "report.html").read_text()
    md_tables = sum(text.count("\n|---") + text.startswith("|---") for text in (p.read_text() for p in report_dir.rglob("*.md")))
    assert page.count("<table>") == md_tables > 0
    pngs = list(report_dir.rglob("*.png"))
    assert len(pngs) >= 1 and page.count('<img src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(https?:|//)', page)  # offline: nothing from elsewhere
    assert "ours" in page and "Top-1 accuracy" in page
    assert "ours did best" in page  # the opening sentences lead the page too


def test_render_follows_the_report_directory(tmp_path):
    (tmp_path / "accuracy.md").write_text("| method | best |\n|---|---|\n| ours | 84.32 |\n\nHeadroom is 4.5 points.\n")
    (tmp_path / "layer_study.md").write_text("Q's layers beat random draw 1 by 0.4 ± 0.3 points.\n")
    page = render(tmp_path)
    assert page.index("Top-1 accuracy") < page.index("Layer-selection study")
    assert "<td>84.32</td>" in page and "Headroom is 4.5 points." in page and "<img" not in page


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: run `make setup-test` (.ci/setup.sh --test installs Debian's chromium)"
    return path


@pytest.mark.stages
def test_chromium_renders_the_tables_and_the_plots(report_dir, tmp_path):
    url = (report_dir / "report.html").resolve().as_uri()
    chromium = _chromium()
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # accuracy and epochs to target; no unfinished run, so no third, empty table
    assert dom.stdout.count("<table>") == 2 and "Unfinished" not in dom.stdout and dom.stdout.count("<img ") == len(list(report_dir.rglob("*.png")))
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,4000", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] >= 4000 * 0.9 and pixels.std() > 0.05  # not a blank page
    # The plots are the only coloured things on the page (tables are black on white/grey): their
    # pixels on screen mean the embedded images were decoded and drawn.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert int((saturation > 0.3).sum()) > 500
