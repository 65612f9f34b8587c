"""Stage 2 on torchrun (DDP): shards, the global batch, one writer, resume; and the +240E schedule.

The torchrun tests start 2 ranks with gloo on the CPU through the real stage-2 script. The
student is vit_ett (LayerNorm only): torch has no SyncBatchNorm on the CPU, and with per-rank
BatchNorm statistics one step on 2 x 10 images is not one step on 20 images; with LayerNorm it
is, up to the order of float sums.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common.artifacts import layout as artifacts
from common.train import distributed
from common.profile import runner as profile
from common.config import TrainConfig, load_config
from common.data.registry import load_data
from common.train.distributed import Ranks
from common.errors import ConfigError
from common.train.recipes import make_optimizer, make_scheduler
from tests.fakedata import make_fashion_mnist

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EXACT = ["epoch", "train_loss", "loss_feat", "loss_ce", "train_acc", "test_acc", "lr"]


# ----------------------------------------------------------------------------- pieces


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    indices = torch.randperm(103, generator=torch.Generator().manual_seed(0))[:101] + 7
    shards = [distributed.shard(indices, Ranks(r, 4, r, 4)) for r in range(4)]
    assert [len(s) for s in shards] == [25] * 4
    joined = torch.cat(shards)
    assert len(set(joined.tolist())) == 100 and set(joined.tolist()) <= set(indices.tolist())
    assert torch.equal(distributed.shard(indices, distributed.SINGLE), indices)  # one process: untouched


def test_global_batch_must_split_over_ranks():
    assert distributed.local_batch_size(128, Ranks(1, 4, 1, 4)) == 32
    assert distributed.local_batch_size(7, distributed.SINGLE) == 7
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        distributed.local_batch_size(128, Ranks(0, 3, 0, 3))


def test_ranks_from_torchrun_environment(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.from_env() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ranks = distributed.from_env()
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.local_world, ranks.is_main) == (3, 4, 1, 2, False)
    assert distributed.device_for(ranks, torch.device("cpu")) == torch.device("cpu")
    assert distributed.device_for(ranks, torch.device("cuda")) == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- +240E recipe


def _lrs_per_epoch(cfg: TrainConfig, steps: int, lr: float) -> list[list[float]]:
    """The LR every step of every epoch used, as the loop steps the scheduler."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = make_optimizer([{"params": params, "lr": lr}], cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, steps)
    out = []
    for _ in range(cfg.epochs):
        epoch = []
        for _ in range(steps):
            epoch.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        out.append(epoch)
    return out


def test_multistep_drops_the_lr_after_each_milestone_epoch():
    cfg = TrainConfig(epochs=7, optimizer="sgd", schedule="multistep", milestones=[2, 5], gamma=0.1, momentum=0.9, weight_decay=5e-4)
    lrs = _lrs_per_epoch(cfg, steps=3, lr=0.05)
    expected = [0.05, 0.05, 0.005, 0.005, 0.005, 0.0005, 0.0005]  # epochs 1-2, 3-5, 6-7 (1-based)
    for epoch, (got, want) in enumerate(zip(lrs, expected), start=1):
        assert got == pytest.approx([want] * 3, rel=1e-12), f"epoch {epoch}"


def test_the_reference_240e_recipe_is_shipped_and_builds_sgd():
    cfg = load_config(ROOT / "configs" / "cifar100_240e.yaml")
    t = cfg.train
    assert (t.epochs, t.optimizer, t.momentum, t.weight_decay, t.schedule, t.milestones, t.gamma) == (240, "sgd", 0.9, 5e-4, "multistep", [150, 180, 210], 0.1)
    optimizer = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.05}], t, 0.05)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4 and not optimizer.defaults["nesterov"]
    lrs = _lrs_per_epoch(t, steps=1, lr=0.05)
    assert [lrs[e - 1][0] for e in (150, 151, 180, 181, 210, 211, 240)] == pytest.approx([0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5])


def test_recipe_keys_only_enter_the_run_hash_when_they_apply():
    base = load_config(None, [])
    same = load_config(None, ["train.momentum=0.5", "train.milestones=[3]", "train.gamma=0.5"])  # unused by adamw/onecycle
    sgd = load_config(None, ["train.optimizer=sgd"])
    key = artifacts._train_key
    assert key(base.train) == key(same.train) and "optimizer" not in key(base.train)
    assert key(sgd.train) != key(base.train) and key(sgd.train)["momentum"] == 0.9


