#!/usr/bin/env python3
"""Streamed datasets (issue 21): loader throughput, memory flat in dataset size, stage 1 on
tv:resnet50 at 224 px, and the 1 000-class ImageNet figure by arithmetic.

Goals (issue 21's benchmarks):
1. Loader: the DataLoader of a streamed split (`common.train.inputs.StreamedImages`) with 2
   workers and the training transform (RandomResizedCrop 224 + flip) reaches >= 0.9 x 2 cores'
   worth, i.e. >= 1.8 x the rate of the same decode + transform of the same files in one
   process (`FileImages.load` in a loop, one torch thread, as a DataLoader worker runs).
2. Memory: the peak RSS of stage 1 and of a one-epoch stage 2 (train.augment=true, the live
   teacher) stays within 10 % when the number of images doubles (N and 2N, same classes).
   Part 2b resolves what part 2 cannot at its size: the listing and file index's bytes per
   image, from load_data(imagenet) alone over 64 000 and 128 000 empty files, and so what
   ImageNet's 1.33 M files add to every stage's peak.
3. Stage 1 on tv:resnet50 at 224 px over 100 generated classes: time and peak RSS of subset A
   and subset B per image; then the same for ImageNet (1 000 classes, A = 5 000, B = 50 per class
   from a 50 000-image pool) as arithmetic from these measurements, labelled as such.

Method:
- Data in the real layout, written once (a temp dir, or --data-dir, reused when its parameters
  match): `train/<wnid>/<wnid>_<i>.JPEG`, `val/<wnid>/ILSVRC2012_val_<n>.JPEG`, RGB JPEGs of random
  width and height in 256-500 px. Each picture is a blurred 4 x 4 random image plus uniform noise
  of +-64, at quality 90: about 95 kB a file, near ImageNet's average of about 110 kB
  (tests/fakedata.py's `make_imagenet` pictures are the same blur without the noise, about 12 kB,
  and decode in half the time, so they would flatter the decode cost). Dataset 2N is written once; N is hard links
  to the first half of each of its class folders, so N's files are 2N's.
- Part 1 runs in this process, alternating the one-process loop and the loader (--repeats
  times, over the same positions, same seeds); the loader's epoch 0 includes the workers' start,
  epoch 1 is steady state. The CPU seconds of this (main) process and of the workers show how
  much of the 2 cores each took: on this shared 2-core machine the main process and the other
  users take their share, so the ratio cannot be 2.0 here.
- Parts 2 and 3 run the stage scripts as child processes, one at a time, measured by
  bench/bench_profile_scale.py's `measured` (peak RSS = the kernel's ru_maxrss from wait4, i.e.
  the LARGEST single process of the tree, its reaped children included). A DataLoader's workers
  are separate processes, so a poller also sums the PSS (proportional set size: shared pages
  divided among their users) over the whole process tree every 0.2 s; its peak is the tree's.
- The teacher is a random tv:<model> checkpoint with the dataset's classes, passed as
  teacher.pretrained=<file> teacher.finetune=false: evaluated (top-1 on val) and profiled, never
  trained (the cost of the profile does not depend on the weights).
- Part 2 keeps the Q subsets fixed (profile.subset_size and profile.per_class_cap), as a
  config with a pool does, and the evaluation batch at most the val split at N (a val split
  smaller than one batch would make the batch grow with it): what doubles is the split that
  every step reads through.
- Part 3 parses the per-step lines stage 1 logs (`profile: step <name> took <s>s, peak RSS so
  far <MiB> MiB`, with bench_profile_scale's parser) and measures, in this process, the decode +
  eval-transform cost per image and the teacher's forward time to each generalized layer, so the
  arithmetic can count the passes over A that `common.quality.stream.plan_subset_a` plans at
  ImageNet's |A| = 5 000 (and the groups `plan_subset_b` plans for B).

Run (the machine is shared: nice it; the default sizes take about 20 min on 2 CPU cores, most of
it part 3):

  nice .venv/bin/python bench/bench_stream.py [--json out.json] [--data-dir DIR] [--parts loader memory index stage1]
  nice .venv/bin/python bench/bench_stream.py --classes 10 --mem-per-class 10 --loader-images 100  # a smoke run

Trailing `key=value` overrides go to every stage process (after this script's own, so they win).
No GPU has run this script; with one, stage 1 would run on it (profile.device=auto).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_profile_scale import Measured, leave_tmp, measured, step_rows  # noqa: E402

MIB = 2**20
POLL_S = 0.2
SIDES = (256, 500)  # generated JPEGs' width and height range, px (ImageNet's typical sizes)
NOISE = 64  # +- uniform noise on the blurred picture: ~95 kB files at quality 90 (ImageNet's average ~110 kB)
JPEG_QUALITY = 90
LOADER_GOAL = 0.9  # x the workers' cores
MEMORY_GOAL = 0.10  # relative growth of peak RSS from N to 2N
# ImageNet (ILSVRC-2012) and the imagenet config's Q subsets (assumed: configs/imagenet.yaml's pool)
IMAGENET = dict(classes=1000, n_train=1_281_167, n_val=50_000, a_per_class=5, pool_size=50_000, per_class_cap=50)
STAGE1, STAGE2 = "stage1_profile_teacher.py", "stage2_distill.py"
PARTS = ("loader", "memory", "index", "stage1")
BUDGETS_MB = (1536, 4096, 16384, 65536)  # profile.memory_budget_mb values the ImageNet plan is also counted for


# ----------------------------------------------------------------------------- data


def wnid(c: int) -> str:
    return f"n{c:08d}"


def write_imagenet(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """ILSVRC-2012 class folders under `root` (train/ and val/), textured JPEGs (module docstring)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_val = 0
    for c in range(classes):
        for which, n in (("train", train_per_class), ("val", val_per_class)):
            folder = root / which / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                height, width = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
                small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                blur = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.int16)
                pixels = np.clip(blur + rng.integers(-NOISE, NOISE + 1, size=blur.shape, dtype=np.int16), 0, 255).astype(np.uint8)
                if which == "train":
                    name = f"{wnid(c)}_{i}.JPEG"
                else:
                    n_val += 1
                    name = f"ILSVRC2012_val_{n_val:08d}.JPEG"
                Image.fromarray(pixels).save(folder / name, "JPEG", quality=JPEG_QUALITY)


