"""Faults of whole processes, through the real stage scripts (reliability items 1, 6, 8 and 10).

* SIGKILL at random points of a stage-2 run, then the same command again: it resumes and ends
  with the metrics and weights of an uninterrupted run, exactly (CPU);
* SIGKILL during stage 1's teacher training, S/I/E/Q pass and feature extraction: each rerun
  finishes what was left and gives the uninterrupted stage 1's teacher and profile;
* a non-finite loss or weights: one error line naming the epoch, the step and every loss term,
  the last good checkpoint kept, the run marked failed, listed by the report and not averaged;
  zero, constant and non-finite layers give finite S/I/E/Q or an "undefined" that selection skips;
* two stage-2 processes for different methods on a fresh tree build the teacher and the
  profile once; two reports at once write the same tables as one report alone;
* the same seed and config give identical metrics in two artifacts directories.

Children run with OMP_NUM_THREADS=1: tiny models run several times faster on one thread on a busy
2-core machine, and a CPU result is fixed by its seed for a given thread count (the order of
float reductions depends on it), so every pair of runs compared here uses the same count.
The kill points are random; the seed is in every assertion message and KD_KILL_SEED=<seed>
repeats the choice.
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

from common import distill
from common.report import runner as report
from common.cache.reader import FeatureCache
from common.config import Config, load_config
from common.data.registry import load_data
from common.errors import ConfigError, TrainingError
from common.profile.features import cache_identity
from common.profile.manifest import load_manifest, select_teacher_layers
from common.quality.formulas import layer_stats
from common.quality.stream import stream_layer_stats
from common.train.loop import fit
from tests.fakedata import make_fashion_mnist
from tests.stages import ENV, ROOT, STAGES, temp_files

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

TIMEOUT = 240  # seconds for one child; each takes a few here
# Columns of metrics.csv that a seed fixes (times and images/s are not).
EXACT = ["epoch", "train_loss", "loss_feat", "loss_ce", "train_acc", "test_acc", "lr"]
KILL_SEED = int(os.environ.get("KD_KILL_SEED", random.SystemRandom().randrange(1_000_000)))


def settings(tmp: Path, artifacts: Path) -> list[str]:
    """Tiny settings: stage 1 takes ~5 s here, stage 2 ~5 s, of which ~1.5 s of training in
    8 epochs of 25 steps (wide enough to kill at a random step)."""
    return [
        f"dataset.root={tmp / 'fmnist'}", f"artifacts={artifacts}",
        "teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125",
        "teacher_train.epochs=3", "teacher_train.batch_size=16", "train.epochs=8", "train.batch_size=8",
        "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=16",
    ]


def command(stage: str, tmp: Path, artifacts: Path, *extra: str) -> list[str]:
    return [sys.executable, STAGES[stage], "--quiet", *settings(tmp, artifacts), *extra]


def config(tmp: Path, artifacts: Path, *extra: str) -> Config:
    quiet = ["train.progress=false", "teacher_train.progress=false", "profile.progress=false"]
    return load_config(None, [*settings(tmp, artifacts), *quiet, *extra])


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A child writing stdout and stderr to `log` (a file: a pipe nobody reads could fill and block it)."""
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT, text=True)