def test_channels_last_is_in_the_run_key_and_off_finds_the_runs_made_before_it():
    key = artifacts._train_key
    on, off = load_config(None, []).train, load_config(None, ["train.channels_last=false"]).train
    assert on.channels_last and key(on)["channels_last"] is True
    # off hashes as a run made before the key existed: every other setting, no channels_last
    assert key(off) == {k: v for k, v in key(on).items() if k != "channels_last"}
    assert artifacts.short_hash(key(on)) != artifacts.short_hash(key(off))


def test_fit_trains_a_cnn_in_channels_last_and_its_weights_load_into_nchw(tmp_path):
    """The layout changes float order only: two SGD steps land within float noise of NCHW, and
    the saved weights load into a fresh NCHW model."""
    from common.config import MethodConfig
    from common.methods import build_distiller, resolve_method
    from common.models import create_model
    from common.train.loop import fit

    make_fashion_mnist(tmp_path / "fmnist", n_train=40, n_test=20, seed=0)
    weights = {}
    for layout in (True, False):
        cfg = load_config(None, [f"dataset.root={tmp_path / 'fmnist'}", "train.epochs=1", "train.batch_size=16", "train.optimizer=sgd",
                                 "train.schedule=multistep", "train.progress=false", "train.tracker=none", f"train.channels_last={str(layout).lower()}"])
        data = load_data(cfg.dataset)
        torch.manual_seed(0)
        student = create_model("resnet9", num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=0.25)
        ce = build_distiller(resolve_method(MethodConfig(name="ce")), student, num_classes=data.num_classes,
                             input_shape=(data.in_channels, data.image_size, data.image_size), teacher_layers=[], student_layers=[], teacher_shapes={})
        fit(ce, data, cfg.train, tmp_path / f"run-{layout}", lr=0.05, train_indices=torch.arange(32), weights_of=student)
        inner = student.layer1[0].conv1.weight  # 16 input channels: the two layouts differ (conv1 has 1)
        assert inner.is_contiguous(memory_format=torch.channels_last) == layout and inner.is_contiguous() != layout
        weights[layout] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    moved = [k for k, v in weights[True].items() if v.is_floating_point() and not torch.equal(v, weights[False][k])]
    assert moved  # float order differs somewhere, or the layout was not applied
    for name, value in weights[True].items():
        assert torch.allclose(value.float(), weights[False][name].float(), rtol=1e-4, atol=1e-5), name
    fresh = create_model("resnet9", num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=0.25)
    fresh.load_state_dict(weights[True])
    assert torch.equal(fresh.layer1[0].conv1.weight, weights[True]["layer1.0.conv1.weight"]) and fresh.layer1[0].conv1.weight.is_contiguous()


@pytest.mark.parametrize(
    "override, words",
    [("train.optimizer=adam", "train.optimizer"), ("train.schedule=cosine", "train.schedule"), ("train.milestones=[5,3]", "increasing"), ("train.gamma=0", "train.gamma")],
)
def test_bad_recipe_settings_are_config_errors(override, words):
    from common.config import validate_config

    with pytest.raises(ConfigError, match=words):
        validate_config(load_config(None, [override]))


# ----------------------------------------------------------------------------- torchrun


def _settings(tmp: Path, art: Path, *extra: str) -> list[str]:
    return [
        f"dataset.root={tmp / 'fmnist'}", f"artifacts={art}", "teacher.name=resnet18", "teacher.width=0.125",
        "student.name=vit_ett", "student.width=0.125", "teacher_train.epochs=1", "teacher_train.batch_size=32",
        "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=32", "method.name=ours",
        "train.optimizer=sgd", "train.schedule=multistep", "train.lr=0.05", "--quiet", *extra,
    ]


