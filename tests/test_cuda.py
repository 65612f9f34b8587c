"""The checks `make gpu-check` runs on a GPU (marker `cuda`), each on the CPU everywhere and also
on CUDA where torch sees one (issue 19 item 5).

Every test is parametrized over DEVICES: "cpu", plus "cuda" only when `torch.cuda.is_available()`,
so without a GPU the CUDA cases are not generated (never skipped), and the CPU cases run as any
other test. What each checks on a device:

- every stage puts its work there: stage 1's teacher training, S/I/E/Q and feature extraction
  (`teacher_train.device`, `profile.device`), stage 2's student and the cached teacher features
  it receives (`train.device`); stage 3 imports no torch (tests/test_layout.py) and has no device;
- the loss formulas under bfloat16 autocast against float32, within bfloat16 noise;
- the streaming S/I/E/Q on the device equal to `layer_stats` on the CPU to 1e-5 relative, and
  the bytes it allocates there within `profile.memory_budget_mb` (counted by a dispatch mode;
  on CUDA the allocator's own peak too);
- the cached teacher features on the device in every input path, equal to the CPU's gather;
- feature extraction through pinned buffers giving the bytes of a plain copy;
- a 2-epoch `ce` and `ours` run whose accuracy is within seed noise of the CPU's (on the CPU:
  the same numbers);
- `KD_DETERMINISTIC=1` repeating bit for bit (two processes);
- an interrupted run resuming to the uninterrupted run's metrics;
- a streamed dataset (ImageNet's layout, 2 loader workers, pinned memory) reaching the step there.

The runs use learnable CIFAR-shaped data (bench/bench_profile_scale.py's generator: a blocky
picture per class plus noise, 10 classes): on tests/fakedata.py's random pixels every run sits at
chance, where two accuracies cannot tell a broken device path from a working one.
"""
from __future__ import annotations

import inspect
import shutil
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common.train.loop as train_loop
from bench.bench_profile_scale import write_cifar100
from common import distill
from common.cache.reader import CHECKSUM, POSITIONS, FeatureCache, layer_name, storage_order
from common.cache.write import write_h5
from common.config import Config, load_config, to_dict
from common.data.registry import Data, load_data
from common.layers.hooks import forward_with_features
from common.layers.tables import layer_shapes
from common.methods import losses
from common.models import create_model
from common.profile import features as features_mod
from common.profile import runner as profile
from common.profile import stats as stats_mod
from common.quality import stream as stream_mod
from common.quality.formulas import layer_stats
from common.quality.stream import device_peak, flat_dim, stream_layer_stats
from common.runtime import DETERMINISTIC_ENV
from common.train import streamed, teacher_source
from tests.stages import ENV, Killed, kill_at_evaluation, run_stage
from tests.fakedata import make_imagenet
from tests.test_pipeline import tiny_config
from tests.test_stream import SIZE as STREAM_SIZE, WNIDS, stream_overrides

pytestmark = pytest.mark.cuda

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CLASSES = 10  # chance is 10 %
N_TRAIN, N_TEST = 400, 100  # 100 test images: one is 1 point of accuracy
TIMING = ["epoch_time_s", "images_per_s", "elapsed_s"]  # metrics.csv columns that measure time, not results


def device_config(tmp: Path, dev: str, *extra: str) -> Config:
    """tests/test_pipeline.py's tiny settings on the learnable data, every stage on `dev`."""
    root = tmp / "cifar"
    if not root.exists():
        write_cifar100(root, N_TRAIN, N_TEST, classes=CLASSES)
    return tiny_config(
        tmp, "dataset.name=cifar100", f"dataset.root={root}",
        f"teacher_train.device={dev}", f"train.device={dev}", f"profile.device={dev}",
        "teacher_train.tracker=none", "train.tracker=none", *extra,
    )


def run_method(cfg: Config, method: str, seed: int = 0) -> Path:
    cfg.method.name = method
    return distill.run(cfg, seeds=[seed])[0].dir


