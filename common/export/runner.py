"""Students you can ship: every finished student run as ONNX and TorchScript, checked and timed.

For each finished run (a `done` file; found by `common.artifacts.discovery.find_runs`, the discovery stage 3
uses) the student is rebuilt from the run's config.yaml and the "best" weights of student.pt,
and three files are written into the run directory, each atomically, export.yaml last:

    <artifacts>/<dataset>/<teacher>__<student>/<method>-<hash8>/seed<k>/
        student.onnx             the plain student, images -> logits, batch axis dynamic, opset 18
        student.torchscript.pt   the same, traced (torch.jit.trace)
        export.yaml              the record: see `export_run`

Both files are loaded back before they replace an old one and must give PyTorch's logits on real
test images of the run's dataset, normalised as in training (`Data.normalize`), within
`TOLERANCE`; the max abs difference is recorded. The input is the normalised image
((pixels / 255 - mean) / std, both recorded in export.yaml and in the ONNX metadata), not uint8
pixels. A run whose export.yaml names the sha256 of its current student.pt is skipped; a new
student.pt (the run was redone) is exported again. Only the run's own directory is written,
under its own `.export.lock`, so parallel exports never clobber each other.

Homes: this module picks the runs, rebuilds each student, times it and writes export.yaml;
`common.export.files` writes and checks the ONNX and TorchScript files (opset 18),
`common.export.record` names the files and reads export.yaml back, `common.export.latency` measures
parameters, MACs and latency, and `common.report.exports` builds stage 3's table from the records.

    python -m common.export --artifacts artifacts [--dataset D ...] [--pairs t:s ...] [--methods m ...]
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import yaml

from common import cli
from common.artifacts import layout as artifacts
from common.config import DatasetConfig, ModelConfig, from_dict
from common.artifacts.discovery import PAIRS_HELP, find_runs
from common.errors import ConfigError, DataError, UserError
from common.export.files import INPUT_NAME, OPSET, OUTPUT_NAME, write_onnx, write_torchscript
from common.export.record import FORMAT, ONNX_FILE, RECORD_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, is_up_to_date, read_record
from common.report.exports import export_markdown, export_summary, export_table
from common.files import atomic_write_yaml, file_lock, sha256_file
from common.runtime import versions

if TYPE_CHECKING:  # torch, onnx and the data module load only when a run is exported
    import torch
    from torch import nn

    from common.data.registry import Data

log = logging.getLogger("kd")

BATCH_SIZES = (1, 64)  # latency is measured at these batch sizes
TOLERANCE = 1e-3  # max abs logit difference allowed, relative to max(1, max |logit|)
MACS_NOTE = (
    "FLOPs / 2 of torch.utils.flop_counter.FlopCounterMode at batch 1: convolutions, linear layers and "
    "matrix products (attention's QK^T and AV included); normalisation, activations, pooling and additions not counted"
)


@dataclass(frozen=True)
class ExportSettings:
    threads: int | None = None  # intra-op threads of PyTorch and ONNX Runtime; None: every core this process may use
    warmup: int = 3  # untimed calls before the timed ones
    repeats: int = 20  # timed calls; the median is reported
    check_images: int = 1000  # test images the exported files are compared on (all when fewer)
    data_root: str | None = None  # replaces dataset.root of the runs' config.yaml (it is not part of the run key)
    force: bool = False  # export again even when export.yaml is up to date


@dataclass
class ExportResult:
    dir: Path
    skipped: bool
    record: dict[str, Any]


# ----------------------------------------------------------------------------- one run


def run_settings(run_dir: Path) -> tuple[DatasetConfig, ModelConfig]:
    """The dataset and student sections of a run's resolved config.yaml."""
    path = Path(run_dir) / artifacts.CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
        return from_dict(DatasetConfig, raw["dataset"], "dataset"), from_dict(ModelConfig, raw["student"], "student")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ConfigError) as exc:
        raise DataError(f"run {run_dir}: config.yaml is missing or unreadable ({exc}); rerun stage 2 for this run") from None


