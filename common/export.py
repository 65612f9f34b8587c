"""Students you can ship: every finished student run as ONNX and TorchScript, checked and timed.

For each finished run (a `done` file; found by `common.discovery.find_runs`, the discovery stage 3
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

Opset 18: what torch.onnx's exporter (torch.export + onnxscript) emits without a version
conversion, and what ONNX Runtime has run since 1.14 (including its mobile builds).

`export_table` / `export_summary` / `export_markdown` build stage 3's table of parameters, MACs,
file size and CPU latency from the export.yaml files; they import neither torch nor ONNX.

    python -m common.export --artifacts artifacts [--dataset D ...] [--pairs t:s ...] [--methods m ...]
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pandas as pd
import yaml

from common import cli
from common.config import DatasetConfig, ModelConfig, from_dict
from common.discovery import PAIRS_HELP, find_runs
from common.errors import ConfigError, DataError, ExportError, UserError
from common.io import atomic_write, atomic_write_text, atomic_write_yaml, code_version, file_lock, sha256_file
from common.report_stats import method_rank
from common.table_format import markdown_table, method_label, number_cell, pair_label

if TYPE_CHECKING:  # torch, onnx and the data module load only when a run is exported
    import torch
    from torch import nn

    from common.data import Data

log = logging.getLogger("kd")

FORMAT = 1  # of export.yaml; a run exported with another format is exported again
OPSET = 18
BATCH_SIZES = (1, 64)  # latency is measured at these batch sizes
TOLERANCE = 1e-3  # max abs logit difference allowed, relative to max(1, max |logit|)
ONNX_FILE, TORCHSCRIPT_FILE, RECORD_FILE, WEIGHTS_FILE = "student.onnx", "student.torchscript.pt", "export.yaml", "student.pt"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
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
    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        return from_dict(DatasetConfig, raw["dataset"], "dataset"), from_dict(ModelConfig, raw["student"], "student")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ConfigError) as exc:
        raise DataError(f"run {run_dir}: config.yaml is missing or unreadable ({exc}); rerun stage 2 for this run") from None


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


def export_run(run_dir: Path, settings: ExportSettings = ExportSettings(), load: Callable[[DatasetConfig], "Data"] | None = None) -> ExportResult:
    """Export one finished run (see the module docstring); skipped when up to date.

    `load` turns the run's dataset section into a `Data` (default `common.data.load_data`;
    `export_all` passes one that keeps the last dataset). export.yaml holds: format; source
    (student.pt's sha256, the weights used: "best", best_epoch); student (name, width, classes,
    channels, image size); input (name, shape, normalisation mean / std) and output; params
    (weights and biases, not buffers); macs_per_image and how they are counted; onnx and
    torchscript (file, bytes, max_abs_diff and top1_agreement against PyTorch on `images`
    test images, tolerance); latency (cpu, threads, warmup, repeats, ms per call at batch 1 and
    64 for onnxruntime and pytorch: median, q1, q3); versions.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "done").is_file():
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
            from common.data import load_data as load
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

    from common import latency

    threads = settings.threads or latency.available_cores()
    model, best_epoch = _load_student(run_dir, student_cfg, data)
    n_check = min(settings.check_images, len(data.test))
    images = data.normalize(data.test.images[:n_check])
    with latency.torch_threads(threads), torch.inference_mode():
        reference = torch.cat([model(chunk) for chunk in images.split(256)])
    tolerance = TOLERANCE * max(1.0, float(reference.abs().max()))
    what = f"run {run_dir}: student {student_cfg.name}"
    example = images[:2] if len(images) >= 2 else images.expand(2, -1, -1, -1)  # batch 1 would fix the batch axis
    onnx_check = _write_onnx(model, example, run_dir / ONNX_FILE, images, reference, tolerance, threads, what, data)
    ts_check = _write_torchscript(model, example, run_dir / TORCHSCRIPT_FILE, images, reference, tolerance, what)

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