def results(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.drop(columns=[c for c in TIMING if c in metrics.columns])


def _bound(real: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call by name, however the caller passed them."""
    return inspect.signature(real).bind(*args, **kwargs).arguments


def _types(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> set[str]:
    return {t.device.type for t in tensors}


# ----------------------------------------------------------------------------- one pipeline per device


@dataclass
class Pipeline:
    """Stage 1 and stage 2 (ce, ours) on one device, with where each step's tensors were."""

    device: str
    cfg: Config
    data: Data
    seen: dict[str, set[str]]  # step -> device types of its tensors
    metrics: dict[str, pd.DataFrame]  # method -> metrics.csv (seed 0)


def _spy(mp: pytest.MonkeyPatch, seen: dict[str, set[str]], phase: list[str]) -> None:
    """Record the device of the tensors at each step's boundary; behaviour is unchanged."""
    real_eval = train_loop.evaluate

    def evaluate(*args, **kwargs):
        a = _bound(real_eval, args, kwargs)
        seen[f"{phase[0]}: model"] |= _types(a["model"].parameters()) | _types(a["model"].buffers())
        seen[f"{phase[0]}: evaluate"].add(torch.device(a["device"]).type)
        return real_eval(*args, **kwargs)

    real_stream = stats_mod.stream_layer_stats

    def stream(*args, **kwargs):
        a = _bound(real_stream, args, kwargs)
        source = a.pop("source")
        seen["S/I/E/Q: device"].add(a["device"].type)

        def watched(positions, layers):
            out = source(positions, layers)
            seen["S/I/E/Q: teacher features"] |= _types(list(out.values()))
            return out

        return real_stream(watched, **a)

    real_gram = stream_mod.accumulate_gram

    def accumulate_gram(gram, *args, **kwargs):
        seen["S/I/E/Q: Gram accumulators"].add(gram.device.type)
        return real_gram(gram, *args, **kwargs)

    real_extract = features_mod.extract_batches

    def extract_batches(*args, **kwargs):
        a = _bound(real_extract, args, kwargs)
        seen[f"{phase[0]}: extraction teacher"] |= _types(a["teacher"].parameters())
        seen[f"{phase[0]}: extraction device"].add(a["device"].type)
        for batch in real_extract(*args, **kwargs):
            seen[f"{phase[0]}: extracted rows"] |= _types(list(batch.values()))
            yield batch

    real_batch = teacher_source.CachedTeacher.batch

    def batch(self, indices, images):
        feats, logits = real_batch(self, indices, images)
        seen[f"{phase[0]}: cached teacher features"] |= _types(list(feats.values()) + ([logits] if logits is not None else []))
        return feats, logits

    mp.setattr(train_loop, "evaluate", evaluate)
    mp.setattr(stats_mod, "stream_layer_stats", stream)
    mp.setattr(stream_mod, "accumulate_gram", accumulate_gram)
    mp.setattr(features_mod, "extract_batches", extract_batches)
    mp.setattr(teacher_source.CachedTeacher, "batch", batch)


@pytest.fixture(scope="module", params=DEVICES)
def pipeline(request, tmp_path_factory) -> Pipeline:
    dev = request.param
    cfg = device_config(tmp_path_factory.mktemp(f"pipeline_{dev}"), dev)
    data = load_data(cfg.dataset)
    seen: dict[str, set[str]] = defaultdict(set)
    phase = ["stage 1"]
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, seen, phase)
        profile.run(cfg, data)
        metrics = {}
        for method in ("ce", "ours"):
            phase[0] = f"stage 2 {method}"
            metrics[method] = pd.read_csv(run_method(cfg, method) / "metrics.csv")
    return Pipeline(dev, cfg, data, dict(seen), metrics)


def test_every_stage_works_on_the_configured_device(pipeline):
    dev, seen = pipeline.device, pipeline.seen
    expected = {
        # stage 1: the teacher trains, S/I/E/Q accumulates and the cache is extracted on profile.device ...
        "stage 1: model": dev, "stage 1: evaluate": dev,
        "S/I/E/Q: device": dev, "S/I/E/Q: teacher features": dev, "S/I/E/Q: Gram accumulators": dev,
        "stage 1: extraction teacher": dev, "stage 1: extraction device": dev,
        # ... and the rows go to the CPU for the HDF5 writer thread
        "stage 1: extracted rows": "cpu",
        # stage 2: the student (and its projectors) live on train.device, and so do the cached
        # teacher features it is handed per batch
        "stage 2 ce: model": dev, "stage 2 ce: evaluate": dev,
        "stage 2 ours: model": dev, "stage 2 ours: evaluate": dev, "stage 2 ours: cached teacher features": dev,
    }
    assert {step: seen.get(step) for step in expected} == {step: {d} for step, d in expected.items()}
    assert "stage 2 ce: cached teacher features" not in seen  # ce needs no teacher


# ----------------------------------------------------------------------------- accuracy against the CPU


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory) -> tuple[Config, dict[str, pd.DataFrame]]:
    """The same pipeline on the CPU in its own directory (seed 0)."""
    cfg = device_config(tmp_path_factory.mktemp("reference_cpu"), "cpu")
    return cfg, {method: pd.read_csv(run_method(cfg, method) / "metrics.csv") for method in ("ce", "ours")}