def export_run(run_dir: Path, settings: ExportSettings = ExportSettings(), load: Callable[[DatasetConfig], "Data"] | None = None) -> ExportResult:
    """Export one finished run (see the module docstring); skipped when up to date.

    `load` turns the run's dataset section into a `Data` (default `common.data.registry.load_data`;
    `export_all` passes one that keeps the last dataset). export.yaml holds: format; source
    (student.pt's sha256, the weights used: "best", best_epoch); student (name, width, classes,
    channels, image size); input (name, shape, normalisation mean / std) and output; params
    (weights and biases, not buffers); macs_per_image and how they are counted; onnx and
    torchscript (file, bytes, max_abs_diff and top1_agreement against PyTorch on `images`
    test images, tolerance); latency (cpu, threads, warmup, repeats, ms per call at batch 1 and
    64 for onnxruntime and pytorch: median, q1, q3); versions.
    """
    run_dir = Path(run_dir)
    if not (run_dir / artifacts.DONE).is_file():
        raise DataError(f"run {run_dir} is not finished (no `done` file); finish it with stage 2 first")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise DataError(f"run {run_dir} is not writable; the exported files go into the run directory, so make it writable")
    with file_lock(run_dir / ".export.lock"):  # a second exporter waits, then finds the run up to date
        sha = sha256_file(run_dir / WEIGHTS_FILE) if (run_dir / WEIGHTS_FILE).is_file() else None
        if sha is None:
            raise DataError(f"run {run_dir}: {WEIGHTS_FILE} not found although the run is marked done; rerun stage 2 for this run")
        if not settings.force and is_up_to_date(run_dir, sha):
            log.info("export %s: up to date, skipping", run_dir)
            return ExportResult(run_dir, True, read_record(run_dir) or {})
        dataset_cfg, student_cfg = run_settings(run_dir)
        if settings.data_root is not None:
            dataset_cfg = dataclasses.replace(dataset_cfg, root=settings.data_root)
        if load is None:
            from common.data.registry import load_data as load
        try:
            data = load(dataset_cfg)
        except UserError as exc:
            raise type(exc)(f"run {run_dir}: {exc}") from None
        record = _export(run_dir, sha, student_cfg, data, settings)
        atomic_write_yaml(run_dir / RECORD_FILE, record)
    lat = record["latency"]
    log.info(
        "export %s: %s params, %.1f MMACs; max |diff| ONNX %.1e, TorchScript %.1e; batch 1: ORT %.2f ms, PyTorch %.2f ms (%d threads)",
        run_dir, f"{record['params']:,}", record["macs_per_image"] / 1e6, record["onnx"]["max_abs_diff"],
        record["torchscript"]["max_abs_diff"], lat["batch1"]["onnxruntime"]["median"], lat["batch1"]["pytorch"]["median"], lat["threads"],
    )
    return ExportResult(run_dir, False, record)


