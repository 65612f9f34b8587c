#!/usr/bin/env python3
"""Stage 1 (the profile) at CIFAR-100 scale: peak memory, wall time and disk writes.

Goal: the profile of a teacher (streamed S/I/E/Q per layer, optionally activations.h5,
selection, and features-<dtype>.h5 for the students' training rows) keeps its peak RSS <= 4 GiB and writes
<= 1 GiB to disk besides features.h5 itself, and both stay flat as the number of training
images and classes grows (CIFAR-100: 50 000 images, 100 classes; Tiny ImageNet: 100 000 images
at 64x64, 200 classes).

What it does:
1. Writes a CIFAR-100-shaped dataset once into a temporary directory, in the real pickle layout
   (`cifar-100-python/{train,test,meta}`), with balanced classes. The pixels are synthetic (a
   blocky per-class picture plus noise): the cost of stage 1 does not depend on them.
2. For each teacher width, as separate processes (so each one's peak RSS is its own):
   - `--list-layers`, to sum the floats per image over the teacher's generalized layers;
   - teacher training with `--train-only` (one epoch on 1 000 images: how well the teacher is
     trained does not change what the profile costs);
   - the profile: the same command without `--train-only`.
   Each process is measured for peak RSS (the kernel's ru_maxrss from wait4, which also covers
   its reaped children), wall time, and bytes written to the block layer (`write_bytes` of
   /proc/<pid>/io, polled every 0.2 s and read once more after the process exits, before it is
   reaped, so the figure is its exact total).
3. Lists the files the profile left under the artifacts directory (features.h5, activations.h5,
   others) and reports the bytes the profile wrote besides features.h5.
4. Parses the per-step lines stage 1 logs on stderr,
   `profile: step <name> took <s>s, peak RSS so far <MiB> MiB, written so far <MiB> MiB`,
   into a per-step table (a note instead, when the stage-1 code does not log them).
5. Prints Markdown tables and per-image costs for extrapolating to larger datasets.

Run (the full-size run is long on a CPU: a full-width ResNet34 over 50 000 images):

  .venv/bin/python bench/bench_profile_scale.py --widths 0.25 1.0 --n-train 50000 --classes 100
  .venv/bin/python bench/bench_profile_scale.py --widths 0.25 --n-train 2000 --n-test 200 \\
      profile.subset_size=1000 profile.per_class_cap=20          # a quick smoke run

Trailing `key=value` overrides go to every stage-1 process (after this script's own settings,
so they win); put them after an option that takes one value, or after `--`, since `--widths`
takes every bare value that follows it. `--budget-mb N` passes `profile.memory_budget_mb=N`.
Peak RSS counts only resident memory: the page cache holding freshly written files is not in it.
`write_bytes` is 0 on a tmpfs; pass `--tmp-dir` on a real disk if the system temp dir is one.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = "stage1_profile_teacher.py"
MIB = 2**20
POLL_S = 0.2
GOAL_RSS_MIB = 4096  # "4 GB" read as GiB
GOAL_WRITTEN_MIB = 1024  # "1 GB" besides features.h5, read as GiB
STEP_LINE = re.compile(
    r"^profile: step (\S+) took ([0-9.]+)s, peak RSS so far ([0-9]+) MiB, written so far ([0-9]+) MiB"
)
TINY_IMAGENET = (100_000, 200, 64)  # training images, classes, image side (for extrapolation)
CIFAR_SIDE = 32


# ----------------------------------------------------------------------------- dataset


def write_cifar100(root: Path, n_train: int, n_test: int, classes: int, seed: int = 0) -> None:
    """`root/cifar-100-python/{train,test,meta}` as common/data/formats.py's cifar100 reader reads them.

    Each class gets a random 4x4 RGB picture blown up to 32x32; each image is its class picture
    plus uniform noise, so the teacher has something to learn (not needed for the cost, cheap).
    The class count comes from `meta` (the loader counts fine_label_names), so `classes` need
    not be 100. Python 3 pickles (protocol 4) with bytes keys read the same as the real Python 2
    files under `pickle.load(..., encoding="bytes")`; protocol 2 would re-encode the pixel
    buffer as latin-1 text, which is slow and triples the memory for 150 MB.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(32, 224, size=(classes, 3, 4, 4), dtype=np.int16)
    prototypes = prototypes.repeat(8, axis=2).repeat(8, axis=3)  # [classes, 3, 32, 32]
    n_coarse = min(20, classes)
    for which, n in (("train", n_train), ("test", n_test)):
        # balanced: every class n // classes times, the remainder one more, in random order
        fine = rng.permutation(np.arange(n) % classes)
        data = np.empty((n, 3 * 32 * 32), dtype=np.uint8)
        for start in range(0, n, 10_000):  # chunks keep the int16 temporaries small
            part = slice(start, min(n, start + 10_000))
            noise = rng.integers(-32, 33, size=(part.stop - part.start, 3, 32, 32), dtype=np.int16)
            pixels = np.clip(prototypes[fine[part]] + noise, 0, 255).astype(np.uint8)
            data[part] = pixels.reshape(len(pixels), -1)  # rows are the R, G, B planes
        batch = {
            b"filenames": [f"{which}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{which}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) * n_coarse // classes for v in fine],
            b"data": data,
        }
        with (folder / which).open("wb") as handle:
            pickle.dump(batch, handle, protocol=4)
    meta = {
        b"fine_label_names": [f"fine_{i:03d}".encode() for i in range(classes)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(n_coarse)],
    }
    with (folder / "meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=4)


# ----------------------------------------------------------------------------- measuring a child


@dataclass(frozen=True)
class IoCounters:
    write_bytes: int  # bytes this process caused to be sent to the block layer (page dirtying)
    cancelled_write_bytes: int  # of those, dropped before writeback (file truncated or deleted)
    wchar: int  # bytes passed to write() and friends, any file, pipe or tty


@dataclass(frozen=True)
class Measured:
    peak_rss_mib: float
    wall_s: float
    io: IoCounters | None  # None: /proc/<pid>/io was never readable
    io_exact: bool  # True: read after exit (the total); False: last 0.2 s poll (a lower bound)
    stdout: Path
    stderr: Path


def read_io(pid: int) -> IoCounters | None:
    """The process's /proc/<pid>/io, or None once it is gone (or the file is unreadable)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    fields = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return IoCounters(int(fields["write_bytes"]), int(fields["cancelled_write_bytes"]), int(fields["wchar"]))


def measured(cmd: list[str], logs: Path, name: str) -> Measured:
    """Run `cmd` in the repository root; stdout and stderr go to `logs/<name>.{stdout,stderr}`
    (files, not pipes, so a chatty child can never block on a full pipe). Exits with the
    command and its stderr tail when the child fails."""
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    last: list[IoCounters | None] = [None]
    stop = threading.Event()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)

        def poll() -> None:
            # /proc/<pid>/io is readable only while the process exists: keep the last value read
            while not stop.is_set():
                last[0] = read_io(proc.pid) or last[0]
                stop.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            # WNOWAIT leaves the child a zombie: its /proc/<pid>/io still holds the final totals
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - tic
        except BaseException:  # Ctrl-C: do not leave a stage-1 process running behind us
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
            poller.join()
        final = read_io(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it; ru_maxrss is in KiB on Linux
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace")[-3000:]
        raise SystemExit(
            f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- last lines of {err_path} ---\n{tail}"
        )
    return Measured(usage.ru_maxrss / 1024, wall, final or last[0], final is not None, out_path, err_path)


# ----------------------------------------------------------------------------- reading results


def layer_floats(stdout: Path) -> int | None:
    """Sum of the `dim` column of `--list-layers` (a pandas to_string table), None if unparsable."""
    lines = [line.split() for line in stdout.read_text().splitlines() if line.strip()]
    header = next((i for i, cols in enumerate(lines) if "dim" in cols and "layer" in cols), None)
    if header is None:
        return None
    cols = lines[header]
    at = cols.index("dim")
    try:
        return sum(int(row[at]) for row in lines[header + 1:] if len(row) == len(cols))
    except ValueError:
        return None


def snapshot(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file under `folder`: (size, mtime_ns), to tell the profile's files from the teacher's."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def h5_rows(path: Path) -> int | None:
    """Rows in a feature cache: its `n` attribute, else the first axis of its first dataset."""
    import h5py  # only needed here; keeps the script importable without it

    with h5py.File(path, "r") as f:
        if "n" in f.attrs:
            return int(f.attrs["n"])
        first = next((f[k] for k in f if isinstance(f[k], h5py.Dataset)), None)
        return int(first.shape[0]) if first is not None and first.shape else None


def step_rows(stderr: Path) -> list[tuple[str, float, int, int]]:
    return [
        (m.group(1), float(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in map(STEP_LINE.match, stderr.read_text(errors="replace").splitlines())
        if m
    ]


@dataclass
class WidthResult:
    width: float
    floats_per_image: int | None
    teacher: Measured
    profile: Measured
    features_bytes: int | None
    activations_bytes: int | None
    other_profile_files: dict[Path, int]  # written (new or changed) by the profile process
    teacher_files: dict[Path, int]  # left by the teacher run, untouched by the profile
    rows: int | None
    steps: list[tuple[str, float, int, int]]

    @property
    def written(self) -> int | None:
        return self.profile.io.write_bytes if self.profile.io else None

    @property
    def written_besides_features(self) -> int | None:
        if self.written is None:
            return None
        return self.written - (self.features_bytes or 0)


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


# ----------------------------------------------------------------------------- main


def width_value(text: str) -> float:
    # argparse hands `--widths` every bare value after it, overrides included: say so clearly
    if "=" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is an override, not a width: put key=value overrides after another option or after --")
    return float(text)


def bench_width(args: argparse.Namespace, tmp: Path, data_root: Path, width: float) -> WidthResult:
    art = tmp / f"art_w{width:g}"
    logs = tmp / "logs"
    extra = [f"profile.memory_budget_mb={args.budget_mb}"] if args.budget_mb is not None else []
    cmd = [
        sys.executable, STAGE1, "--dataset", "cifar100", "--data-root", str(data_root), "--teacher", args.teacher,
        "--artifacts", str(art), "--quiet",
        f"teacher.width={width:g}", "teacher_train.epochs=1", "teacher_train.train_subset=1000", "train.train_subset=1000",
        *extra, *args.overrides,
    ]
    tag = f"w{width:g}"
    print(f"width {width:g}: listing layers, training the teacher, profiling ...", file=sys.stderr, flush=True)
    listing = measured(cmd + ["--list-layers"], logs, f"list_layers_{tag}")
    teacher = measured(cmd + ["--train-only"], logs, f"teacher_{tag}")
    before = snapshot(art)
    profile = measured(cmd, logs, f"profile_{tag}")
    after = snapshot(art)

    features = [p for p in after if p.name.startswith("features") and p.suffix == ".h5"]  # features-<dtype>.h5
    activations = [p for p in after if p.name == "activations.h5"]
    others = {p: s for p, (s, t) in after.items() if p not in features + activations}
    by_profile = {p: s for p, s in others.items() if before.get(p) != after[p]}
    result = WidthResult(
        width=width,
        floats_per_image=layer_floats(listing.stdout),
        teacher=teacher,
        profile=profile,
        features_bytes=sum(after[p][0] for p in features) if features else None,
        activations_bytes=sum(after[p][0] for p in activations) if activations else None,
        other_profile_files=by_profile,
        teacher_files={p: s for p, s in others.items() if p not in by_profile},
        rows=h5_rows(features[0]) if features else None,
        steps=step_rows(profile.stderr),
    )
    print(f"\n### Files under {art} after the profile (width {width:g})\n", flush=True)
    print("| file | group | MiB |\n|---|---|---|")
    for path, (size, _) in after.items():
        group = ("features.h5" if path in features else "activations.h5" if path in activations
                 else "other (profile)" if path in by_profile else "other (teacher run)")
        print(f"| {path.relative_to(art)} | {group} | {size / MIB:.2f} |")
    return result


def report(args: argparse.Namespace, results: list[WidthResult]) -> None:
    print(f"\n## Stage 1 on a CIFAR-100-shaped dataset: {args.n_train} training images, {args.classes} classes, teacher {args.teacher}\n")
    print("| teacher width | layers' floats per image | profile peak RSS MiB | profile wall s | MiB written by the profile process "
          "| MiB written besides features.h5 | features.h5 MiB | rows in features.h5 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        exact = "" if r.profile.io_exact else " (lower bound)"
        print(f"| {r.width:g} | {r.floats_per_image if r.floats_per_image is not None else 'n/a'} | {r.profile.peak_rss_mib:.0f} "
              f"| {r.profile.wall_s:.1f} | {mib(r.written)}{exact} | {mib(r.written_besides_features)}{exact} "
              f"| {mib(r.features_bytes)} | {r.rows if r.rows is not None else 'n/a'} |")

    print("\n### Details per width\n")
    print("| teacher width | teacher training peak RSS MiB / wall s | activations.h5 MiB | other files written by the profile: count / MiB "
          "| cancelled write MiB | wchar MiB | goal (RSS <= 4 GiB, <= 1 GiB besides features.h5) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        io = r.profile.io
        ok_rss = r.profile.peak_rss_mib <= GOAL_RSS_MIB
        besides = r.written_besides_features
        ok_written = besides is not None and besides <= GOAL_WRITTEN_MIB * MIB
        goal = "met" if ok_rss and ok_written else "MISSED (" + ", ".join(
            [w for w, bad in (("RSS", not ok_rss), ("written", not ok_written)) if bad]) + ")"
        print(f"| {r.width:g} | {r.teacher.peak_rss_mib:.0f} / {r.teacher.wall_s:.1f} | {mib(r.activations_bytes)} "
              f"| {len(r.other_profile_files)} / {mib(sum(r.other_profile_files.values()))} "
              f"| {mib(io.cancelled_write_bytes if io else None)} | {mib(io.wchar if io else None)} | {goal} |")
    if any(r.written == 0 for r in results):
        print("\nNote: write_bytes is 0, so the temp directory is probably on a tmpfs; rerun with --tmp-dir on a disk.")
    print("\n'Written besides features.h5' = the profile process's write_bytes minus the size of features.h5; it includes "
          "activations.h5, the small files and the child's own stdout/stderr logs (a few KiB). Cancelled writes were "
          "counted but dropped before reaching the disk (temp files deleted or truncated in time).")

    for r in results:
        print(f"\n### Profile steps, width {r.width:g} (from {r.profile.stderr})\n")
        if not r.steps:
            print("No `profile: step ...` lines on stderr: this stage-1 code does not log per-step figures yet.")
            continue
        print("| step | seconds | peak RSS so far MiB | written so far MiB |\n|---|---|---|---|")
        for name, seconds, rss, written in r.steps:
            print(f"| {name} | {seconds:.1f} | {rss} | {written} |")

    n_tiny, classes_tiny, side_tiny = TINY_IMAGENET
    area = (side_tiny / CIFAR_SIDE) ** 2
    print("\n### Per-image costs (to extrapolate)\n")
    print(f"Tiny ImageNet: {n_tiny} training images, {classes_tiny} classes, {side_tiny}x{side_tiny} pixels, so convolutional "
          f"feature maps hold {area:.0f}x the floats of CIFAR's {CIFAR_SIDE}x{CIFAR_SIDE}; the estimates below scale time and "
          "row size by that factor (an upper bound for layers after global pooling and for the logits).\n")
    print("| teacher width | profile s per training image | features.h5 bytes per row | Tiny ImageNet estimate: profile s "
          "| Tiny ImageNet estimate: features.h5 GiB |")
    print("|---|---|---|---|---|")
    for r in results:
        per_image = r.profile.wall_s / args.n_train
        per_row = r.features_bytes / r.rows if r.features_bytes and r.rows else None
        tiny_gib = f"{per_row * area * n_tiny / 2**30:.1f}" if per_row else "n/a"
        print(f"| {r.width:g} | {per_image * 1e3:.3f} ms | {f'{per_row:.0f}' if per_row else 'n/a'} "
              f"| {per_image * area * n_tiny:.0f} | {tiny_gib} |")
    print("\nThe profile's wall time includes loading the data and one teacher forward over the whole training split; "
          "peak RSS and writes besides features.h5 should not grow with the number of images or classes.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=width_value, nargs="+", default=[0.25, 1.0], help="teacher widths (teacher.width)")
    p.add_argument("--n-train", type=int, default=50_000, help="training images (balanced over the classes)")
    p.add_argument("--n-test", type=int, default=1000, help="test images")
    p.add_argument("--classes", type=int, default=100, help="fine classes")
    p.add_argument("--teacher", default="resnet34", help="teacher model (teacher.name)")
    p.add_argument("--budget-mb", type=int, default=None, help="passed as profile.memory_budget_mb=N when given")
    p.add_argument("--tmp-dir", default=None, help="where to make the temporary directory (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (data, artifacts, logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every stage-1 process, last")
    args = p.parse_args()
    if args.n_train < args.classes or args.n_test < args.classes:
        p.error(f"--n-train and --n-test must be at least --classes ({args.classes}) so every class appears in both splits")

    tmp = Path(tempfile.mkdtemp(prefix="bench_profile_scale_", dir=args.tmp_dir))
    (tmp / "logs").mkdir()
    failed = True
    try:
        data_root = tmp / "data"
        tic = time.perf_counter()
        write_cifar100(data_root, args.n_train, args.n_test, args.classes)
        print(f"dataset: {args.n_train} + {args.n_test} images, {args.classes} classes written in "
              f"{time.perf_counter() - tic:.1f}s to {data_root}", file=sys.stderr, flush=True)
        results = [bench_width(args, tmp, data_root, w) for w in args.widths]
        report(args, results)
        failed = False
    finally:
        leave_tmp(tmp, args.keep, failed)


def leave_tmp(tmp: Path, keep: bool, failed: bool) -> None:
    """A bench's temporary directory at its end: kept with --keep, else removed (saying how to
    keep it when the run failed)."""
    if keep:
        print(f"\nkept {tmp}", file=sys.stderr)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print(f"removed {tmp}; rerun with --keep to inspect the logs", file=sys.stderr)


if __name__ == "__main__":
    main()