def link_half(full: Path, half: Path) -> None:
    """`half`: hard links to the first half (sorted names) of every class folder of `full`."""
    for folder in sorted(p for p in full.glob("*/*") if p.is_dir()):
        files = sorted(folder.iterdir())
        target = half / folder.relative_to(full)
        target.mkdir(parents=True, exist_ok=True)
        for f in files[: len(files) // 2]:
            os.link(f, target / f.name)


def ensure_dataset(root: Path, classes: int, train_per_class: int, val_per_class: int) -> Path:
    """`root` holding that dataset: reused when its marker says so, else (re)written."""
    params = {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "sides": list(SIDES), "noise": NOISE, "quality": JPEG_QUALITY}
    marker = root / "bench_stream.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    tic = time.perf_counter()
    write_imagenet(root, classes, train_per_class, val_per_class)
    marker.write_text(json.dumps(params))
    n = classes * (train_per_class + val_per_class)
    print(f"dataset {root}: {n} JPEGs written in {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True)
    return root


def ensure_halved(full: Path, half: Path) -> Path:
    marker = half / "bench_stream.json"
    expected = {"half_of": str(full), **json.loads((full / "bench_stream.json").read_text())}
    if marker.exists() and json.loads(marker.read_text()) == expected:
        return half
    shutil.rmtree(half, ignore_errors=True)
    link_half(full, half)
    marker.write_text(json.dumps(expected))
    return half


def mean_file_kb(root: Path) -> float:
    sizes = [p.stat().st_size for p in root.glob("train/*/*.JPEG")]
    return sum(sizes) / max(1, len(sizes)) / 1024


def random_teacher(name: str, classes: int, image_size: int, path: Path) -> Path:
    """A seeded random `name` state dict with `classes` outputs: used as it is (never trained)."""
    import torch

    from common.models import create_model

    if not path.exists():
        torch.manual_seed(0)
        model = create_model(name, num_classes=classes, in_channels=3, image_size=image_size)
        torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- the process tree's memory


def children_of(stats: dict[int, int], root: int) -> list[int]:
    """Every descendant of `root`, given {pid: parent pid}."""
    kids: dict[int, list[int]] = {}
    for pid, ppid in stats.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every process (/proc/<pid>/stat: the field after the command's ')')."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    return out


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreePss:
    """While open, polls the summed PSS of this process's descendants (those started after it
    opened): the memory of a stage process and its DataLoader workers together."""

    def __init__(self) -> None:
        self.peak_mib, self.most_processes = 0.0, 0
        self._stop = threading.Event()
        self._before: set[int] = set()

    def __enter__(self) -> "TreePss":
        self._before = set(children_of(parent_pids(), os.getpid()))
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids = [p for p in children_of(parent_pids(), os.getpid()) if p not in self._before]
            self.peak_mib = max(self.peak_mib, sum(pss_mib(p) for p in pids))
            self.most_processes = max(self.most_processes, len(pids))
            self._stop.wait(POLL_S)


@dataclass
class StageRun:
    name: str
    images: int  # training images of the dataset
    peak_rss_mib: float  # largest single process (ru_maxrss)
    tree_pss_mib: float  # whole tree, polled
    processes: int
    wall_s: float
    loadavg: float  # 1-minute load average when it started
    steps: list[tuple[str, float, int, int]] = field(default_factory=list)


def run_stage(cmd: list[str], logs: Path, name: str, images: int) -> StageRun:
    print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    with TreePss() as tree:
        m: Measured = measured(cmd, logs, name)
    return StageRun(name, images, m.peak_rss_mib, tree.peak_mib, tree.most_processes, m.wall_s, load, step_rows(m.stderr))


# ----------------------------------------------------------------------------- part 1: loader


@dataclass
class LoaderRound:
    one_process_ips: float
    one_process_cpu_s: float  # CPU seconds of the one-process loop
    one_process_wall_s: float
    loader_epoch0_ips: float  # includes starting the workers
    loader_ips: float  # epoch 1, steady state
    main_cpu_s: float  # this process's CPU seconds during the loader's epoch 1
    workers_cpu_s: float
    loader_wall_s: float

    @property
    def ratio(self) -> float:
        return self.loader_ips / self.one_process_ips

    @property
    def cpu_per_image_ratio(self) -> float:
        """The workers' CPU seconds per image over the one-process loop's: the loader's own
        overhead, whatever share of the cores the machine's other users left."""
        return self.workers_cpu_s / self.one_process_cpu_s


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (/proc/<pid>/stat fields 14 and 15)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_bench(data_root: Path, images: int, batch_size: int, workers: int, repeats: int) -> list[LoaderRound]:
    import torch

    from common.config import DatasetConfig
    from common.data.registry import load_data
    from common.data.stream import sample_seed
    from common.train.inputs import StreamedImages

    data = load_data(DatasetConfig(name="imagenet", root=str(data_root), image_size=224, workers=workers))
    files = data.train.images
    positions = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:images]
    batches = list(positions.split(batch_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with: one core's worth
    source = StreamedImages(files, torch.device("cpu"), augment=True, seed=0)
    rounds = []
    try:
        for r in range(repeats):
            epoch = 2 * r
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            tic = time.perf_counter()
            for p in positions.tolist():
                files.load(p, sample_seed(0, epoch, p))
            one_wall = time.perf_counter() - tic
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            one_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            one = len(positions) / one_wall

            tic = time.perf_counter()
            for _ in source.epoch(batches, epoch):
                pass
            first = len(positions) / (time.perf_counter() - tic)
            workers_pids = [p for p in children_of(parent_pids(), os.getpid())]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            w0 = sum(cpu_seconds(p) for p in workers_pids)
            tic = time.perf_counter()
            for _ in source.epoch(batches, epoch + 1):
                pass
            wall = time.perf_counter() - tic
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            main = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            rounds.append(LoaderRound(one, one_cpu, one_wall, first, len(positions) / wall, main, sum(cpu_seconds(p) for p in workers_pids) - w0, wall))
            print(f"loader round {r}: one process {one:.1f} img/s, loader {rounds[-1].loader_ips:.1f} img/s", file=sys.stderr, flush=True)
    finally:
        del source  # ends the persistent workers before the next part measures a process tree
        gc.collect()
        torch.set_num_threads(threads)
    return rounds


def report_loader(rounds: list[LoaderRound], images: int, batch_size: int, workers: int, kb: float, load: float) -> dict:
    ratio = statistics.median(r.ratio for r in rounds)
    print(f"\n## Loader throughput: {images} training images (mean file {kb:.0f} kB), RandomResizedCrop 224 + flip, batch {batch_size}\n")
    print(f"| round | one process: img/s (cores used) | DataLoader, {workers} workers: epoch 0, with the start, img/s | epoch 1: img/s "
          "(cores used by the workers / the main process) | ratio | workers' CPU per image / one process's |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r.one_process_ips:.1f} ({r.one_process_cpu_s / r.one_process_wall_s:.2f}) | {r.loader_epoch0_ips:.1f} "
              f"| {r.loader_ips:.1f} ({r.workers_cpu_s / r.loader_wall_s:.2f} / {r.main_cpu_s / r.loader_wall_s:.2f}) "
              f"| {r.ratio:.2f}x | {r.cpu_per_image_ratio:.2f} |")
    goal = LOADER_GOAL * workers
    print(f"\nMedian ratio {ratio:.2f}x; goal >= {goal:.1f}x ({LOADER_GOAL} x {workers} cores): {'met' if ratio >= goal else 'MISSED'}. "
          f"Load average {load:.2f} on {os.cpu_count()} cores before the part. 'Cores used' is CPU seconds over wall seconds: "
          "on a machine with other users the workers cannot get 2.0, and the main process (taking the batches out of shared "
          "memory) takes its share of the same cores; the last column is the loader's CPU cost per image against the "
          "one-process loop's (1.00: no overhead), whatever the other users took.")
    return {"rounds": [asdict(r) | {"ratio": r.ratio, "cpu_per_image_ratio": r.cpu_per_image_ratio} for r in rounds],
            "median_ratio": ratio, "goal": goal, "loadavg": load}


# ----------------------------------------------------------------------------- part 2: memory at N and 2N


def stage_args(data_root: Path, art: Path, teacher: str, checkpoint: Path, image_size: int) -> list[str]:
    return [
        "--dataset", "imagenet", "--data-root", str(data_root), "--teacher", teacher, "--artifacts", str(art), "--quiet",
        f"dataset.image_size={image_size}", f"teacher.pretrained={checkpoint}", "teacher.finetune=false",
    ]


def memory_bench(args: argparse.Namespace, work: Path, logs: Path) -> list[StageRun]:
    per_class = 2 * args.mem_per_class
    full = ensure_dataset(work / f"mem_2n_{args.mem_classes}x{per_class}", args.mem_classes, per_class, 2 * args.mem_val_per_class)
    half = ensure_halved(full, work / f"mem_n_{args.mem_classes}x{args.mem_per_class}")
    checkpoint = random_teacher(args.mem_teacher, args.mem_classes, args.mem_size, work / f"{args.mem_teacher.replace(':', '_')}_{args.mem_classes}.pt")
    # Fixed Q subsets, and an evaluation batch no larger than the val split at N: a split smaller than one
    # batch makes the batch, so the activations, grow with the split (ImageNet's 50 000 val images fill it).
    fixed = [f"profile.subset_size={args.mem_classes * args.mem_a_per_class}", f"profile.per_class_cap={args.mem_b_per_class}",
             f"train.eval_batch_size={args.mem_eval_batch}", f"teacher_train.eval_batch_size={args.mem_eval_batch}"]
    runs = []
    for label, root, n in (("N", half, args.mem_classes * args.mem_per_class), ("2N", full, args.mem_classes * per_class)):
        art = work / f"art_mem_{label}"
        shutil.rmtree(art, ignore_errors=True)
        common = [sys.executable, STAGE1, *stage_args(root, art, args.mem_teacher, checkpoint, args.mem_size), *fixed]
        runs.append(run_stage([*common, *args.overrides], logs, f"stage1_{label}", n))
        stage2 = [sys.executable, STAGE2, *common[2:], "--student", args.student, "--method", args.method,
                  f"student.width={args.student_width:g}", "train.epochs=1", "train.augment=true",
                  f"train.batch_size={args.batch_size}", *args.overrides]
        runs.append(run_stage(stage2, logs, f"stage2_{label}", n))
    return runs


def report_memory(args: argparse.Namespace, runs: list[StageRun]) -> dict:
    by = {r.name: r for r in runs}
    n_img = by["stage1_N"].images
    in_ram = n_img * 3 * args.mem_size**2 / MIB
    print(f"\n## Memory at N and 2N training images ({args.mem_classes} classes, {args.mem_size} px, teacher {args.mem_teacher} "
          f"as it is; stage 2: {args.method} into {args.student} x{args.student_width:g}, one epoch, train.augment=true)\n")
    print("| process | N | peak RSS, largest process, MiB: N / 2N | growth | PSS of the process tree, MiB: N / 2N | growth | processes | wall s: N / 2N | load average at start: N / 2N |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for stage in ("stage1", "stage2"):
        a, b = by[f"{stage}_N"], by[f"{stage}_2N"]
        g_rss, g_pss = b.peak_rss_mib / a.peak_rss_mib - 1, b.tree_pss_mib / a.tree_pss_mib - 1
        print(f"| {stage} | {a.images} | {a.peak_rss_mib:.0f} / {b.peak_rss_mib:.0f} | {g_rss:+.1%} | {a.tree_pss_mib:.0f} / {b.tree_pss_mib:.0f} "
              f"| {g_pss:+.1%} | {max(a.processes, b.processes)} | {a.wall_s:.0f} / {b.wall_s:.0f} | {a.loadavg:.1f} / {b.loadavg:.1f} |")
        out[stage] = {"N": asdict(a), "2N": asdict(b), "rss_growth": g_rss, "pss_growth": g_pss,
                      "met": abs(g_rss) <= MEMORY_GOAL and abs(g_pss) <= MEMORY_GOAL}
    met = all(v["met"] for v in out.values())
    print(f"\nGoal: within {MEMORY_GOAL:.0%} from N to 2N: {'met' if met else 'MISSED'}. For scale: the N images held in RAM as "
          f"uint8 at {args.mem_size} px would add {in_ram:.0f} MiB from N to 2N ({in_ram / by['stage1_N'].peak_rss_mib:.0%} of stage 1's "
          "peak at N). The Q subsets are the same at N and 2N (profile.subset_size, profile.per_class_cap); ru_maxrss is the "
          "largest single process, the PSS sum (polled every 0.2 s) counts the DataLoader workers too.")
    return out


# ----------------------------------------------------------------------------- part 2b: the file index at scale

INDEX_CODE = """
import resource, sys
from common.config import DatasetConfig
from common.data.registry import load_data
if sys.argv[1] != "-":
    data = load_data(DatasetConfig(name="imagenet", root=sys.argv[1]))
    print(len(data.train.images), len(data.test.images))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def empty_imagenet(root: Path, classes: int, per_class: int) -> Path:
    """ImageNet's layout with empty files (one val file per class): what listing and indexing
    cost, for sizes too large to write real JPEGs of here; load_data opens no image."""
    marker = root / "bench_stream.json"
    params = {"empty": True, "classes": classes, "per_class": per_class}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(classes):
        for which, n in (("train", per_class), ("val", 1)):
            folder = root / which / wnid(c)
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / (f"{wnid(c)}_{i}.JPEG" if which == "train" else f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG")).touch()
    marker.write_text(json.dumps(params))
    return root


def index_bench(args: argparse.Namespace, work: Path, logs: Path) -> dict:
    """Peak RSS of a process that only runs load_data(imagenet), at two index sizes, against one
    that imports the same modules: the listing's and the index's cost per image."""
    counts = (args.index_per_class, 2 * args.index_per_class)
    base = measured([sys.executable, "-c", INDEX_CODE, "-"], logs, "index_imports").peak_rss_mib
    peaks = []
    for per_class in counts:
        root = empty_imagenet(work / f"empty_{args.index_classes}x{per_class}", args.index_classes, per_class)
        print(f"index: load_data on {args.index_classes * per_class} empty files", file=sys.stderr, flush=True)
        peaks.append(measured([sys.executable, "-c", INDEX_CODE, str(root)], logs, f"index_{per_class}").peak_rss_mib)
    n = [args.index_classes * k for k in counts]
    # The slope from n to 2n files, and the mean over the larger listing: the allocator makes the
    # cost per file uneven, so both are given, and the larger one is used for ImageNet.
    slope = (peaks[1] - peaks[0]) * MIB / (n[1] - n[0])
    mean = (peaks[1] - base) * MIB / n[1]
    per_image = max(slope, mean)
    imagenet_mib = per_image * (IMAGENET["n_train"] + IMAGENET["n_val"]) / MIB
    print(f"\n## The file index at scale: load_data(imagenet) alone, {args.index_classes} classes of empty files\n")
    print("| training files | peak RSS, MiB | above the imports alone, MiB |\n|---|---|---|")
    print(f"| 0 (imports only) | {base:.0f} | |")
    for k, peak in zip(n, peaks):
        print(f"| {k} | {peak:.0f} | {peak - base:.0f} |")
    print(f"\nBytes per file at the peak (the listing's Path objects, the labels, the index): {slope:.0f} from {n[0]} to {n[1]} "
          f"files, {mean:.0f} on average over {n[1]}; at the larger, ImageNet's {IMAGENET['n_train'] + IMAGENET['n_val']} files "
          f"add about {imagenet_mib:.0f} MiB to every stage's peak, by arithmetic.")
    return {"imports_mib": base, "files": n, "peak_mib": peaks, "bytes_per_image_slope": slope, "bytes_per_image_mean": mean,
            "imagenet_mib": imagenet_mib}


# ----------------------------------------------------------------------------- part 3: stage 1 on tv:resnet50


@dataclass(frozen=True)
class Plan:
    """What stage 1 does for subsets of a given size (common.quality.stream's plans): the layers
    of each pass over A and of each group of B (one forward per pass, per class and group), and
    the most bytes a pass holds, counted as plan_subset_a counts them (one float64 Gram per layer
    a pass touches, float32 features) or a group of one class of B holds."""

    a_passes: tuple[tuple[int, ...], ...]
    a_max_bytes: int
    b_groups: tuple[tuple[int, ...], ...]
    b_max_bytes: int


def plan_for(dims: dict[int, int], n_a: int, n_b_class: int, budget_bytes: int) -> Plan:
    from common.quality.stream import plan_subset_a, plan_subset_b

    passes = plan_subset_a(dims, n_a, budget_bytes)
    held = [sum(n_a * n_a * 8 + n_a * (s.stop - s.start) * 4 for s in p) for p in passes]
    groups = plan_subset_b(dims, n_b_class, budget_bytes)
    return Plan(
        tuple(tuple(sorted({s.layer for s in p})) for p in passes), max(held),
        tuple(tuple(g) for g in groups), max(n_b_class * sum(dims[i] for i in g) * 4 for g in groups),
    )


@dataclass
class Costs:
    """Per-image costs measured in this process, to count what stage 1's passes cost."""

    decode_s: float  # decode + eval transform (FileImages and its thread pool, as stage 1 reads)
    to_layer_s: dict[int, float]  # the teacher's forward from the input to each layer's output
    flatten_s: dict[int, float]  # flatten_features of each layer (the max-pool of wide maps)
    gemm64_flops: float  # float64 addmm rate (the Grams' kernel), flop/s
    dims: dict[int, int]  # flattened D per layer (METHOD 6.3)
    index_bytes_per_image: float

    def pass_s(self, layers: Sequence[int], n_images: int) -> float:
        """One pass over `n_images` reading `layers`: decode, forward to the deepest, flatten each."""
        return n_images * (self.decode_s + self.to_layer_s[max(layers)] + sum(self.flatten_s[i] for i in layers))


def gram_flops(n: int, dim: int, block: int = 1024) -> float:
    """Flops of accumulate_gram's n x n float64 Gram over `dim` columns: its lower block
    triangle of row blocks of at most `block` (common.quality.formulas._row_blocks)."""
    count = max(1, math.ceil(n / block))
    step = math.ceil(n / count)
    sizes = [min(step, n - i) for i in range(0, n, step)]
    return 2.0 * dim * sum(a * b for i, a in enumerate(sizes) for b in sizes[: i + 1])


def sliced_layers(plan: Plan) -> list[int]:
    """Layers the plan holds in column slices over several passes: their distance re-check
    recomputes the candidate rows by a forward (common.quality.stream._resolve_by_forward)."""
    seen: dict[int, int] = {}
    for layers in plan.a_passes:
        for i in layers:
            seen[i] = seen.get(i, 0) + 1
    return sorted(i for i, k in seen.items() if k > 1)


def subset_seconds(plan: Plan, n_a: int, n_b: int, b_per_class: int, classes: int, costs: Costs) -> dict[str, float]:
    """The work of steps A and B counted at the per-image costs measured in this process:
    forwards (per pass or group), the re-check forwards of sliced layers (2 rows per class, the
    minimum pair, for each; ties add more) and Gram work (A: one n_a x n_a Gram per layer;
    B: one n_k x n_k Gram per class and layer) at the measured float64 rate."""
    total_dim = sum(costs.dims.values())
    rows = min(n_a, 2 * classes)
    return {
        "a_forward_s": sum(costs.pass_s(p, n_a) for p in plan.a_passes),
        "a_recheck_s": sum(costs.pass_s([i], rows) for i in sliced_layers(plan)),
        "a_gram_s": gram_flops(n_a, total_dim) / costs.gemm64_flops,
        "b_forward_s": sum(costs.pass_s(g, n_b) for g in plan.b_groups),
        "b_gram_s": classes * 2.0 * b_per_class**2 * total_dim / costs.gemm64_flops,
    }


def counted(seconds: dict[str, float], step: str) -> float:
    return sum(v for k, v in seconds.items() if k.startswith(f"{step}_"))


def imagenet_arithmetic(measured_a_s: float, measured_b_s: float, here: dict[str, float], there: dict[str, float]) -> dict[str, float]:
    """Steps A and B at ImageNet scale, two ways: the counted work there (a lower bound: this
    process's per-image rates, nothing else), and the measured step scaled by the ratio of the
    counted work there to here (everything stage 1 did beyond the count, the machine's other
    load included, assumed to grow as the counted work does)."""
    out = {}
    for step, t in (("a", measured_a_s), ("b", measured_b_s)):
        out[f"{step}_counted_here_s"] = counted(here, step)
        out[f"{step}_counted_s"] = counted(there, step)
        out[f"{step}_scaled_s"] = t * counted(there, step) / counted(here, step)
    return out


def time_to_layers(model, paths: dict[int, str], x, repeats: int = 2) -> tuple[dict[int, float], dict[int, float]]:
    """Per image: seconds from the input to each generalized layer's output in one forward
    (forward hooks stamp the clock), and of flatten_features on that output; minima over `repeats`."""
    import torch

    from common.quality.formulas import flatten_features

    best: dict[int, float] = {}
    flat: dict[int, float] = {}
    stamps: dict[int, float] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def record(_module, _inputs, output) -> None:
            stamps[i] = time.perf_counter()
            outputs[i] = output

        return record

    for _ in range(repeats):
        stamps.clear()
        handles = [model.get_submodule(path).register_forward_hook(hook(i)) for i, path in paths.items()]
        try:
            with torch.no_grad():
                tic = time.perf_counter()
                model(x)
        finally:
            for h in handles:
                h.remove()
        for i, t in stamps.items():
            best[i] = min(best.get(i, math.inf), (t - tic) / len(x))
            tic_flat = time.perf_counter()
            flatten_features(outputs[i])
            flat[i] = min(flat.get(i, math.inf), (time.perf_counter() - tic_flat) / len(x))
        outputs.clear()
    return best, flat


def gemm64_rate(n: int = 1024, k: int = 8192, repeats: int = 3) -> float:
    """flop/s of a float64 n x k by k x n addmm_ (accumulate_gram's kernel), best of `repeats`."""
    import torch

    a = torch.randn(n, k, dtype=torch.float64)
    c = torch.zeros(n, n, dtype=torch.float64)
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        c.addmm_(a, a.T)
        best = min(best, time.perf_counter() - tic)
    return 2.0 * n * n * k / best


def measure_costs(data_root: Path, teacher: str, classes: int, batch: int) -> Costs:
    import torch

    from common.config import DatasetConfig
    from common.data.registry import load_data
    from common.layers.tables import layer_infos_for
    from common.config import ModelConfig
    from common.models import create_model
    from common.quality.stream import flat_dim

    data = load_data(DatasetConfig(name="imagenet", root=str(data_root), image_size=224))
    files = data.train.images
    files[list(range(batch))]  # warm: the thread pool, the page cache
    tic = time.perf_counter()
    x = files[list(range(batch, 2 * batch))]
    decode = (time.perf_counter() - tic) / batch
    infos = layer_infos_for(ModelConfig(name=teacher), data)
    torch.manual_seed(0)
    model = create_model(teacher, num_classes=classes, in_channels=3, image_size=224).eval()
    to_layer, flatten = time_to_layers(model, {i.index: i.path for i in infos}, data.normalize(x))
    index = files.index
    per_image = index.paths.dtype.itemsize + index.sizes.dtype.itemsize + index.labels.element_size()
    return Costs(decode, to_layer, flatten, gemm64_rate(), {i.index: flat_dim(i.shape) for i in infos}, float(per_image))


def stage1_bench(args: argparse.Namespace, work: Path, logs: Path) -> tuple[StageRun, Costs]:
    root = ensure_dataset(work / f"r50_{args.classes}x{args.b_per_class}", args.classes, args.b_per_class, args.val_per_class)
    checkpoint = random_teacher(args.teacher, args.classes, 224, work / f"{args.teacher.replace(':', '_')}_{args.classes}.pt")
    art = work / "art_r50"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [sys.executable, STAGE1, *stage_args(root, art, args.teacher, checkpoint, 224),
           f"profile.subset_size={args.classes * args.a_per_class}", f"profile.per_class_cap={args.b_per_class}",
           f"profile.memory_budget_mb={args.budget_mb}", *args.overrides]
    run = run_stage(cmd, logs, "stage1_r50", args.classes * args.b_per_class)
    print("measuring decode, forward, flatten and float64 GEMM costs ...", file=sys.stderr, flush=True)
    return run, measure_costs(root, args.teacher, args.classes, batch=16)


def report_stage1(args: argparse.Namespace, run: StageRun, costs: Costs) -> dict:
    steps = {name: (s, rss) for name, s, rss, _ in run.steps}
    if not {"teacher", "quality_subset_a", "quality_subset_b"} <= set(steps):
        raise SystemExit(f"no teacher/quality_subset_a/b step lines in {run.name}'s stderr; stage 1 no longer logs them")
    im = IMAGENET
    budget = args.budget_mb << 20
    n_a, n_b, n_val = (args.classes * k for k in (args.a_per_class, args.b_per_class, args.val_per_class))
    n_a2, n_b2 = im["classes"] * im["a_per_class"], im["classes"] * im["per_class_cap"]
    plan_here = plan_for(costs.dims, n_a, args.b_per_class, budget)
    plan_there = plan_for(costs.dims, n_a2, im["per_class_cap"], budget)
    here = subset_seconds(plan_here, n_a, n_b, args.b_per_class, args.classes, costs)
    there = subset_seconds(plan_there, n_a2, n_b2, im["per_class_cap"], im["classes"], costs)
    (t_teacher, rss_teacher), (t_a, rss_a), (t_b, rss_b) = steps["teacher"], steps["quality_subset_a"], steps["quality_subset_b"]
    last = max(costs.dims)

    print(f"\n## Stage 1 on {args.teacher} at 224 px, {args.classes} classes: |A| = {n_a} ({args.a_per_class} per class), "
          f"|B| = {n_b} ({args.b_per_class} per class), {n_val} val images, profile.memory_budget_mb={args.budget_mb}\n")
    print("| step | seconds | per image | peak RSS so far, MiB | passes over the images (plan) | most bytes held (plan) | work counted here, s |")
    print("|---|---|---|---|---|---|---|")
    val_here = n_val * (costs.decode_s + costs.to_layer_s[last])
    print(f"| teacher: load the checkpoint, top-1 on val | {t_teacher:.1f} | {t_teacher / n_val * 1e3:.0f} ms | {rss_teacher} | 1 | "
          f"| {val_here:.0f} |")
    print(f"| S/I/E/Q statistics 4, 6 on subset A | {t_a:.1f} | {t_a / n_a * 1e3:.0f} ms | {rss_a} | {len(plan_here.a_passes)}, "
          f"re-check of layers {sliced_layers(plan_here)} | {plan_here.a_max_bytes / MIB:.0f} MiB | {counted(here, 'a'):.0f} |")
    print(f"| statistic 7 on subset B, class by class | {t_b:.1f} | {t_b / n_b * 1e3:.0f} ms | {rss_b} | {len(plan_here.b_groups)} "
          f"| {plan_here.b_max_bytes / MIB:.0f} MiB | {counted(here, 'b'):.0f} |")
    print(f"\nWhole process: {run.wall_s:.0f} s (load average {run.loadavg:.1f} at its start), peak RSS {run.peak_rss_mib:.0f} MiB. "
          f"Measured in this process afterwards, per image: decode + eval transform {costs.decode_s * 1e3:.1f} ms (FileImages' "
          f"threads, as stage 1 reads), the teacher's forward to its last layer {costs.to_layer_s[last] * 1e3:.0f} ms (batch 16), "
          f"flatten of all layers {sum(costs.flatten_s.values()) * 1e3:.1f} ms; float64 GEMM {costs.gemm64_flops / 1e9:.1f} GFLOP/s. "
          "'Work counted' is those rates times what the plans do: each pass's forward to its deepest layer, the re-check "
          "forwards of 2 rows per class for each sliced layer, the Grams' flops. Measured over counted: "
          f"{t_a / counted(here, 'a'):.2f}x for A, {t_b / counted(here, 'b'):.2f}x for B (the machine's other load, "
          "batch-size effects, and work the count leaves out).")

    a = imagenet_arithmetic(t_a, t_b, here, there)
    val_counted = im["n_val"] * (costs.decode_s + costs.to_layer_s[last])
    val_scaled = t_teacher * im["n_val"] / n_val
    index_mib = (im["n_train"] + im["n_val"]) * costs.index_bytes_per_image / MIB
    peak = max(rss_teacher, rss_a, rss_b) + (plan_there.a_max_bytes - plan_here.a_max_bytes) / MIB + index_mib
    hours_counted = (val_counted + a["a_counted_s"] + a["b_counted_s"]) / 3600
    hours = (val_scaled + a["a_scaled_s"] + a["b_scaled_s"]) / 3600
    print(f"\n### ImageNet by ARITHMETIC, not a measurement: {im['classes']} classes, |A| = {n_a2} ({im['a_per_class']} per class), "
          f"|B| = {n_b2} ({im['per_class_cap']} per class from a {im['pool_size']}-image pool), {im['n_val']} val images, "
          f"profile.memory_budget_mb={args.budget_mb}, this CPU\n")
    print("Counted: the work stage 1's plans do at that size at this process's per-image rates (a lower bound). Scaled: the "
          "measured step times the ratio of counted work there to here.\n")
    print("| step | passes (plan) | counted: forwards / re-checks / Grams, s | counted, h | scaled from the measurement, h | per image (scaled) |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher top-1 on val | 1 | {val_counted:.0f} / - / - | {val_counted / 3600:.2f} | {val_scaled / 3600:.2f} "
          f"| {val_scaled / im['n_val'] * 1e3:.0f} ms |")
    print(f"| subset A | {len(plan_there.a_passes)}, re-check of {len(sliced_layers(plan_there))} layers | {there['a_forward_s']:.0f} / "
          f"{there['a_recheck_s']:.0f} / {there['a_gram_s']:.0f} | {a['a_counted_s'] / 3600:.2f} | {a['a_scaled_s'] / 3600:.2f} "
          f"| {a['a_scaled_s'] / n_a2 * 1e3:.0f} ms |")
    print(f"| subset B | {len(plan_there.b_groups)} | {there['b_forward_s']:.0f} / - / {there['b_gram_s']:.0f} "
          f"| {a['b_counted_s'] / 3600:.2f} | {a['b_scaled_s'] / 3600:.2f} | {a['b_scaled_s'] / n_b2 * 1e3:.0f} ms |")
    print(f"\nStage 1 on this CPU: about {hours:.1f} h scaled from the measurement, at least {hours_counted:.1f} h counted. "
          f"Peak RSS about {peak:.0f} MiB: the measured peak, plus what A's largest pass holds more at |A| = {n_a2} "
          f"({plan_there.a_max_bytes / MIB:.0f} vs {plan_here.a_max_bytes / MIB:.0f} MiB; the budget bounds it), plus the file "
          f"index of {im['n_train'] + im['n_val']} images ({costs.index_bytes_per_image:.0f} bytes each here: {index_mib:.0f} MiB; "
          f"part 2b measures what listing costs besides). One class of B holds {plan_there.b_max_bytes / MIB:.0f} MiB of "
          f"features at {im['per_class_cap']} per class.")
    by_budget = {mb: len(plan_for(costs.dims, n_a2, im["per_class_cap"], mb << 20).a_passes) for mb in BUDGETS_MB}
    print("\nPasses over A at |A| = " + f"{n_a2} by profile.memory_budget_mb (each a forward of the {n_a2} images to its deepest layer): "
          + ", ".join(f"{mb}: {k}" for mb, k in by_budget.items()) + ".")
    return {"run": asdict(run), "plan_here": asdict(plan_here), "plan_imagenet": asdict(plan_there), "costs": asdict(costs),
            "imagenet_passes_by_budget_mb": by_budget,
            "counted_here": here, "counted_imagenet": there,
            "imagenet_arithmetic": a | {"val_counted_s": val_counted, "val_scaled_s": val_scaled, "hours_counted": hours_counted,
                                        "hours_scaled": hours, "peak_rss_mib": peak, "index_mib": index_mib}}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--data-dir", default=None, help="where the generated datasets live (kept, reused when their parameters match)")
    p.add_argument("--tmp-dir", default=None, help="where to make the temporary directory (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (artifacts, logs)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    # parts 1 and 3: the tv:resnet50 dataset
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--a-per-class", type=int, default=5, help="subset A per class (profile.subset_size = this x classes)")
    p.add_argument("--b-per-class", type=int, default=10, help="training images per class = subset B per class")
    p.add_argument("--val-per-class", type=int, default=5, help="val images per class: 5 x 100 = 500 = one train.eval_batch_size, as at ImageNet's 50 000")
    p.add_argument("--teacher", default="tv:resnet50")
    p.add_argument("--budget-mb", type=int, default=1536, help="profile.memory_budget_mb of part 3 (and of the arithmetic)")
    p.add_argument("--loader-images", type=int, default=1000, help="images per loader epoch (at most the training split)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of the one-process loop and the loader")
    # part 2
    p.add_argument("--mem-classes", type=int, default=20)
    p.add_argument("--mem-per-class", type=int, default=60, help="training images per class at N (2N: twice)")
    p.add_argument("--mem-val-per-class", type=int, default=5, help="val images per class at N")
    p.add_argument("--mem-a-per-class", type=int, default=5)
    p.add_argument("--mem-b-per-class", type=int, default=20)
    p.add_argument("--mem-size", type=int, default=112, help="dataset.image_size of part 2")
    p.add_argument("--mem-eval-batch", type=int, default=50, help="(teacher_)train.eval_batch_size of part 2: at most its val split at N")
    p.add_argument("--mem-teacher", default="tv:resnet18")
    p.add_argument("--index-classes", type=int, default=1000, help="part 2b: classes of empty files")
    p.add_argument("--index-per-class", type=int, default=64, help="part 2b: files per class (then twice that)")
    p.add_argument("--student", default="resnet9")
    p.add_argument("--student-width", type=float, default=0.25)
    p.add_argument("--method", default="ours")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every stage process, last")
    args = p.parse_args()
    if args.b_per_class < args.a_per_class or args.mem_per_class < args.mem_b_per_class:
        p.error("a subset needs that many training images per class: --b-per-class >= --a-per-class, --mem-per-class >= --mem-b-per-class")
    if args.mem_eval_batch > args.mem_classes * args.mem_val_per_class:
        p.error("--mem-eval-batch must be at most the val split at N (--mem-classes x --mem-val-per-class)")

    tmp = Path(tempfile.mkdtemp(prefix="bench_stream_", dir=args.tmp_dir))
    work = Path(args.data_dir) if args.data_dir else tmp
    work.mkdir(parents=True, exist_ok=True)
    (tmp / "logs").mkdir()
    out: dict = {"args": vars(args), "loadavg_start": os.getloadavg()}
    failed = True
    try:
        if "loader" in args.parts:
            root = ensure_dataset(work / f"r50_{args.classes}x{args.b_per_class}", args.classes, args.b_per_class, args.val_per_class)
            n = min(args.loader_images, args.classes * args.b_per_class)
            load = os.getloadavg()[0]
            rounds = loader_bench(root, n, args.batch_size, args.workers, args.repeats)
            out["loader"] = report_loader(rounds, n, args.batch_size, args.workers, mean_file_kb(root), load)
        if "memory" in args.parts:
            out["memory"] = report_memory(args, memory_bench(args, work, tmp / "logs"))
        if "index" in args.parts:
            out["index"] = index_bench(args, work, tmp / "logs")
        if "stage1" in args.parts:
            out["stage1"] = report_stage1(args, *stage1_bench(args, work, tmp / "logs"))
        failed = False
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        leave_tmp(tmp, args.keep, failed)


if __name__ == "__main__":
    main()