def _export(run_dir: Path, sha: str, student_cfg: ModelConfig, data: "Data", settings: ExportSettings) -> dict[str, Any]:
    import torch

    from common.export import latency

    threads = settings.threads or latency.available_cores()
    model, best_epoch = _load_student(run_dir, student_cfg, data)
    n_check = min(settings.check_images, len(data.test))
    images = data.normalize(data.test.images[:n_check])
    with latency.torch_threads(threads), torch.inference_mode():
        reference = torch.cat([model(chunk) for chunk in images.split(256)])
    tolerance = TOLERANCE * max(1.0, float(reference.abs().max()))
    what = f"run {run_dir}: student {student_cfg.name}"
    example = images[:2] if len(images) >= 2 else images.expand(2, -1, -1, -1)  # batch 1 would fix the batch axis
    metadata = {"dataset": data.name, "input": "(pixels / 255 - mean) / std per channel",
                "input_mean": json.dumps(_floats(data.mean)), "input_std": json.dumps(_floats(data.std))}
    onnx_check = write_onnx(model, example, run_dir / ONNX_FILE, images, reference, tolerance, threads, what, metadata)
    ts_check = write_torchscript(model, example, run_dir / TORCHSCRIPT_FILE, images, reference, tolerance, what)

    session = latency.onnxruntime_session(run_dir / ONNX_FILE, threads)
    timings: dict[str, dict[str, Any]] = {}
    for batch in BATCH_SIZES:
        x = _batch_of(data.normalize(data.test.images[:batch]), batch)
        timings[f"batch{batch}"] = {
            "onnxruntime": latency.onnxruntime_latency(session, x.numpy(), settings.warmup, settings.repeats).as_dict(),
            "pytorch": latency.torch_latency(model, x, threads, settings.warmup, settings.repeats).as_dict(),
        }
    shape = [data.in_channels, data.image_size, data.image_size]
    return {
        "format": FORMAT,
        "source": {"file": WEIGHTS_FILE, "sha256": sha, "bytes": (run_dir / WEIGHTS_FILE).stat().st_size, "weights": "best", "best_epoch": best_epoch},
        "student": {"name": student_cfg.name, "width": student_cfg.width, "num_classes": data.num_classes,
                    "in_channels": data.in_channels, "image_size": data.image_size},
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32",
                  "normalisation": "(pixels / 255 - mean) / std per channel", "mean": _floats(data.mean), "std": _floats(data.std)},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", data.num_classes]},
        "params": latency.count_params(model),
        "macs_per_image": latency.count_macs(model, example),
        "macs_counted": MACS_NOTE,
        "onnx": {"file": ONNX_FILE, "bytes": (run_dir / ONNX_FILE).stat().st_size, "opset": OPSET,
                 "exporter": "torch.onnx.export(dynamo=True)", **onnx_check},
        "torchscript": {"file": TORCHSCRIPT_FILE, "bytes": (run_dir / TORCHSCRIPT_FILE).stat().st_size, "method": "torch.jit.trace", **ts_check},
        "latency": {"cpu": latency.cpu_model(), "threads": threads, "warmup": settings.warmup, "repeats": settings.repeats,
                    "unit": "ms per call (one batch)", **timings},
        "versions": _versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _load_student(run_dir: Path, student_cfg: ModelConfig, data: "Data") -> tuple["nn.Module", int | None]:
    """The plain student (as stage 2 builds it for this dataset) with the "best" weights, in eval mode."""
    import torch

    from common.models import create_model

    try:
        model = create_model(student_cfg.name, num_classes=data.num_classes, in_channels=data.in_channels,
                             image_size=data.image_size, width=student_cfg.width)
    except UserError as exc:
        raise type(exc)(f"run {run_dir}: {exc}") from None
    try:
        saved = torch.load(run_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["best"])
    except Exception as exc:  # unreadable file, or weights of another model / dataset shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"run {run_dir}: the best weights in {WEIGHTS_FILE} do not load into {student_cfg.name} "
                        f"(width {student_cfg.width}) for {data.name} ({first}); rerun stage 2 for this run") from None
    best_epoch = saved.get("best_epoch")
    return model.eval(), int(best_epoch) if best_epoch is not None else None