def _write_onnx(model: "nn.Module", example: "torch.Tensor", path: Path, images: "torch.Tensor", reference: "torch.Tensor",
                tolerance: float, threads: int, what: str, data: "Data") -> dict[str, Any]:
    import onnx
    import torch

    from common import latency

    def convert(module: "nn.Module", args: tuple, kwargs: dict, dynamic: bool):
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")  # exporter notes on every call, none about the result
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            return torch.onnx.export(module, args, None, kwargs=kwargs or None, dynamo=True, opset_version=OPSET,
                                     input_names=[INPUT_NAME] if dynamic else None, output_names=[OUTPUT_NAME] if dynamic else None,
                                     dynamic_shapes=shapes, external_data=False, verbose=False)

    try:
        program = convert(model, (example,), {}, True)
    except Exception as exc:
        log.info("%s does not export to ONNX; converting its parts one by one to find the one that fails", what)
        part = _failing_part(model, example, lambda m, a, k: convert(m, a, k, False))
        raise ExportError(f"{what} does not export to ONNX (opset {OPSET}): {part} fails: {_root_cause(exc)}; "
                          f"rewrite that part with exportable ops, or leave this run out with --pairs / --methods") from None
    proto = program.model_proto
    for key, value in {"dataset": data.name, "input": "(pixels / 255 - mean) / std per channel",
                       "input_mean": json.dumps(_floats(data.mean)), "input_std": json.dumps(_floats(data.std))}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    check: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        session = latency.onnxruntime_session(tmp, threads)
        outputs = torch.cat([torch.from_numpy(session.run(None, {INPUT_NAME: chunk.numpy()})[0]) for chunk in images.split(256)])
        check.update(_agreement(outputs, reference, tolerance, f"{what}: ONNX Runtime"))

    atomic_write(path, write)
    return check


def _write_torchscript(model: "nn.Module", example: "torch.Tensor", path: Path, images: "torch.Tensor",
                       reference: "torch.Tensor", tolerance: float, what: str) -> dict[str, Any]:
    import torch

    def trace(module: "nn.Module", args: tuple, kwargs: dict):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int notes; the file is checked below
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated since torch 2.14; LibTorch still loads it
            # check_trace=False: its re-trace compares graphs by mangled class names and fails on equal graphs.
            return torch.jit.trace(module, args, example_kwarg_inputs=kwargs or None, check_trace=False)

    try:
        traced = trace(model, (example,), {})
    except Exception as exc:
        log.info("%s does not trace; tracing its parts one by one to find the one that fails", what)
        part = _failing_part(model, example, trace)
        raise ExportError(f"{what} does not trace to TorchScript: {part} fails: {_root_cause(exc)}; "
                          f"rewrite that part, or leave this run out with --pairs / --methods") from None
    check: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # as in trace() above
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        with torch.inference_mode():
            outputs = torch.cat([loaded(chunk) for chunk in images.split(256)])
        check.update(_agreement(outputs, reference, tolerance, f"{what}: TorchScript"))

    atomic_write(path, write)
    return check