def finish_all(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    for proc in procs:
        proc.wait(timeout=TIMEOUT)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(texts)
    return texts


def kill_when(cmd: list[str], log: Path, ready: Callable[[], bool], delay: float = 0.0) -> bool:
    """Start `cmd`, SIGKILL it `delay` s after `ready()` first holds (polled every 2 ms).

    Returns False when the child ended on its own before the kill (the kill point was missed).
    """
    proc = start(cmd, log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            if proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.kill()  # SIGKILL: no handler, no cleanup, like the OOM killer or a power cut
        proc.wait(timeout=TIMEOUT)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def clone(reference: Path, tmp: Path, name: str) -> Path:
    """A copy of the reference stage-1 tree (teacher, profile, cache), so each test writes its own."""
    artifacts = tmp / name / "artifacts"
    shutil.copytree(reference, artifacts)
    return artifacts


def one(paths: list[Path], what: str) -> Path:
    assert len(paths) == 1, f"expected one {what}, found {paths}"
    return paths[0]


def teacher_dir(artifacts: Path) -> Path:
    return one(list(artifacts.glob("fashion_mnist/resnet18-*")), "teacher directory")


def student_dir(artifacts: Path, method: str = "ours") -> Path:
    return one(list(artifacts.glob(f"fashion_mnist/resnet18__resnet9/{method}-*/seed0")), f"{method} run")


def epochs_done(artifacts: Path) -> int:
    """Rows of the student run's metrics.csv (written atomically, so readable at any time)."""
    found = list(artifacts.glob("fashion_mnist/resnet18__resnet9/ours-*/seed0/metrics.csv"))
    return len(pd.read_csv(found[0])) if found else 0


def assert_same_weights(a: Path, b: Path, why: str) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa["best_epoch"] == wb["best_epoch"], why
    for which in ("best", "last"):
        assert wa[which].keys() == wb[which].keys(), why
        for key in wa[which]:
            assert torch.equal(wa[which][key], wb[which][key]), f"{which} {key} differs; {why}"


@dataclass
class Tree:
    tmp: Path
    reference: Path  # artifacts of one uninterrupted stage 1; tests copy it, never write to it


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Tree:
    tmp = tmp_path_factory.mktemp("process")
    make_fashion_mnist(tmp / "fmnist", n_train=200, n_test=60, seed=0)
    reference = tmp / "reference" / "artifacts"
    out = run(command("s1", tmp, reference))
    assert out.returncode == 0, out.stderr
    return Tree(tmp, reference)


@pytest.fixture(scope="module")
def uninterrupted(tree: Tree) -> list[Path]:
    """Two uninterrupted `ours` runs of the same config and seed in two artifacts trees, at once."""
    trees = [clone(tree.reference, tree.tmp, f"plain{i}") for i in (1, 2)]
    logs = [tree.tmp / f"plain{i}.log" for i in (1, 2)]
    finish_all([start(command("s2", tree.tmp, a, "--method", "ours"), log) for a, log in zip(trees, logs)], logs)
    return [student_dir(a) for a in trees]


# ----------------------------------------------------------------------------- item 10


def test_same_seed_and_config_give_identical_metrics_and_weights(uninterrupted):
    first, second = uninterrupted
    a, b = pd.read_csv(first / "metrics.csv"), pd.read_csv(second / "metrics.csv")
    assert list(a["epoch"]) == list(range(1, 9))
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT], check_exact=True)
    assert_same_weights(first / "student.pt", second / "student.pt", "two uninterrupted runs")


def test_kd_deterministic_turns_on_deterministic_kernels(monkeypatch):
    """KD_DETERMINISTIC=1 (for GPUs; the CPU result is fixed anyway) is applied by resolve_device,
    which every stage calls before its first CUDA work."""
    from common.runtime import resolve_device

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored at teardown, whatever resolve_device sets
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setenv("KD_DETERMINISTIC", "1")
    benchmark, cudnn_deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        resolve_device("cpu")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:  # process-wide switches: leave them as the other tests expect
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_deterministic


# ----------------------------------------------------------------------------- item 1, stage 2


def test_stage2_killed_at_random_steps_resumes_to_the_uninterrupted_result(tree: Tree, uninterrupted):
    rng = random.Random(KILL_SEED)
    artifacts = clone(tree.reference, tree.tmp, "killed")
    cmd = command("s2", tree.tmp, artifacts, "--method", "ours")
    kills = []
    for attempt in range(2):  # kill, resume and kill again, then resume to the end
        before = epochs_done(artifacts)
        delay = rng.uniform(0.0, 0.3)
        killed = kill_when(cmd, tree.tmp / f"killed{attempt}.log", lambda: epochs_done(artifacts) > before, delay)
        kills.append((before, round(delay, 3)))
        why = f"KD_KILL_SEED={KILL_SEED}, kills after epochs + delays {kills}"
        assert killed, f"the run ended before the kill; {why}"
        rdir = student_dir(artifacts)
        assert not (rdir / "done").exists(), why
        if (rdir / "checkpoint.pt").exists():  # never half-written: absent or loadable
            assert torch.load(rdir / "checkpoint.pt", weights_only=False)["epoch"] >= 1, why
    out = run(cmd)
    assert out.returncode == 0, f"{out.stderr}\n{why}"
    assert "resuming after epoch" in out.stderr, why
    rdir = student_dir(artifacts)
    resumed, reference = pd.read_csv(rdir / "metrics.csv"), pd.read_csv(uninterrupted[0] / "metrics.csv")
    try:
        pd.testing.assert_frame_equal(resumed[EXACT], reference[EXACT], check_exact=True)
    except AssertionError as exc:
        raise AssertionError(f"resumed run differs from the uninterrupted one; {why}\n{exc}") from None
    assert_same_weights(rdir / "student.pt", uninterrupted[0] / "student.pt", why)
    assert not (rdir / "checkpoint.pt").exists() and not temp_files(artifacts), f"{temp_files(artifacts)}; {why}"