@pytest.mark.parametrize("method", ["ce", "ours"])
def test_accuracy_on_the_device_is_within_noise_of_the_cpu(pipeline, cpu_reference, method):
    ref_cfg, ref = cpu_reference
    got, want = pipeline.metrics[method], ref[method]
    final = float(got["test_acc"].iloc[-1])
    assert final >= 3 * 100 / CLASSES, f"{method} on {pipeline.device} stayed near chance: {final:.0f} %"
    if pipeline.device == "cpu":
        # two fresh CPU pipelines, same seed: the same numbers (a run is fixed by its seed)
        pd.testing.assert_frame_equal(results(got), results(want), check_exact=True)
        return
    # bfloat16 autocast and other float orders on the GPU: compare with how much the CPU's own
    # accuracy moves between seeds (seeds 1 and 2 measured here), at least 5 points (5 images)
    spread = [float(want["test_acc"].iloc[-1])]
    for seed in (1, 2):
        spread.append(float(pd.read_csv(run_method(ref_cfg, method, seed) / "metrics.csv")["test_acc"].iloc[-1]))
    noise = max(5.0, 2 * (max(spread) - min(spread)))
    assert abs(final - spread[0]) <= noise, f"{method}: {final:.1f} % on {pipeline.device}, CPU seeds {spread}"


# ----------------------------------------------------------------------------- resume


@pytest.fixture
def deterministic(monkeypatch):
    """KD_DETERMINISTIC=1 for this test, with torch's global switches put back afterwards."""
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # set by resolve_device, undone by monkeypatch
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = state[2], state[3]