def _agreement(outputs: "torch.Tensor", reference: "torch.Tensor", tolerance: float, what: str) -> dict[str, Any]:
    """Max abs logit difference and top-1 agreement; an ExportError beyond `tolerance`."""
    diff = float((outputs.float() - reference).abs().max())
    agree = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(f"{what} logits differ from PyTorch's by {diff:.3g} on {len(reference)} test images "
                          f"(tolerance {tolerance:.3g}); the file was not written (an earlier one is kept)")
    return {"images": len(reference), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": tolerance}


def _failing_part(model: "nn.Module", example: "torch.Tensor", convert: Callable[["nn.Module", tuple, dict], Any]) -> str:
    """The smallest submodule that does not convert on its own, found from the root down: the
    children that ran in one forward are converted with the inputs they got, in registration
    order (the call order of the registry's sequential models), and the search descends into
    the first that fails; a part none of whose children fail holds the op in its own forward.
    Runs only after a failed export, so its extra conversions cost nothing on success."""
    import torch

    inputs: dict[str, tuple[tuple, dict]] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            if name not in inputs:
                clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                inputs[name] = (tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()})
        return hook

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        return f"the forward itself ({_root_cause(exc)})"
    finally:
        for h in hooks:
            h.remove()
    path, module = "", model
    while True:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if full not in inputs:
                continue
            try:
                convert(child, *inputs[full])
            except Exception:
                path, module = full, child
                break
        else:
            break
    return f"part '{path}' ({type(module).__name__})" if path else f"the model's own forward ({type(model).__name__})"


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error: the exporters wrap the op's own message twice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter logs each step at INFO and its optimiser's skipped folds as warnings; `cli.main`
    shows INFO, so these loggers are raised to ERROR for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _batch_of(images: "torch.Tensor", batch: int) -> "torch.Tensor":
    """`batch` images: the first ones, repeated when the test split is smaller."""
    reps = -(-batch // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch].contiguous()


def _floats(t: "torch.Tensor") -> list[float]:
    return [float(v) for v in t.flatten().tolist()]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {"code": code_version(), "torch": str(torch.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}


# ----------------------------------------------------------------------------- many runs


def export_all(
    artifacts: Path,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    settings: ExportSettings = ExportSettings(),
) -> list[ExportResult]:
    """`export_run` for every finished run that `common.discovery.find_runs` lists under the filters
    (pairs as `common.discovery.pair_dir_name` reads them, methods a name or 'name-hash8');
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
        from common.data import load_data

        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in cached:
            cached.clear()  # one dataset in memory at a time; runs come sorted by dataset
            cached[key] = load_data(cfg)
        return cached[key]

    return [export_run(Path(path), settings, load) for path in finished["path"]]


# ----------------------------------------------------------------------------- stage 3 table

_RUN_TABLE_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "seed", "export", "params", "macs",
    "onnx_bytes", "torchscript_bytes", "ort_b1_ms", "torch_b1_ms", "ort_b64_ms", "torch_b64_ms",
    "onnx_max_diff", "torchscript_max_diff", "threads", "cpu", "path",
]
_SUMMARY_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_exported", "n_runs", "params", "macs",
    "onnx_bytes", "torchscript_bytes", "ort_b1_ms", "torch_b1_ms", "ort_b64_ms", "torch_b64_ms",
    "onnx_max_diff", "torchscript_max_diff", "machines",
]
_LATENCY_COLUMNS = {"ort_b1_ms": ("batch1", "onnxruntime"), "torch_b1_ms": ("batch1", "pytorch"),
                    "ort_b64_ms": ("batch64", "onnxruntime"), "torch_b64_ms": ("batch64", "pytorch")}


def export_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run of `runs` (from `common.discovery.find_runs`): export is 'exported'
    (export.yaml up to date), 'stale' (student.pt changed since) or 'missing'; the numbers of its
    export.yaml (NaN unless exported), latencies as medians in ms per batch."""
    rows = []
    for _, run in runs[runs["status"] == "finished"].iterrows():
        path = Path(run["path"])
        record = read_record(path)
        state = "missing" if record is None else ("exported" if is_up_to_date(path) else "stale")
        row: dict[str, Any] = {c: run[c] for c in ["dataset", "pair", "teacher", "student", "method", "variant", "seed"]}
        row.update(export=state, path=str(path))
        if state == "exported":
            lat = record["latency"]
            row.update(params=record["params"], macs=record["macs_per_image"], onnx_bytes=record["onnx"]["bytes"],
                       torchscript_bytes=record["torchscript"]["bytes"], onnx_max_diff=record["onnx"]["max_abs_diff"],
                       torchscript_max_diff=record["torchscript"]["max_abs_diff"], threads=lat["threads"], cpu=lat["cpu"])
            for column, (batch, runtime) in _LATENCY_COLUMNS.items():
                row[column] = lat[batch][runtime]["median"]
        rows.append(row)
    return pd.DataFrame(rows, columns=_RUN_TABLE_COLUMNS)


def export_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x pair x method-variant over its exported runs: params, MACs and file
    sizes of the first (seeds share the architecture), latencies as the median over the runs,
    max diffs as the max over them; n_runs counts the finished runs, exported or not; machines
    lists the 'cpu, N threads' the latencies were measured with."""
    rows = []
    for key, group in table.groupby(["dataset", "pair", "method", "variant"], sort=True):
        done = group[group["export"] == "exported"]
        row: dict[str, Any] = dict(zip(["dataset", "pair", "method", "variant"], key), teacher=group["teacher"].iloc[0],
                                   student=group["student"].iloc[0], n_exported=len(done), n_runs=len(group))
        first = done.iloc[0] if len(done) else None
        for column in ["params", "macs", "onnx_bytes", "torchscript_bytes"]:
            row[column] = first[column] if first is not None else math.nan
        for column in _LATENCY_COLUMNS:
            row[column] = float(done[column].median()) if len(done) else math.nan
        for column in ["onnx_max_diff", "torchscript_max_diff"]:
            row[column] = float(done[column].max()) if len(done) else math.nan
        row["machines"] = "; ".join(sorted({f"{r['cpu']}, {int(r['threads'])} threads" for _, r in done.iterrows()}))
        rows.append(row)
    out = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    out["_rank"] = out["method"].map(lambda m: method_rank(m, "ours"))
    return out.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)[_SUMMARY_COLUMNS]


def export_markdown(summary: pd.DataFrame, accuracy: pd.DataFrame | None = None) -> str:
    """The export table as Markdown; with `accuracy` (stage 3's accuracy table) the best-epoch
    mean accuracy sits next to the costs. A note under it names the machines and the rules."""
    acc: dict[tuple, float] = {}
    if accuracy is not None and not accuracy.empty:
        acc = {(r["dataset"], r["pair"], r["method"], r["variant"]): r["best_mean"] for _, r in accuracy.iterrows()}
    headers = ["dataset", "pair", "method", "n"] + (["best (%)"] if acc else []) + [
        "params (M)", "MMACs", "ONNX (MB)", "ORT b1 (ms)", "PyTorch b1 (ms)", "ORT b64 (ms)", "PyTorch b64 (ms)", "max diff ONNX", "max diff TS"]
    rows = []
    for _, r in summary.iterrows():
        n = str(r["n_exported"]) if r["n_exported"] == r["n_runs"] else f"{r['n_exported']}/{r['n_runs']}"
        cells = [r["dataset"], pair_label(r["pair"]), method_label(r, summary), n]
        if acc:
            cells.append(number_cell(acc.get((r["dataset"], r["pair"], r["method"], r["variant"]))))
        cells += [number_cell(r["params"] / 1e6, "{:.3f}"), number_cell(r["macs"] / 1e6, "{:.1f}"),
                  number_cell(r["onnx_bytes"] / 1e6, "{:.2f}")]
        cells += [number_cell(r[c], "{:.2f}") for c in _LATENCY_COLUMNS]
        cells += [number_cell(r["onnx_max_diff"], "{:.1e}"), number_cell(r["torchscript_max_diff"], "{:.1e}")]
        rows.append(cells)
    machines = sorted({m for ms in summary["machines"].dropna() for m in str(ms).split("; ") if m})
    note = (
        f"\nCPU latency in ms per batch (median over the runs of each run's median of timed calls after warm-up), "
        f"PyTorch eager vs ONNX Runtime with the same threads; measured on: {' | '.join(machines) or 'nothing exported yet'}. "
        f"MACs per image = FLOPs / 2 of FlopCounterMode (convolutions, linear layers, matrix products). "
        f"MB = 10^6 bytes. max diff: largest |logit - PyTorch's logit| on the test images. "
        f"n: exported runs (of finished ones); export the rest with `make export`.\n"
    )
    return markdown_table(headers, rows) + note


def write_export_tables(runs: pd.DataFrame, out_dir: Path, accuracy: pd.DataFrame | None = None) -> tuple[str, dict[str, Path]]:
    """Stage 3's export table: export.csv (per pair and method), export_runs.csv (per run) and
    export.md under `out_dir`. Returns (markdown, {name: path}); ("", {}) when no run of `runs`
    has an export.yaml, so a report without `make export` shows no empty table."""
    table = export_table(runs)
    if not (table["export"] != "missing").any():
        return "", {}
    summary = export_summary(table)
    text = export_markdown(summary, accuracy)
    out_dir = Path(out_dir)
    files = {name: out_dir / name for name in ("export.csv", "export_runs.csv", "export.md")}
    atomic_write(files["export.csv"], lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write(files["export_runs.csv"], lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(files["export.md"], text)
    return text, files


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


if __name__ == "__main__":
    cli.main(body)