def _stage2(tmp: Path, art: Path, nproc: int, *extra: str, wait: bool = True):
    script = [str(ROOT / "stage2_distill.py"), *_settings(tmp, art, *extra)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script] if nproc > 1 else [sys.executable, *script]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def teacher_tree(tmp_path_factory):
    """A trained and profiled tiny teacher, copied into each test's artifacts directory."""
    tmp = tmp_path_factory.mktemp("ddp")
    make_fashion_mnist(tmp / "fmnist", n_train=200, n_test=60, seed=0)
    cfg = load_config(None, [a for a in _settings(tmp, tmp / "base") if a != "--quiet"] + ["profile.progress=false", "teacher_train.progress=false"])
    data = load_data(cfg.dataset)
    profile.run(cfg, data)
    return tmp, artifacts.teacher_dir(cfg, data)


def _tree(teacher_tree, name: str) -> Path:
    tmp, tdir = teacher_tree
    art = tmp / name
    shutil.copytree(tdir, art / tdir.relative_to(tmp / "base"))
    return art


def _run_dir(art: Path) -> Path:
    (done,) = list(art.glob("fashion_mnist/resnet18__vit_ett/ours-*/seed0/done"))
    return done.parent


def test_two_ranks_take_the_one_process_step_on_the_same_global_batch(teacher_tree):
    """One SGD step on 20 images: 1 process x 20 vs 2 ranks x 10 (every training image is in the
    one batch either way), the same weights after the step."""
    tmp, _ = teacher_tree
    one, two = _tree(teacher_tree, "one"), _tree(teacher_tree, "two")
    step = ["train.epochs=1", "train.train_subset=20", "train.batch_size=20"]
    _stage2(tmp, one, 1, *step)
    _stage2(tmp, two, 2, *step)
    a = torch.load(_run_dir(one) / "student.pt", weights_only=True)["last"]
    b = torch.load(_run_dir(two) / "student.pt", weights_only=True)["last"]
    init = _initial_student(tmp)
    assert a.keys() == b.keys()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1e-4  # the step changed the weights, so the comparison means something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children first found, grandchildren after)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _initial_student(tmp: Path) -> dict[str, torch.Tensor]:
    from common.models import create_model
    from common.runtime import seed_everything

    seed_everything(0)
    return create_model("vit_ett", num_classes=10, in_channels=1, image_size=28, width=0.125).state_dict()


def test_two_rank_run_is_complete_reportable_and_resumes_after_a_kill(teacher_tree):
    """Rank 0 alone writes a complete run that stage 3 reports; a job killed after an epoch and
    started again resumes from the checkpoint and ends with the uninterrupted job's metrics."""
    tmp, _ = teacher_tree
    whole, killed = _tree(teacher_tree, "whole"), _tree(teacher_tree, "killed")
    run = ["train.epochs=8", "train.train_subset=200", "train.batch_size=10"]  # 8 epochs of 10 steps a rank: time to kill in
    _stage2(tmp, whole, 2, *run)
    rdir = _run_dir(whole)
    assert {"config.yaml", "metrics.csv", "student.pt", "summary.yaml", "done"} <= {p.name for p in rdir.iterdir()}
    assert not (rdir / "checkpoint.pt").exists()
    assert yaml.safe_load((rdir / "config.yaml").read_text())["run"]["ranks"] == 2
    metrics = pd.read_csv(rdir / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, 9))

    proc = _stage2(tmp, killed, 2, *run, wait=False)
    ckpts = lambda: list(killed.glob("fashion_mnist/resnet18__vit_ett/ours-*/seed0/checkpoint.pt"))  # noqa: E731
    deadline = time.time() + 240
    while not ckpts() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and both ranks (which run in sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpts(), "no checkpoint appeared before the job ended: " + (proc.stdout.read() if proc.stdout else "")[-2000:]
    assert not (ckpts()[0].parent / "done").exists(), "the job finished before the kill"
    resumed = _stage2(tmp, killed, 2, *run)
    assert "resuming after epoch" in resumed.stdout + resumed.stderr
    pd.testing.assert_frame_equal(pd.read_csv(_run_dir(killed) / "metrics.csv")[EXACT], metrics[EXACT], check_exact=False, rtol=1e-9)

    report_dir = tmp / "report"
    out = subprocess.run(
        [sys.executable, "stage3_evaluate.py", "--artifacts", str(whole), "--out", str(report_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_csv(report_dir / "accuracy.csv")
    assert "ours" in set(table["method"]) and table.loc[table["method"] == "ours", "n_runs"].iloc[0] == 1
