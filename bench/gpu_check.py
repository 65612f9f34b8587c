#!/usr/bin/env python3
"""`make gpu-check`: one command that checks one GPU in at most 8 minutes (issue 19 item 5).

Writes one summary, gpu_check.md and gpu_check.json (default under artifacts/gpu_check/), that
names the GPU, the driver and torch, and holds:

- correctness: `pytest -m cuda tests/test_cuda.py`, pass/fail per test (each test runs on the
  CPU and on CUDA: device placement of every stage, bf16-autocast losses, S/I/E/Q on the device,
  accuracy against the CPU, KD_DETERMINISTIC=1, resume);
- speed, at CIFAR size with full-width models on generated CIFAR-100-shaped data:
  ce_epoch     a `ce` ResNet9 epoch of common.train.loop.fit in images/s against the same model's
               forward + backward + step on pre-normalized images resident on the device
               (bench/bench_train_loop.py's run_fit and run_plain);
  ours_vs_ce   an `ours` epoch from the feature cache against a `ce` epoch, whole stage-2 runs
               (bench/bench_epoch.py's epoch_table, after stage 1 for a 1-epoch ResNet34 teacher);
  quality      stage 1's S/I/E/Q steps for the full-width ResNet34 on CIFAR-100 shapes (50 000
               images, the default subsets: |A| = 5 000, |B| = 50 000), from stage 1's own step
               lines (bench/bench_profile_scale.py's bench_width);
  extraction   stage 1's feature extraction with HDF5 writes against the teacher's inference,
               images/s (bench/bench_extract.py);
  compile      ce_epoch's fit with train.compile=true (CUDA graphs) against eager fit, images/s,
               and the build's cost (common/train/compiled.py: whether `auto` should turn it on).

Every figure is a measurement, shown with the wall time of what measured it; medians and ratios
are listed apart, as arithmetic on those measurements. Each speed section runs in its own process
under a time box (the boxes add up to the 8 minutes); a section that overruns is killed and
recorded as timed out, and the summary is rewritten after every section, so what finished is
kept whatever happens later.

  python bench/gpu_check.py                        # the GPU torch sees first (CUDA_VISIBLE_DEVICES picks)
  python bench/gpu_check.py --out /tmp/check       # elsewhere
  python bench/gpu_check.py --device cpu --tiny    # the same script at toy sizes on the CPU (its test)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))  # the bench scripts import each other by bare name

TOTAL_S = 480  # the "at most 8 minutes" on one GPU
SECTIONS = ("ce_epoch", "ours_vs_ce", "quality", "extraction", "compile")
# Seconds each part may take; they add up to TOTAL_S less what the parent needs (importing torch,
# writing the summary). Sized from the CPU measurements in docs/performance.md and docs/gpus.md,
# scaled for an H200-class GPU: guesses until the first run on a GPU replaces them. compile is
# mostly the build of ResNet9's forward and backward (the whole part took 50 s at the toy width
# on this project's loaded 2-core CPU with an empty Inductor cache), then epochs of seconds.
BOXES = {"tests": 115, "ce_epoch": 45, "ours_vs_ce": 85, "quality": 110, "extraction": 35, "compile": 80}
MIN_BOX_S = 15  # below this a part is not started (it would only time out)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part measures on; FULL is the issue's "CIFAR size with full-width models"."""

    n_train: int  # generated CIFAR-100-shaped training images of ce_epoch (= the train subset)
    cache_n_train: int  # the same for ours_vs_ce, whose cache holds the selected and the baseline layers
    # (the baseline ones alone: 240 KiB per image in float16 at full width, bench/bench_extract.py)
    n_test: int
    classes: int
    width: float  # teacher and student width (1.0: the paper's)
    repeats: int  # timed repeats per variant after one warm-up
    quality_n_train: int  # training images of the S/I/E/Q dataset (CIFAR-100: 50 000)
    quality_overrides: tuple[str, ...]  # stage-1 settings of the quality part (empty: the defaults, the paper's subsets)
    extract_images: int
    tests_k: str | None  # pytest -k of the correctness part (None: every `cuda` test)