# ----------------------------------------------------------------------------- item 1, stage 1


def test_stage1_killed_in_each_step_finishes_on_rerun(tree: Tree):
    rng = random.Random(KILL_SEED)
    artifacts = tree.tmp / "stage1" / "artifacts"
    cmd = command("s1", tree.tmp, artifacts)
    logs = [tree.tmp / f"stage1_{i}.log" for i in range(3)]

    def logged(log: Path, text: str) -> Callable[[], bool]:
        return lambda: log.exists() and text in log.read_text()

    def globbed(pattern: str) -> Callable[[], bool]:
        return lambda: any(artifacts.glob(pattern))

    teacher_delay = rng.uniform(0.0, 0.15)
    steps = [  # (step, when to kill, delay, what must still be missing afterwards)
        ("teacher training", logged(logs[0], "teacher resnet18 epoch 1/3"), teacher_delay, "fashion_mnist/resnet18-*/done"),
        ("S/I/E/Q pass", logged(logs[1], "step quality_subset_a"), 0.0, "fashion_mnist/resnet18-*/quality-*/layer_stats.csv"),
        ("feature extraction", globbed("fashion_mnist/resnet18-*/.features-float16.h5.*.tmp"), 0.0, "fashion_mnist/resnet18-*/features-float16.h5"),
    ]
    checkpointed = False
    for (step, ready, delay, missing), log in zip(steps, logs):
        killed = kill_when(cmd, log, ready, delay)
        why = f"kill during {step} (KD_KILL_SEED={KILL_SEED}, delay {delay:.3f}s); log:\n{log.read_text()}"
        assert killed, f"stage 1 ended before the {why}"
        assert not any(artifacts.glob(missing)), f"{missing} was written before the {why}"
        assert not any(artifacts.glob("fashion_mnist/resnet18-*/profile-*/done")), why
        checkpointed = checkpointed or any(artifacts.glob("fashion_mnist/resnet18-*/checkpoint.pt"))
    # The teacher killed after its first epoch resumed from its checkpoint (or, killed while
    # writing it, trained from epoch 1).
    assert ("resuming after epoch" in logs[1].read_text()) == checkpointed, logs[1].read_text()

    out = run(cmd)
    assert out.returncode == 0, out.stderr
    assert "skipping training" in out.stderr and "step quality_subset_a" not in out.stderr  # only what was left
    cfg = config(tree.tmp, artifacts)
    data = load_data(cfg.dataset)
    manifest = load_manifest(cfg, data)
    assert manifest is not None
    with FeatureCache(manifest.features) as cache:
        cache.check({**cache_identity(manifest.data["teacher"]["sha256"], data), "dtype": "float16"}, rebuild_hint="-")
        assert set(cache.meta["layers"]) >= set(manifest.selected) | set(manifest.data["baseline_layers"])
        assert cache.covers(data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed))
    assert not temp_files(artifacts), temp_files(artifacts)
    # The killed teacher resumed to the uninterrupted teacher, so S/I/E/Q and the selection agree too.
    assert_same_weights(teacher_dir(artifacts) / "teacher.pt", teacher_dir(tree.reference) / "teacher.pt", "stage-1 kills")
    reference = load_manifest(config(tree.tmp, tree.reference), data)
    assert manifest.data["layers"] == reference.data["layers"] and manifest.selected == reference.selected


# ----------------------------------------------------------------------------- item 6


def test_nan_loss_in_a_real_run_is_one_error_line_and_a_failed_run(tree: Tree):
    artifacts = tree.tmp / "nan" / "artifacts"
    out = run(command("s2", tree.tmp, artifacts, "--method", "ce", "train.lr=1e3"))  # AdamW's decay then diverges
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    match = re.search(r"loss is not finite at epoch (\d+), step (\d+) of (\d+) \(loss_ce=(nan|inf|-inf)\)", errors[0])
    assert match, errors[0]
    epoch = int(match.group(1))
    rdir = student_dir(artifacts, "ce")
    assert (rdir / "failed").read_text().strip() == errors[0].removeprefix("error: ")
    if epoch > 1:  # the last good epoch's checkpoint and metrics are kept
        assert f"the last good checkpoint, epoch {epoch - 1}, is kept" in errors[0]
        assert torch.load(rdir / "checkpoint.pt", weights_only=False)["epoch"] == epoch - 1
        assert len(pd.read_csv(rdir / "metrics.csv")) == epoch - 1
    else:
        assert "holds no checkpoint" in errors[0] and not (rdir / "checkpoint.pt").exists()
    _assert_listed_as_failed(artifacts, rdir, tree.tmp / "nan" / "reports")