def test_a_killed_run_resumes_to_the_uninterrupted_metrics(pipeline, deterministic, monkeypatch):
    """`ours` (student, projector, cached features, optimizer, schedule and RNG state all in the
    checkpoint) stopped in epoch 2 after epoch 1's checkpoint, then run again; both runs under
    KD_DETERMINISTIC=1, so on a GPU too the same numbers are expected, not merely close ones."""
    cfg = pipeline.cfg
    whole = run_method(cfg, "ours", seed=1)
    reference = pd.read_csv(whole / "metrics.csv")
    shutil.rmtree(whole)
    calls = kill_at_evaluation(monkeypatch, 2)  # epoch 2's evaluation: epoch 1's checkpoint is on disk
    with pytest.raises(Killed):
        run_method(cfg, "ours", seed=1)
    assert torch.load(whole / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (whole / "done").exists() and not (whole / "failed").exists()
    calls[0] = 2  # from here on each evaluation is counted and passes
    run_method(cfg, "ours", seed=1)
    resumed = pd.read_csv(whole / "metrics.csv")
    assert calls[0] == 3, "the rerun started over instead of resuming after epoch 1"  # one evaluation: epoch 2's
    assert (whole / "done").exists() and list(resumed["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(results(resumed), results(reference), check_exact=True)


# ----------------------------------------------------------------------------- KD_DETERMINISTIC=1


@pytest.mark.parametrize("dev", DEVICES)
def test_deterministic_runs_repeat_bit_for_bit(dev, tmp_path):
    """Two `stage2_distill.py --method ours` processes from nothing (teacher, profile, cache,
    student) with KD_DETERMINISTIC=1: every result file the same except its timing columns."""
    cfg = device_config(tmp_path, dev)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**ENV, DETERMINISTIC_ENV: "1"}
    for run in ("a", "b"):
        out = run_stage("s2", ["--config", str(config), "--artifacts", str(tmp_path / run), "--method", "ours", "--quiet"], env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.csv"))
    names = {p.name for p in files}
    assert {"metrics.csv", "quality.csv", "layer_stats.csv"} <= names and len([p for p in files if p.name == "metrics.csv"]) == 2
    for rel in files:  # the teacher's and the student's metrics.csv, layer_stats.csv, quality.csv
        a, b = pd.read_csv(tmp_path / "a" / rel), pd.read_csv(tmp_path / "b" / rel)
        pd.testing.assert_frame_equal(results(a), results(b), check_exact=True, obj=str(rel))
    student = next(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("student.pt"))
    weights = [torch.load(tmp_path / run / student, weights_only=False)["last"] for run in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ----------------------------------------------------------------------------- streaming S/I/E/Q


def _layers(n: int, classes: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Three layers of ReLU features around class means, float32 as a teacher gives them."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(n // classes)
    shapes = {0: (4, 6, 6), 1: (40,), 2: (3, 8)}  # a feature map, a vector, ViT-like tokens
    layers = {}
    for i, shape in shapes.items():
        means = 2 * torch.randn(classes, *shape, generator=g)
        layers[i] = (means[y] + torch.randn(len(y), *shape, generator=g)).relu()
    return layers, y


STAT_KEYS = ["S", "I", "E", "Q", "sqrtIE", "AvgIntra", "AvgInter", "AvgMinIntra", "AvgNorm", "AvgMinInterDist", "SVDE", "T", "PCAGID", "K", "D"]


# one pass / 16-column slices, re-check rows recomputed (a quarter of the budget is the float64 working copy's)
@pytest.mark.parametrize("budget", [1 << 30, (30 * 30 * 8 + 30 * 4 * 16) * 4 // 3])
@pytest.mark.parametrize("dev", DEVICES)
def test_streaming_quality_on_the_device_equals_layer_stats_on_the_cpu(dev, budget, monkeypatch):
    layers, y = _layers(60, classes=5)
    a, b = torch.arange(0, 60, 2), torch.arange(1, 60, 2)  # A: 30 rows, B: the other 30, as positions of one pool
    device = torch.device(dev)
    grams: set[str] = set()
    real_gram = stream_mod.accumulate_gram

    def accumulate_gram(gram, *args, **kwargs):
        grams.add(gram.device.type)
        return real_gram(gram, *args, **kwargs)

    monkeypatch.setattr(stream_mod, "accumulate_gram", accumulate_gram)

    def source(positions: torch.Tensor, wanted: list[int]) -> dict[int, torch.Tensor]:
        return {i: layers[i][positions].to(device) for i in wanted}

    shapes = {i: tuple(x.shape[1:]) for i, x in layers.items()}
    stats = stream_layer_stats(source, shapes, a, y[a], b, y[b], 50_000, device=device, budget_bytes=budget, batch_size=7)
    assert grams == {dev}
    for i, x in layers.items():
        expected = layer_stats(x[a], y[a], x[b], y[b], 50_000, device="cpu")
        for key in STAT_KEYS:
            # abs: a statistic that is 0 on one device may be ~1e-17 on the other
            assert stats[i][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), (i, key)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate on one device type while the mode is on.

    An op's output is a new allocation unless it shares a storage with an input (views, in-place
    and out= ops); it is live while a Python tensor on it is. Tensors that existed before the mode
    are not counted. On CUDA it sees what the caching allocator is asked for, not its rounding
    or cuBLAS's workspace.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        self.now = self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if address in self.live:
                self.live[address][1] += 1
            elif address in given or storage.nbytes() == 0:
                continue  # a view of (or a write into) a tensor made before the mode
            else:
                self.live[address] = [storage.nbytes(), 1]
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._release, address)
        return out


# n_a = 100: one Gram is 80 000 bytes; the 1 152-column layer is cut into slices under the two
# smaller budgets, and its class features of subset B (20 x 1 152 float32) fit each budget whole.
BUDGETS = [100 * 100 * 8 * 2 + 100 * 4 * 1200 + 20_000, 280_000, 230_400]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("dev", DEVICES)
def test_streaming_quality_allocates_within_its_memory_budget(dev, budget):
    """What S/I/E/Q allocates on the device at its peak: at most profile.memory_budget_mb plus one
    batch of the source (the teacher's forward) and a few n_a-long vectors. Before the float64
    working copies were counted (and the class features of subset B held twice) it took 2.3-4.5x."""
    g = torch.Generator().manual_seed(0)
    classes, n, batch_size = 5, 200, 16
    y = torch.arange(classes).repeat_interleave(n // classes)
    shapes = {0: (8, 12, 12), 1: (300,), 2: (6, 40)}
    layers = {i: (2 * torch.randn(classes, *shape, generator=g)[y] + torch.randn(n, *shape, generator=g)).relu().to(dev) for i, shape in shapes.items()}
    a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
    device = torch.device(dev)

    def source(positions: torch.Tensor, wanted: list[int]) -> dict[int, torch.Tensor]:
        return {i: layers[i][positions.to(device)] for i in wanted}  # a new batch on the device, counted

    batch_bytes = batch_size * sum(flat_dim(shape) for shape in shapes.values()) * 4
    small_vectors = 16 * len(a) * 8  # labels, positions, norms, the Gram's diagonal, ...
    with LiveBytes(dev) as counted, device_peak(device) as peak:
        stats = stream_layer_stats(source, shapes, a, y[a], b, y[b], 50_000, device=device, budget_bytes=budget, batch_size=batch_size)
    assert counted.peak <= budget + batch_bytes + small_vectors, f"{counted.peak} bytes at the peak, budget {budget}"
    if dev == "cuda":
        assert peak[0] is not None and peak[0] >= counted.peak  # the allocator's own count sees at least as much
    else:
        assert peak[0] is None  # the CPU keeps no such count
    cpu_layers = {i: x.cpu() for i, x in layers.items()}
    expected = layer_stats(cpu_layers[0][a], y[a], cpu_layers[0][b], y[b], 50_000, device="cpu")
    assert stats[0]["Q"] == pytest.approx(expected["Q"], rel=1e-5)


# ----------------------------------------------------------------------------- feature extraction and the cached features


def _plain_copies(teacher, data: Data, positions: torch.Tensor, layers: list[int], batch_size: int, device: torch.device):
    """extract_batches as it was before the pinned buffers (the reference): `.to("cpu")` per layer."""
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            idx = positions[start : start + batch_size]
            out, feats = forward_with_features(teacher, data.normalize(data.train.images[idx], device), layers)
            batch = {layer_name(i): f.to("cpu", torch.float32) for i, f in feats.items()}
            yield {**batch, "logits": out.float().cpu(), "labels": data.train.labels[idx], POSITIONS: idx}


@pytest.mark.parametrize("dev", DEVICES)
def test_extraction_writes_the_bytes_of_a_plain_copy(dev, tmp_path):
    """The feature cache stage 1 writes from `extract_batches` (pinned buffers and non-blocking
    copies on CUDA) holds the datasets, checksums included, that plain copies of the same forward
    give (on the CPU: the code before the change)."""
    cfg = tiny_config(tmp_path)  # tests/test_pipeline.py's tiny data and teacher
    data = load_data(cfg.dataset)
    device = torch.device(dev)
    teacher = create_model(cfg.teacher.name, num_classes=data.num_classes, in_channels=data.in_channels,
                           image_size=data.image_size, width=cfg.teacher.width).to(device).eval()
    shapes = layer_shapes(cfg, data)
    layers = sorted(shapes)[::3]
    positions = storage_order(data.train_indices)[:150]  # batches of 64: the last one short
    names = {layer_name(i): shapes[i] for i in layers} | {"logits": (data.num_classes,), "labels": (), POSITIONS: ()}
    dtypes = {n: "float16" for n in names} | {"logits": "float32", "labels": "int64", POSITIONS: "int64"}
    written = {}
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # one forward, twice
        for how, batches in (
            ("pinned", features_mod.extract_batches(teacher, data, positions, layers, 64, device, logits=True, dtype=torch.float32, with_positions=True)),
            ("plain", _plain_copies(teacher, data, positions, layers, 64, device)),
        ):
            written[how] = tmp_path / f"{how}.h5"
            write_h5(written[how], {}, len(positions), names, dtypes, batches)
    with h5py.File(written["pinned"], "r") as got, h5py.File(written["plain"], "r") as want:
        assert sorted(got) == sorted(want) == sorted(names)
        for name in names:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name][()], want[name][()]), name
            assert got[name].attrs[CHECKSUM] == want[name].attrs[CHECKSUM], name


@pytest.mark.parametrize("placement", ["resident", "prefetch"])
@pytest.mark.parametrize("dev", DEVICES)
def test_cached_features_reach_the_device_in_every_input_path(dev, placement, tmp_path):
    """CachedTeacher hands the step each batch's features on train.device, equal to the CPU's
    gather of the cache (on CUDA: the device-resident copy, or pinned buffers on a side stream)."""
    positions = storage_order(torch.arange(0, 300, 3))
    features = torch.randn(len(positions), 4, 2, 2, generator=torch.Generator().manual_seed(3))
    write_h5(tmp_path / "features.h5", {}, len(positions), {POSITIONS: (), "layer_2": (4, 2, 2), "logits": (5,)},
             {POSITIONS: "int64", "layer_2": "float16", "logits": "float32"},
             [{POSITIONS: positions, "layer_2": features, "logits": features.flatten(1)[:, :5]}])
    rows = torch.arange(0, 240, 3)
    with FeatureCache(tmp_path / "features.h5") as cache:
        source = teacher_source.CachedTeacher(cache, [2], True, torch.device(dev), 1 << 30, rows=rows, input_path=placement)
        for b in source.batch_order(rows, 16, torch.Generator().manual_seed(0)):
            feats, logits = source.batch(b, torch.empty(0))
            assert feats[2].device.type == dev and logits.device.type == dev
            assert torch.equal(feats[2].cpu(), cache.gather("layer_2", b)) and torch.equal(logits.cpu(), cache.gather("logits", b))


# ----------------------------------------------------------------------------- losses under bf16 autocast

B = 8
# name -> (function, inputs as (shape, arrives in the autocast dtype?), full precision inside?)
# Inputs that are network outputs arrive in bfloat16 under autocast (a convolution's or a linear
# layer's); pair losses and attention weights arrive as the float32 that the losses return.
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], list[tuple[tuple[int, ...], bool]], bool]] = {
    "standardize_logits": (losses.standardize_logits, [((B, 10), True)], True),
    "kd_loss": (lambda s, t: losses.kd_loss(s, t, 4.0), [((B, 10), True), ((B, 10), True)], True),
    "kd_loss standardized": (lambda s, t: losses.kd_loss(s, t, 4.0, standardize=True), [((B, 10), True), ((B, 10), True)], True),
    "feature_mse (teacher pooled)": (losses.feature_mse, [((B, 16, 4, 4), True), ((B, 16, 8, 8), True)], True),
    "feature_mse_per_sample": (losses.feature_mse_per_sample, [((B, 16, 4, 4), True), ((B, 16, 4, 4), True)], True),
    "fkd_loss": (lambda p, q, w: losses.fkd_loss([p, q], [1.0, w], 2), [((B,), False), ((B,), False), ((B,), False)], True),
    "batch_gram": (losses.batch_gram, [((B, 16, 4, 4), True)], True),
    "normalized_gram": (losses.normalized_gram, [((B, 16, 4, 4), True)], True),
    "row_normalized_gram": (losses.row_normalized_gram, [((B, 16, 4, 4), True)], True),
    "similarity_preserving_ref_loss": (losses.similarity_preserving_ref_loss, [((B, 16, 4, 4), True), ((B, 32, 2, 2), True)], True),
    "similarity_preserving_loss": (losses.similarity_preserving_loss, [((B, 16, 4, 4), True), ((B, 32, 2, 2), True)], True),
    # the attention logits q k^T are a plain matmul, which autocast runs in bfloat16 (on the CPU
    # the softmax too): within bfloat16 noise only
    "semckd_attention": (losses.semckd_attention, [((B, 3, 12), True), ((B, 4, 12), True)], False),
    "semckd_loss": (losses.semckd_loss, [((B, 3, 4), False), ((B, 3, 4), False)], True),
}
# bfloat16 keeps 8 significant bits: inputs rounded by up to 2^-9 relative, a handful of which
# add up in a loss; 3e-2 is several of those roundings, far below what a wrong formula changes.
# Entries near 0 (standardized logits, Gram entries) carry the error of their inputs' scale, so
# the absolute tolerance is that fraction of the result's largest entry.
BF16_RTOL = 3e-2


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dev", DEVICES)
def test_losses_under_bf16_autocast_match_float32(dev, name):
    fn, specs, full_inside = LOSSES[name]
    g = torch.Generator().manual_seed(0)
    exact = [torch.randn(shape, generator=g).abs().to(dev) + (0.0 if low else 0.1) for shape, low in specs]
    arriving = [x.bfloat16() if low else x for x, (_, low) in zip(exact, specs)]
    want = fn(*exact)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
        got = fn(*arriving)
    assert got.device.type == dev and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=BF16_RTOL, atol=BF16_RTOL * float(want.abs().max()))
    if full_inside:
        # computed in float32 from the bfloat16 inputs: the input rounding is the only error left
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(*[x.float() for x in arriving]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a streamed dataset


@pytest.mark.parametrize("dev", DEVICES)
def test_a_streamed_dataset_reaches_the_step_on_the_device(dev, tmp_path, monkeypatch):
    """ImageNet's layout decoded by 2 loader workers (pinned memory on CUDA): every batch the
    step gets, indices and images, is on `dev`, and a 1-epoch kd run with the live teacher ends."""
    root = tmp_path / "imagenet"
    make_imagenet(root, WNIDS, n_train_per_class=8, n_val_per_class=2, sides=(36, 60))
    checkpoint = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=len(WNIDS), in_channels=3, image_size=STREAM_SIZE).state_dict(), checkpoint)
    seen: set[str] = set()
    real = streamed.StreamedImages.epoch

    def epoch(self, batches, epoch=0):
        for rows, images in real(self, batches, epoch):
            seen.update({rows.device.type, images.device.type})
            yield rows, images

    monkeypatch.setattr(streamed.StreamedImages, "epoch", epoch)
    overrides = stream_overrides(root, tmp_path, f"teacher.pretrained={checkpoint}", "method.name=kd", "train.epochs=1",
                                 f"train.device={dev}", f"profile.device={dev}", f"teacher_train.device={dev}")
    result = distill.run(load_config(None, overrides), seeds=[0])[0]
    assert (result.dir / "done").exists() and seen == {dev}
