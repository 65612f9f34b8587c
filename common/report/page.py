"""One self-contained HTML page for a stage-3 report directory: report.html.

It renders the Markdown tables stage 3 already wrote (accuracy with its headroom sentences,
epochs to target, export, layer study, unfinished runs), so the page says exactly what the .md
files say, and embeds every PNG plot below the report directory as a data: URI. Nothing is
fetched when the page opens: no scripts, fonts or style sheets from elsewhere, so it opens
offline and can be mailed or attached as one file.

Markdown -> HTML is python-markdown with its `tables` extension (a maintained parser of the
pipe tables the .md files hold; a hand-written one would have to track every escape rule).
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import markdown

from common.files import atomic_write_text

# Sections in reading order: file name (relative to the report directory) and heading. Files
# that are missing are left out; other .md files found in the directory follow these.
SECTIONS = (
    ("accuracy.md", "Top-1 accuracy"),
    ("epochs_to_target.md", "Epochs to target"),
    ("export.md", "Exported students: size and latency"),
    ("layer_study.md", "Layer-selection study"),
    ("unfinished.md", "Unfinished and failed runs"),
    ("replaced_images.md", "Undecodable images replaced"),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 36em; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; color: #555; } nav a { margin-right: 1em; }
"""


def section_files(report_dir: Path) -> list[tuple[Path, str]]:
    """The Markdown files of `report_dir` to render, in order, with their headings."""
    known = [(report_dir / name, title) for name, title in SECTIONS if (report_dir / name).is_file()]
    named = {name for name, _ in SECTIONS}
    others = sorted(p for p in report_dir.rglob("*.md") if p.relative_to(report_dir).as_posix() not in named)
    return known + [(p, p.relative_to(report_dir).with_suffix("").as_posix().replace("_", " ")) for p in others]


def plot_files(report_dir: Path) -> list[Path]:
    return sorted(report_dir.rglob("*.png"))


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render(report_dir: Path, title: str = "Logit-free feature KD report") -> str:
    """The page's HTML for `report_dir` (pure: reads files, writes nothing)."""
    sections = section_files(report_dir)
    plots = plot_files(report_dir)
    anchors = [f"s{i}" for i in range(len(sections))]
    nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, (_, t) in zip(anchors, sections))
    nav += ' <a href="#plots">Plots</a>' if plots else ""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {html.escape(str(report_dir))}.</p>", f"<nav>{nav}</nav>"]
    for anchor, (path, heading) in zip(anchors, sections):
        text = path.read_text(encoding="utf-8")
        body.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>')
        body.append(markdown.markdown(text, extensions=["tables"]))
    if plots:
        body.append('<h2 id="plots">Plots</h2>')
        for png in plots:
            name = html.escape(png.relative_to(report_dir).as_posix())
            body.append(f'<figure><img src="{data_uri(png)}" alt="{name}"><figcaption>{name}</figcaption></figure>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html(report_dir: Path, title: str = "Logit-free feature KD report") -> Path:
    """report.html in `report_dir`, written atomically; returns its path."""
    path = Path(report_dir) / "report.html"
    atomic_write_text(path, render(Path(report_dir), title))
    return path
