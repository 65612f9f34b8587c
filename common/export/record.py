"""export.yaml, the record of an exported run: its file names, its format, and whether it is current.

Read by the exporter (`common.export.runner`, to skip a run already exported from the same student.pt)
and by stage 3's table (`common.report.exports`, to tell exported / stale / missing apart); written
only by `common.export.runner.export_run`, which documents the fields. Torch-free, so stage 3 reads it
without loading torch or ONNX.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.files import sha256_file

FORMAT = 1  # of export.yaml; a run exported with another format is exported again
ONNX_FILE, TORCHSCRIPT_FILE, RECORD_FILE, WEIGHTS_FILE = "student.onnx", "student.torchscript.pt", "export.yaml", "student.pt"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's export.yaml, or None when missing or unreadable."""
    try:
        record = yaml.safe_load((Path(run_dir) / RECORD_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return record if isinstance(record, dict) else None


def is_up_to_date(run_dir: Path, weights_sha256: str | None = None) -> bool:
    """export.yaml has this format, names the sha256 of the current student.pt, and both exported
    files are there with the recorded sizes."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None or record.get("format") != FORMAT:
        return False
    sha = weights_sha256 or sha256_file(run_dir / WEIGHTS_FILE)
    if (record.get("source") or {}).get("sha256") != sha:
        return False
    for section in ("onnx", "torchscript"):
        entry = record.get(section) or {}
        path = run_dir / str(entry.get("file", ""))
        if not entry.get("file") or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
    return True