def _batch_of(images: "torch.Tensor", batch: int) -> "torch.Tensor":
    """`batch` images: the first ones, repeated when the test split is smaller."""
    reps = -(-batch // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch].contiguous()


def _floats(t: "torch.Tensor") -> list[float]:
    return [float(v) for v in t.flatten().tolist()]


def _versions() -> dict[str, str]:
    """`runtime.versions()` (what every run directory records) plus the exporter's packages."""
    import onnx
    import onnxruntime
    import onnxscript

    return {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}


# ----------------------------------------------------------------------------- many runs


def export_all(
    artifacts: Path,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    settings: ExportSettings = ExportSettings(),
) -> list[ExportResult]:
    """`export_run` for every finished run that `common.artifacts.discovery.find_runs` lists under the filters
    (pairs as `common.artifacts.discovery.pair_dir_name` reads them, methods a name or 'name-hash8');
    unfinished runs are left alone."""
    artifacts = Path(artifacts)
    if not artifacts.is_dir():
        raise DataError(f"artifacts directory {artifacts} not found; pass the directory stage 2 wrote to (--artifacts DIR)")
    runs = find_runs(artifacts, datasets=datasets, pairs=pairs, methods=methods)
    finished = runs[runs["status"] == "finished"]
    if finished.empty:
        everything = find_runs(artifacts)
        if everything.empty:
            raise DataError(f"no student runs under {artifacts} (expected <dataset>/<teacher>__<student>/<method>-<hash>/seed<k>); run stage 2 first")
        done = everything[everything["status"] == "finished"]
        if done.empty:
            raise DataError(f"no finished student runs under {artifacts}; finish some with stage 2 first")
        raise DataError(
            f"no finished runs match the filters; finished datasets: {', '.join(sorted(done['dataset'].unique()))}; "
            f"pairs: {', '.join(sorted(p.replace('__', ':') for p in done['pair'].unique()))}; methods: {', '.join(sorted(done['method'].unique()))}"
        )
    if len(finished) < len(runs):
        log.info("export: %d unfinished run(s) left alone (stage 3's unfinished table lists them)", len(runs) - len(finished))
    cached: dict[str, Data] = {}

    def load(cfg: DatasetConfig) -> "Data":
        from common.data.registry import load_data

        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in cached:
            cached.clear()  # one dataset in memory at a time; runs come sorted by dataset
            cached[key] = load_data(cfg)
        return cached[key]

    return [export_run(Path(path), settings, load) for path in finished["path"]]


# ----------------------------------------------------------------------------- command line

_DESCRIPTION = """Export every finished student run as ONNX (opset 18) and TorchScript with its head, check both
against PyTorch on test images, and time them on this CPU. Writes student.onnx, student.torchscript.pt and
export.yaml into each run directory; runs already exported from the same student.pt are skipped.

Examples:
  python -m common.export --artifacts artifacts
  python -m common.export --dataset cifar10 --pairs resnet34:resnet9 --methods ce ours --threads 4
"""


def body(argv: list[str] | None = None) -> int:
    p = cli.Parser(_DESCRIPTION)
    p.prog = "python -m common.export"
    p.add_argument("--artifacts", default="artifacts", help="artifacts directory to scan (default: artifacts)")
    p.add_argument("--dataset", nargs="*", default=None, help="only these datasets")
    p.add_argument("--pairs", nargs="*", default=None, help=PAIRS_HELP)
    p.add_argument("--methods", nargs="*", default=None, help="only these methods (or method-hash8 variants)")
    p.add_argument("--data-root", default=None, help="dataset directory, when it moved since training (replaces dataset.root)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (default: every core this process may use)")
    p.add_argument("--repeats", type=int, default=ExportSettings.repeats, help=f"timed calls per latency; the median is reported (default {ExportSettings.repeats})")
    p.add_argument("--warmup", type=int, default=ExportSettings.warmup, help=f"untimed calls before them (default {ExportSettings.warmup})")
    p.add_argument("--check-images", type=int, default=ExportSettings.check_images, help=f"test images the exports are checked on (default {ExportSettings.check_images})")
    p.add_argument("--force", action="store_true", help="export again even when export.yaml is up to date")
    args = p.parse_intermixed_args(argv)
    for flag, value, low in [("--threads", args.threads, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--check-images", args.check_images, 1)]:
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value} must be at least {low}")
    artifacts = Path(args.artifacts)
    if artifacts.exists() and not artifacts.is_dir():
        raise ConfigError(f"--artifacts {artifacts} is a file; pass the directory stage 2 wrote to")
    settings = ExportSettings(threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                              check_images=args.check_images, data_root=args.data_root, force=args.force)
    results = export_all(artifacts, datasets=args.dataset, pairs=args.pairs, methods=args.methods, settings=settings)
    runs = find_runs(artifacts, datasets=args.dataset, pairs=args.pairs, methods=args.methods)
    print("\n" + export_markdown(export_summary(export_table(runs))))
    fresh = sum(not r.skipped for r in results)
    print(f"{fresh} run(s) exported, {len(results) - fresh} up to date (student.onnx, student.torchscript.pt, export.yaml in each run directory)")
    return 0