FULL = Sizes(n_train=10_000, cache_n_train=5_000, n_test=1_000, classes=100, width=1.0, repeats=3, quality_n_train=50_000,
             quality_overrides=(), extract_images=5_000, tests_k=None)
# Toy sizes for the CPU: every part runs, in seconds; the correctness part only the loss tests,
# so that the script's own test stays short (tests/test_cuda.py runs whole in the suite anyway).
TINY = Sizes(n_train=300, cache_n_train=300, n_test=100, classes=10, width=0.125, repeats=1, quality_n_train=300,
             quality_overrides=("profile.subset_size=100", "profile.per_class_cap=10"), extract_images=200, tests_k="losses")


class UsageError(Exception):
    """Printed as one `error:` line, exit 2 (the stage scripts' convention)."""


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[..., Any], device: Any, *args: Any) -> tuple[Any, float]:
    """(fn(*args), wall seconds), with the device's queue drained on both sides."""
    _sync(device)
    tic = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - tic


class Box:
    """A part's time box, as seen from inside the part: whether one more repeat fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def fits(self, last_s: float) -> bool:
        return time.perf_counter() + 1.5 * last_s < self.end


def measurement(what: str, value: float, unit: str, wall_s: float) -> dict[str, Any]:
    return {"what": what, "value": value, "unit": unit, "wall_s": wall_s}


def derived(what: str, value: float, unit: str, of: str) -> dict[str, Any]:
    return {"what": what, "value": value, "unit": unit, "of": of}


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _cifar_config(data_root: Path, artifacts: Path, sizes: Sizes, device: str, *extra: str):
    """configs/cifar100.yaml on generated data, every stage on `device`, full or toy width."""
    from bench_epoch import cifar_overrides
    from common.config import load_config

    w = f"{sizes.width:g}"
    return load_config(ROOT / "configs" / "cifar100.yaml", [
        *cifar_overrides(data_root, sizes.n_train), f"artifacts={artifacts}", f"teacher.width={w}", f"student.width={w}",
        f"teacher_train.device={device}", f"train.device={device}", f"profile.device={device}",
        "teacher_train.progress=false", "train.progress=false", "profile.progress=false",
        "teacher_train.tracker=none", "train.tracker=none", *extra,
    ])


# ----------------------------------------------------------------------------- the speed parts (children)


def _interleaved_epochs(variants: dict[str, Callable[[int], float]], dev: Any, repeats: int, box: Box) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """One warm-up epoch of each variant (kernels, cuDNN, the allocator, a compiled step's build),
    then up to `repeats` rounds in alternating order while the box allows; (the measurements,
    each variant's timed images/s). A variant is `run(seed) -> images/s`."""
    out: list[dict[str, Any]] = []
    for name, run in variants.items():
        ips, wall = timed(run, dev, 100)
        out.append(measurement(f"{name} warm-up epoch", ips, "images/s", wall))
    ips_of: dict[str, list[float]] = {name: [] for name in variants}
    last = 0.0
    for rep in range(repeats):
        if rep and not box.fits(last):
            break
        tic = time.perf_counter()
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            ips, wall = timed(variants[name], dev, rep)
            ips_of[name].append(ips)
            out.append(measurement(f"{name} epoch, repeat {rep + 1}", ips, "images/s", wall))
        last = time.perf_counter() - tic
    return out, ips_of


def _ce_student(sizes: Sizes, device: str, work: Path):
    """(the ce student's role, its data, its training rows, its device) on generated CIFAR-100 data."""
    from bench_profile_scale import write_cifar100
    from bench_train_loop import roles
    from common.data.registry import load_data
    from common.runtime import resolve_device

    write_cifar100(work / "data", sizes.n_train, sizes.n_test, classes=sizes.classes)
    cfg = _cifar_config(work / "data", work / "artifacts", sizes, device)
    data = load_data(cfg.dataset)
    role = roles(cfg)[1]
    rows = data.training_subset(role.train.train_subset, cfg.dataset.split_seed)
    return role, data, rows, resolve_device(role.train.device)


def part_ce_epoch(sizes: Sizes, device: str, work: Path, box: Box) -> dict[str, Any]:
    """fit's `ce` epoch against the plain step on device-resident tensors (bench_train_loop)."""
    from bench_train_loop import run_fit, run_plain

    role, data, rows, dev = _ce_student(sizes, device, work)
    x_all, y_all = data.normalize(data.train.images[rows], dev), data.train.labels[rows].to(dev)
    amp = role.train.amp and dev.type == "cuda"
    variants = {
        "fit": lambda seed: run_fit(role, data, rows, seed),
        "plain": lambda seed: run_plain(role, data, x_all, y_all, seed, channels_last=role.train.channels_last, amp=amp),
    }
    out, ips_of = _interleaved_epochs(variants, dev, sizes.repeats, box)
    return {
        "setup": {"model": f"{role.model.name} x{role.model.width:g}", "images": len(rows), "batch": role.train.batch_size,
                  "amp": amp, "channels_last": role.train.channels_last, "device": str(dev),
                  "fit": "common.train.loop.fit, its own images/s of the training part (metrics.csv)",
                  "plain": "zero_grad / forward / cross-entropy / backward / AdamW step on pre-normalized device-resident images"},
        "measurements": out,
        "derived": [
            derived("fit images/s, median", statistics.median(ips_of["fit"]), "images/s", "fit epochs"),
            derived("plain images/s, median", statistics.median(ips_of["plain"]), "images/s", "plain epochs"),
            derived("fit / plain, median of the repeats' ratios (goal on a GPU: >= 0.9)", _median_ratio(ips_of["fit"], ips_of["plain"]), "x", "the paired epochs"),
        ],
    }


def part_ours_vs_ce(sizes: Sizes, device: str, work: Path, box: Box) -> dict[str, Any]:
    """Whole one-epoch stage-2 runs of `ours` from the cache and `ce` (bench_epoch.epoch_table)."""
    from bench_epoch import VARIANTS, epoch_table
    from bench_profile_scale import write_cifar100
    from common.data.registry import load_data
    from common.profile import runner as profile

    sizes = dataclasses.replace(sizes, n_train=sizes.cache_n_train)
    write_cifar100(work / "data", sizes.n_train, sizes.n_test, classes=sizes.classes)
    cfg = _cifar_config(work / "data", work / "artifacts", sizes, device, *sizes.quality_overrides)
    data = load_data(cfg.dataset)
    prof, setup_s = timed(lambda: profile.run(cfg, data), device)  # teacher (1 epoch), S/I/E/Q, the cache
    variants = {name: VARIANTS[name] for name in ("ce", "ours (cache)")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    out = [measurement("stage 1 for the teacher (1 epoch, small profile, the cache)", setup_s, "s", setup_s)]
    last = 0.0
    for rep in range(sizes.repeats + 1):  # the first pair warms up
        if rep and not box.fits(last):
            break
        got, last = timed(lambda: epoch_table(cfg, data, variants, 1), device)
        for name, values in got.items():
            label = "warm-up" if rep == 0 else f"repeat {rep}"
            out.append(measurement(f"{name} epoch (metrics.csv epoch_time_s), {label}", values[0], "s", values[0]))
            if rep:
                times[name].append(values[0])
    return {
        "setup": {"teacher": f"{cfg.teacher.name} x{cfg.teacher.width:g}", "student": f"{cfg.student.name} x{cfg.student.width:g}",
                  "images": sizes.n_train, "batch": cfg.train.batch_size, "teacher layers": prof.selected, "device": device,
                  "cache": "common.train.teacher_source.CachedTeacher, whatever placement this checkout gives it"},
        "measurements": out,
        "derived": [
            derived("ours (cache) / ce epoch time, median of the repeats' ratios (goal on a GPU: <= 1.10)",
                    _median_ratio(times["ours (cache)"], times["ce"]), "x", "the paired epochs"),
        ] if times["ce"] else [],
    }


def part_quality(sizes: Sizes, device: str, work: Path, box: Box) -> dict[str, Any]:
    """Stage 1's S/I/E/Q steps at CIFAR-100 scale, as stage 1 logs them (bench_profile_scale.bench_width)."""
    from bench_profile_scale import bench_width, write_cifar100

    data_root = work / "data"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    n_test = max(sizes.n_test, sizes.classes)
    (_, gen_s) = timed(lambda: write_cifar100(data_root, sizes.quality_n_train, n_test, sizes.classes), "cpu")
    subset = min(1000, sizes.quality_n_train)
    args = SimpleNamespace(teacher="resnet34", budget_mb=None, overrides=[
        f"profile.device={device}", f"teacher_train.device={device}", "teacher_train.tracker=none",
        f"teacher_train.train_subset={subset}", f"train.train_subset={subset}", *sizes.quality_overrides,
    ])
    result = bench_width(args, work, data_root, sizes.width)
    steps = {name: seconds for name, seconds, _, _ in result.steps}
    out = [
        measurement("dataset written (pickles)", gen_s, "s", gen_s),
        measurement(f"teacher trained (stage 1 --train-only process: 1 epoch on {subset} images)", result.teacher.wall_s, "s", result.teacher.wall_s),
        measurement(f"profile process (S/I/E/Q, selection, the cache for {subset} rows)", result.profile.wall_s, "s", result.profile.wall_s),
    ]
    for name in ("quality_subset_a", "quality_subset_b", "features"):
        if name in steps:
            out.append(measurement(f"stage 1 step {name} (its own log line)", steps[name], "s", steps[name]))
    missing = [n for n in ("quality_subset_a", "quality_subset_b") if n not in steps]
    if missing:
        raise RuntimeError(f"stage 1 logged no step line for {missing}; see {result.profile.stderr}")
    return {
        "setup": {"teacher": f"resnet34 x{sizes.width:g}", "training images": sizes.quality_n_train, "classes": sizes.classes,
                  "settings": list(sizes.quality_overrides) or ["profile defaults: subset_size=5000, per_class_cap=500, memory_budget_mb=1536"],
                  "device": device, "peak host RSS of the profile MiB": round(result.profile.peak_rss_mib)},
        "measurements": out,
        "derived": [derived("S/I/E/Q, subsets A + B", steps["quality_subset_a"] + steps["quality_subset_b"], "s", "the two step lines")],
    }


def part_extraction(sizes: Sizes, device: str, work: Path, box: Box) -> dict[str, Any]:
    """Extraction with HDF5 writes against the same forward with nothing written (bench_extract)."""
    import torch

    from bench_extract import INFERENCE, bench_config, extraction, inference, seeded_teacher
    from bench_profile_scale import write_cifar100
    from common.cache import write as cache_write
    from common.cache.reader import storage_order
    from common.data.registry import load_data
    from common.layers.tables import layer_shapes
    from common.models import MODELS
    from common.runtime import resolve_device

    n = sizes.extract_images
    write_cifar100(work / "data", n, max(100, sizes.classes), sizes.classes)
    cfg = bench_config(SimpleNamespace(teacher="resnet34", width=sizes.width, overrides=[f"profile.device={device}"]), work)
    data = load_data(cfg.dataset)
    dev = resolve_device(cfg.profile.device)
    teacher = seeded_teacher(cfg, data, dev)
    layers = list(MODELS.get(cfg.teacher.name).baseline_layers)
    batch = cfg.profile.batch_size
    positions = storage_order(torch.unique(data.train_indices))
    layer_shapes(cfg, data)  # its one-off model build is cached, not timed
    depth = cache_write.WRITE_QUEUE_DEPTH
    variants = {
        INFERENCE: lambda: inference(teacher, data, positions, layers, batch, dev),
        f"extraction, writer thread (queue {depth})": lambda: extraction(cfg, data, teacher, layers, dev, depth),
    }
    out: list[dict[str, Any]] = []
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():
        _, wall = timed(run, dev)
        out.append(measurement(f"{name}, warm-up", n / wall, "images/s", wall))
    last = 0.0
    for rep in range(sizes.repeats):
        if rep and not box.fits(last):
            break
        tic = time.perf_counter()
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            _, wall = timed(variants[name], dev)
            seconds[name].append(wall)
            out.append(measurement(f"{name}, repeat {rep + 1}", n / wall, "images/s", wall))
        last = time.perf_counter() - tic
    extract_name = next(k for k in variants if k != INFERENCE)
    return {
        "setup": {"teacher": f"resnet34 x{sizes.width:g} (seeded, untrained)", "layers": layers, "images": n, "batch": batch,
                  "dtype": cfg.profile.cache_dtype, "device": str(dev), "cache directory": str(work)},
        "measurements": out,
        "derived": [
            derived("extraction images/s, median", n / statistics.median(seconds[extract_name]), "images/s", "the timed passes"),
            derived("extraction / inference images/s, median of the repeats' ratios", _median_ratio(seconds[INFERENCE], seconds[extract_name]), "x", "the paired passes"),
        ],
    }


def part_compile(sizes: Sizes, device: str, work: Path, box: Box) -> dict[str, Any]:
    """ce_epoch's fit with train.compile=true against eager fit (bench_train_loop --compile). The
    warm-up epochs are kept apart: the compiled one holds the build, which later fits of a new
    model of the same class reuse."""
    from bench_train_loop import run_fit
    from common.train.compiled import compile_mode

    role, data, rows, dev = _ce_student(sizes, device, work)
    variants = {
        "fit, eager": lambda seed: run_fit(role, data, rows, seed),
        "fit, compiled": lambda seed: run_fit(role, data, rows, seed, compile=True),
    }
    out, ips_of = _interleaved_epochs(variants, dev, sizes.repeats, box)
    warm = {m["what"]: m["wall_s"] for m in out if m["what"].endswith("warm-up epoch")}
    return {
        "setup": {"model": f"{role.model.name} x{role.model.width:g}", "images": len(rows), "batch": role.train.batch_size,
                  "device": str(dev), "mode": compile_mode(True, dev),
                  "what": "common.train.loop.fit one epoch, train.compile=false against true; auto stays off until this pays on a GPU"},
        "measurements": out,
        "derived": [
            derived("compiled fit images/s, median", statistics.median(ips_of["fit, compiled"]), "images/s", "compiled epochs after the warm-up"),
            derived("compiled / eager fit images/s, median of the repeats' ratios", _median_ratio(ips_of["fit, compiled"], ips_of["fit, eager"]), "x", "the paired epochs"),
            derived("the build: compiled warm-up epoch's wall time - eager warm-up's", warm["fit, compiled warm-up epoch"] - warm["fit, eager warm-up epoch"], "s", "the warm-up epochs"),
        ],
    }


PARTS: dict[str, Callable[[Sizes, str, Path, Box], dict[str, Any]]] = {
    "ce_epoch": part_ce_epoch, "ours_vs_ce": part_ours_vs_ce, "quality": part_quality, "extraction": part_extraction,
    "compile": part_compile,
}


def run_part(args: argparse.Namespace) -> int:
    """Child mode: one part, its result as JSON in --result."""
    sizes = TINY if args.tiny else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = PARTS[args.part](sizes, args.device, work, Box(args.box_s))
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------- the parent


def environment(device: str, tiny: bool) -> dict[str, Any]:
    """The GPU, the driver, torch and the code this summary is about."""
    import torch

    from common.runtime import code_version

    env: dict[str, Any] = {
        "device": device, "mode": "tiny" if tiny else "full", "torch": str(torch.__version__),
        "cuda_runtime": torch.version.cuda or "none", "python": platform.python_version(), "code": code_version(),
        "host": platform.node(), "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=str(torch.backends.cudnn.version()), driver=_driver(),
                   visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
    else:
        env.update(device_name=f"CPU: {_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                   driver="none (CPU)")
    return env


def _driver() -> str:
    """nvidia-smi's driver version, else the CUDA runtime torch was built with, else 'unknown'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        first = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
        if first:
            return first
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    return f"unknown (nvidia-smi unavailable; torch built for CUDA {torch.version.cuda})" if torch.version.cuda else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _run_boxed(cmd: list[str], log: Path, box_s: float, env: dict[str, str] | None = None) -> tuple[str, int | None, float]:
    """Run `cmd` in its own process group, output to `log`; ('ok' | 'failed' | 'timed_out', rc, wall s).
    On timeout the whole group is killed: a part's own children (stage 1 processes) too."""
    tic = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timed_out", None, time.perf_counter() - tic
        except BaseException:  # Ctrl-C: leave nothing running behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - tic


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def correctness(device: str, sizes: Sizes, out: Path, box_s: float) -> dict[str, Any]:
    """`pytest -m cuda tests/test_cuda.py`, one row per test from its JUnit XML."""
    xml = out / "pytest.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if sizes.tests_k:
        cmd += ["-k", sizes.tests_k]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu: the tests generate their CPU cases only
    status, rc, wall = _run_boxed(cmd, out / "logs" / "tests.log", box_s, env)
    rows: list[dict[str, Any]] = []
    try:
        cases = list(ET.parse(xml).getroot().iter("testcase")) if xml.exists() else []
    except ET.ParseError:  # cut off mid-write by the time box
        cases = []
    for case in cases:
        outcome = next((word for tag, word in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")) if case.find(tag) is not None), "passed")
        rows.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome, "seconds": float(case.get("time", 0))})
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    if status == "ok" and rows and counts["passed"] == len(rows):
        verdict = "passed"
    elif status == "timed_out":
        verdict = "timed_out"
    else:
        verdict = "failed"
    return {"status": verdict, "command": " ".join(cmd[1:]), "wall_s": wall, "exit_code": rc, "counts": counts, "results": rows,
            "log": str(out / "logs" / "tests.log"), **({"log_tail": _tail(out / "logs" / "tests.log")} if verdict != "passed" else {})}


def speed_part(name: str, device: str, tiny: bool, out: Path, work: Path, box_s: float) -> dict[str, Any]:
    result_file = out / "logs" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--device", device, "--result", str(result_file),
           "--work", str(work / name), "--box-s", f"{box_s:.0f}"] + (["--tiny"] if tiny else [])
    log = out / "logs" / f"{name}.log"
    status, rc, wall = _run_boxed(cmd, log, box_s)
    shutil.rmtree(work / name, ignore_errors=True)  # caches of several GB
    part: dict[str, Any] = {"status": status, "wall_s": wall, "time_box_s": round(box_s), "log": str(log)}
    if status == "ok" and result_file.exists():
        part.update(json.loads(result_file.read_text()))
    else:
        part["status"] = "failed" if status == "ok" else status
        part["exit_code"] = rc
        part["log_tail"] = _tail(log)
    return part


def summary_markdown(s: dict[str, Any]) -> str:
    env, tests = s["environment"], s.get("tests")
    lines = [
        f"# make gpu-check: {env['device_name']}",
        "",
        f"- device: `{env['device']}`, {env['device_name']}" + (f", {env['memory_gib']} GiB" if "memory_gib" in env else ""),
        f"- driver: {env['driver']}; CUDA runtime (torch's build) {env['cuda_runtime']}" + (f"; cuDNN {env['cudnn']}" if "cudnn" in env else ""),
        f"- torch {env['torch']}, Python {env['python']}, code {env['code']}, host {env['host']}",
        f"- mode {env['mode']}, started {env['started']}, wall {s.get('wall_s', 0):.0f} s of the {s['budget_s']} s budget",
        "",
    ]
    if tests:
        c = tests["counts"]
        lines += [f"## Correctness: {tests['status']} ({c['passed']} passed, {c['failed']} failed, {c['error']} errors, {tests['wall_s']:.0f} s)", "",
                  f"`{tests['command']}`", "", "| test | outcome | s |", "|---|---|---|"]
        lines += [f"| {r['test']} | {r['outcome']} | {r['seconds']:.1f} |" for r in tests["results"]]
        if "log_tail" in tests:
            lines += ["", "```", tests["log_tail"], "```"]
        lines.append("")
    lines += ["## Speed", "", "Each value is one measurement with the wall time of what measured it; the derived lines are arithmetic on them.", ""]
    for name in SECTIONS:
        part = s["speed"].get(name)
        if part is None:
            continue
        lines += [f"### {name}: {part['status']} ({part['wall_s']:.0f} s of a {part['time_box_s']} s box)", ""]
        for key, value in part.get("setup", {}).items():
            lines.append(f"- {key}: {value}")
        if part.get("measurements"):
            lines += ["", "| measurement | value | unit | wall s |", "|---|---|---|---|"]
            lines += [f"| {m['what']} | {m['value']:.4g} | {m['unit']} | {m['wall_s']:.2f} |" for m in part["measurements"]]
        if part.get("derived"):
            lines += ["", "| derived | value | unit | from |", "|---|---|---|---|"]
            lines += [f"| {d['what']} | {d['value']:.4g} | {d['unit']} | {d['of']} |" for d in part["derived"]]
        if "log_tail" in part:
            lines += ["", "```", part["log_tail"], "```"]
        lines.append("")
    return "\n".join(lines)


def write_summary(out: Path, s: dict[str, Any]) -> None:
    for path, text in ((out / "gpu_check.json", json.dumps(s, indent=1, default=str)), (out / "gpu_check.md", summary_markdown(s))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def check(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None or (device == "cuda" and not torch.cuda.is_available()):
        raise UsageError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False), and make gpu-check measures one; "
                         "run it on a GPU machine, or try the script here at toy sizes with: python bench/gpu_check.py --device cpu --tiny")
    if device == "cpu" and not args.tiny:
        raise UsageError("--device cpu runs the GPU check's full sizes on the CPU, which takes hours; add --tiny for the toy sizes")
    sizes = TINY if args.tiny else FULL
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget_s - 5  # the last summary write
    s: dict[str, Any] = {"schema": 1, "budget_s": args.budget_s, "environment": environment(device, args.tiny), "tests": None,
                         "speed": {}, "sizes": dataclasses.asdict(sizes)}
    print(f"gpu-check on {s['environment']['device_name']}: summary in {out}", file=sys.stderr, flush=True)

    def box(name: str) -> float:
        return min(BOXES[name] * args.budget_s / TOTAL_S, deadline - time.perf_counter())

    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    try:
        if box("tests") >= MIN_BOX_S:
            s["tests"] = correctness(device, sizes, out, box("tests"))
            print(f"  tests: {s['tests']['status']} {s['tests']['counts']} ({s['tests']['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        s["wall_s"] = time.perf_counter() - start
        write_summary(out, s)
        for name in SECTIONS:
            b = box(name)
            if b < MIN_BOX_S:
                s["speed"][name] = {"status": "not_run", "wall_s": 0.0, "time_box_s": round(max(b, 0)), "log_tail": "out of the time budget"}
            else:
                s["speed"][name] = speed_part(name, device, args.tiny, out, work, b)
            print(f"  {name}: {s['speed'][name]['status']} ({s['speed'][name]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            s["wall_s"] = time.perf_counter() - start
            write_summary(out, s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = (s["tests"] or {}).get("status") == "passed" and all(p["status"] == "ok" for p in s["speed"].values())
    print(f"gpu-check: {'all parts finished' if ok else 'some parts failed or were cut, see the summary'}: {out / 'gpu_check.md'}", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (an error where torch sees none)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, seconds per part (the script's own test)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "gpu_check"), help="where gpu_check.{md,json} and the logs go")
    p.add_argument("--budget-s", type=int, default=TOTAL_S, help=f"the whole check's time, split over the parts (default {TOTAL_S})")
    p.add_argument("--work-dir", default=None, help="where the generated data and caches go (default: the system temp dir; several GB)")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # child mode, started by the parent
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--box-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        return run_part(args) if args.part else check(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
