"""`make gpu-check` (bench/gpu_check.py) at toy sizes on the CPU: every part of the summary is
written, and without a GPU the plain command stops with one clear line."""
from __future__ import annotations

import json

import pytest

from tests.stages import ENV, one_error_line, run_stage

pytestmark = pytest.mark.stages  # starts the script, which starts pytest and stage 1 (about a minute)

SCRIPT = "bench/gpu_check.py"


def test_tiny_cpu_check_writes_every_section(tmp_path):
    out = run_stage(SCRIPT, ["--device", "cpu", "--tiny", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    env = summary["environment"]
    assert env["device"] == "cpu" and env["mode"] == "tiny" and env["torch"] and env["driver"] and env["device_name"].startswith("CPU: ")
    tests = summary["tests"]
    assert tests["status"] == "passed" and tests["counts"]["failed"] == 0 and len(tests["results"]) >= 10
    assert all(r["outcome"] == "passed" and "[cpu-" in r["test"] for r in tests["results"])  # no CUDA case without CUDA
    assert set(summary["speed"]) == {"ce_epoch", "ours_vs_ce", "quality", "extraction", "compile"}
    for name, part in summary["speed"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"))
        assert part["measurements"] and part["derived"], name
        assert all(m["value"] > 0 and m["wall_s"] > 0 for m in part["measurements"]), name  # every figure with its wall time
    units = {name: {m["unit"] for m in part["measurements"]} for name, part in summary["speed"].items()}
    assert "images/s" in units["ce_epoch"] and "images/s" in units["extraction"] and "images/s" in units["compile"]
    compiled = {d["what"] for d in summary["speed"]["compile"]["derived"]}
    assert any(w.startswith("compiled / eager") for w in compiled) and any(w.startswith("the build") for w in compiled)
    steps = [m["what"] for m in summary["speed"]["quality"]["measurements"]]
    assert any("quality_subset_a" in w for w in steps) and any("quality_subset_b" in w for w in steps)
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert text.startswith(f"# make gpu-check: {env['device_name']}") and env["torch"] in text
    for heading in ("## Correctness: passed", "### ce_epoch: ok", "### ours_vs_ce: ok", "### quality: ok", "### extraction: ok", "### compile: ok"):
        assert heading in text
    assert not list(tmp_path.glob("gpu_check_*"))  # the generated data and caches are removed


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["no CUDA GPU", "--device cpu --tiny"]),  # the plain `make gpu-check` where torch sees no GPU
        (["--device", "cuda"], ["no CUDA GPU", "--device cpu --tiny"]),
        (["--device", "cpu"], ["takes hours", "--tiny"]),  # the full sizes on a CPU
    ],
)
def test_without_cuda_the_check_stops_with_one_error_line(tmp_path, args, words):
    out = run_stage(SCRIPT, [*args, "--out", str(tmp_path)], env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    line = one_error_line(out)
    assert all(word in line for word in words), line
    assert not (tmp_path / "gpu_check.json").exists()