def test_nan_in_epoch_2_names_every_term_keeps_epoch_1_and_a_rerun_recovers(tree: Tree, monkeypatch):
    artifacts = clone(tree.reference, tree.tmp, "nan2")
    cfg = config(tree.tmp, artifacts, "method.name=ours", "train.epochs=3")
    real = distill.build_distiller

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        forward, calls = model.forward_train, [0]

        def forward_train(*a, **k):
            calls[0] += 1
            logits, losses = forward(*a, **k)
            if calls[0] == 25 + 3:  # epoch 2 (25 steps per epoch), step 3
                losses["feat"] = losses["feat"] * math.nan
            return logits, losses

        model.forward_train = forward_train
        return model

    monkeypatch.setattr(distill, "build_distiller", poisoned)
    with pytest.raises(TrainingError) as caught:
        distill.run(cfg, seeds=[0])
    message = str(caught.value)
    terms = re.search(r"loss is not finite at epoch 2, step 3 of 25 \(([^)]*)\)", message)
    assert terms and set(terms.group(1).split(", ")) >= {"loss_feat=nan"} and re.search(r"loss_ce=\d", terms.group(1)), message
    assert "the last good checkpoint, epoch 1, is kept" in message
    rdir = student_dir(artifacts)
    assert torch.load(rdir / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert (rdir / "failed").read_text().strip() == message and not (rdir / "done").exists()
    _assert_listed_as_failed(artifacts, rdir, tree.tmp / "nan2" / "reports")

    monkeypatch.setattr(distill, "build_distiller", real)  # the fault was transient: rerun
    result = distill.run(cfg, seeds=[0])[0]
    assert not result.skipped and (rdir / "done").exists() and not (rdir / "failed").exists()
    assert list(pd.read_csv(rdir / "metrics.csv")["epoch"]) == [1, 2, 3]


def _assert_listed_as_failed(artifacts: Path, rdir: Path, out: Path) -> None:
    """The report lists the failed run and averages nothing of it (checks only that, since the
    report's status logic is changing)."""
    tables = report.run(artifacts, out)
    listed = tables["unfinished"]
    row = listed[listed["path"] == str(rdir)]
    assert len(row) == 1 and row["status"].iloc[0] == "failed", listed
    acc = tables["accuracy"]
    assert acc[acc["method"] != "teacher"].empty, acc  # its only run failed: no average


def test_weights_made_non_finite_by_the_last_step_are_never_checkpointed(tree: Tree):
    """A finite loss whose step still breaks the weights stops at the end of that epoch."""
    cfg = config(tree.tmp, tree.tmp / "unused")
    data = load_data(cfg.dataset)

    class Breaks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(28 * 28, 10)
            self.steps = 0

        def forward(self, x, y, feats, logits, step=None):
            self.steps += 1
            out = self.lin(x.flatten(1))
            if self.steps == 2 * 25:  # the last step of epoch 2: the loss is fine, the weights are not
                with torch.no_grad():
                    self.lin.bias[0] = math.inf
            return out, {"ce": torch.nn.functional.cross_entropy(out, y)}

        def forward_eval(self, x):
            return self.lin(x.flatten(1))

    run_dir = tree.tmp / "weights" / "run"
    with pytest.raises(TrainingError, match=r"weights are not finite after the last step of epoch 2 .*loss_ce=.*epoch 1, is kept"):
        fit(Breaks(), data, cfg.train, run_dir, lr=0.01, train_indices=data.train_indices)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 1


def _features(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    shape = (n, 4, 3, 3)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, 0.7)
    if kind == "inf":
        x = torch.randn(shape, generator=generator)
        x[0, 0] = math.inf
        return x
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("kind, defined", [("zero", False), ("constant", True), ("inf", False), ("random", True)])
def test_degenerate_layers_give_finite_or_undefined_scores(kind: str, defined: bool):
    g = torch.Generator().manual_seed(0)
    x, y = _features(40, kind, g), torch.arange(4).repeat_interleave(10)
    stats = layer_stats(x, y, x, y, 1000)  # an all-zero layer used to raise ZeroDivisionError
    scores = [stats[c] for c in ("S", "I", "E", "Q", "sqrtIE")]
    if defined:
        assert all(math.isfinite(v) for v in scores), stats
    else:
        assert all(math.isnan(v) for v in scores), stats  # "undefined", never +-inf
    if kind == "constant":  # every |cos| is 1 and every spectrum zero: nothing separates the classes
        assert stats["S"] == stats["I"] == stats["Q"] == 0.0
    # The streaming profile (what stage 1 runs) agrees on the same subsets.
    positions = torch.arange(40)
    streamed = stream_layer_stats(
        lambda pos, layers: {i: x[pos] for i in layers}, {0: tuple(x.shape[1:])}, positions, y, positions, y, 1000,
        device=torch.device("cpu"), budget_bytes=1 << 20, batch_size=16,
    )[0]
    for c in ("S", "I", "E", "Q"):
        assert (math.isnan(stats[c]) and math.isnan(streamed[c])) or math.isclose(stats[c], streamed[c], rel_tol=1e-9, abs_tol=1e-12), c


def test_selection_skips_undefined_layers_and_marks_them():
    nan, inf = math.nan, math.inf
    stats = pd.DataFrame({
        "layer": [0, 1, 2, 3, 4],
        "S": [0.1, nan, 0.3, nan, 0.2],
        "I": [1.0, nan, 1.0, nan, 1.2],
        "E": [2.0, 3.0, 2.0, nan, 2.5],
        "Q": [1.5, nan, inf, nan, 1.9],
        "sqrtIE": [1.4, nan, 1.4, nan, 1.7],
    })
    cfg = load_config(None, ["profile.k=2"])
    quality, top_k, selected, how = select_teacher_layers(cfg, stats)
    assert selected == top_k["Q"] == [0, 4]  # 1 and 3 undefined, 2 infinite: never chosen
    assert top_k["E"] == [1, 4]  # layer 1's E is defined, so E may pick it
    assert list(quality["undefined"]) == ["", "Q S I sqrtIE", "Q", "Q S I E sqrtIE", ""]
    assert list(quality["selected"]) == [True, False, False, False, True]
    with pytest.raises(ConfigError, match="only 2 layers have a score .*skipped"):
        select_teacher_layers(load_config(None, ["profile.k=3"]), stats)
    assert select_teacher_layers(load_config(None, ["profile.k=3", "profile.criterion=E"]), stats)[2] == [0, 1, 4]  # tie to the lower index


# ----------------------------------------------------------------------------- item 8


def test_two_methods_at_once_share_teacher_and_profile_and_two_reports_agree(tree: Tree):
    artifacts = tree.tmp / "together" / "artifacts"
    logs = [tree.tmp / f"together_{m}.log" for m in ("ours", "fitnet")]
    procs = [start(command("s2", tree.tmp, artifacts, "--method", m, "train.epochs=2"), log) for m, log in zip(("ours", "fitnet"), logs)]
    text = "\n".join(finish_all(procs, logs))
    assert text.count("teacher resnet18: training") == 1, text
    assert text.count("step quality_subset_a") == 1, text  # S/I/E/Q computed once
    assert len(pd.read_csv(teacher_dir(artifacts) / "metrics.csv")) == 3  # trained once, not twice
    for method in ("ours", "fitnet"):
        assert (student_dir(artifacts, method) / "done").exists()
    cfg = config(tree.tmp, artifacts)
    data = load_data(cfg.dataset)
    manifest = load_manifest(cfg, data)
    with FeatureCache(manifest.features) as cache:  # both methods' layers, one valid file
        cache.check({**cache_identity(manifest.data["teacher"]["sha256"], data), "dtype": "float16"}, rebuild_hint="-")
        assert set(cache.meta["layers"]) >= set(manifest.selected) | set(manifest.data["baseline_layers"])

    out = artifacts / "reports"
    logs = [tree.tmp / f"report{i}.log" for i in (1, 2)]
    finish_all([start([sys.executable, STAGES["s3"], "--artifacts", str(artifacts)], log) for log in logs], logs)
    alone = tree.tmp / "together" / "alone"
    report.run(artifacts, alone)
    for name in ("accuracy.csv", "accuracy.md", "accuracy.tex", "epochs_to_target.csv", "epochs_to_target.md", "unfinished.csv", "unfinished.md"):
        assert (out / name).is_file() == (alone / name).is_file(), name  # unfinished.md only with unfinished runs
        if (alone / name).is_file():
            assert (out / name).read_bytes() == (alone / name).read_bytes(), name
    accuracy = pd.read_csv(out / "accuracy.csv")
    assert {"ours", "fitnet"} <= set(accuracy["method"])
    assert not temp_files(out)
