"""All three stages end to end on a tiny stand-in dataset, plus skip / resume / invalidation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common import distill
from common.artifacts import layout as artifacts
from common.profile import runner as profile
from common.report import runner as report
from common.cache.reader import FeatureCache
from common.config import Config, load_config
from common.data.registry import load_data
from common.errors import CacheError, ConfigError, TrainingError
from common.layers.tables import list_layers
from common.profile.features import ensure_features
from common.profile.teacher import load_teacher
from common.train.teacher_source import CachedTeacher, LiveTeacher
from common.train.loop import fit
from tests.fakedata import make_fashion_mnist
from tests.stages import run_stage

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tmp: Path, *extra: str) -> Config:
    data_root = tmp / "fmnist"
    if not data_root.exists():
        make_fashion_mnist(data_root, n_train=200, n_test=60, seed=0)
    return load_config(
        None,
        [
            f"dataset.root={data_root}",
            f"artifacts={tmp / 'artifacts'}",
            "teacher.name=resnet18",
            "teacher.width=0.125",
            "student.name=resnet9",
            "student.width=0.125",
            "teacher_train.epochs=2",
            "teacher_train.batch_size=32",
            "teacher_train.progress=false",
            "train.epochs=2",
            "train.batch_size=32",
            "train.progress=false",
            "profile.subset_size=100",
            "profile.per_class_cap=10",
            "profile.batch_size=64",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(tmp)
    data = load_data(cfg.dataset)
    prof = profile.run(cfg, data)
    return tmp, cfg, data, prof


def test_profile_writes_quality_selection_and_features(profiled):
    _, cfg, data, prof = profiled
    quality = pd.read_csv(prof.dir / "quality.csv")
    for col in ["layer", "module", "shape", "dim", "S", "I", "E", "Q", "selected"]:
        assert col in quality.columns
    assert len(quality) == 10  # resnet18: stem + 8 blocks + flatten
    assert quality["selected"].sum() == 4 and sorted(quality.loc[quality["selected"], "layer"]) == prof.selected
    assert prof.selected == sorted(quality.nlargest(4, "Q")["layer"].tolist())
    selection = yaml.safe_load((prof.dir / "selection.yaml").read_text())
    assert selection["layers"] == prof.selected
    assert (prof.dir / "quality.png").stat().st_size > 1000
    with FeatureCache(prof.features) as cache:
        assert cache.n == len(data.train.labels)
        assert set(cache.meta["layers"]) >= set(prof.selected) | {2, 4, 6, 8}  # + resnet18's baseline list
        assert cache.meta["teacher_sha256"] == load_teacher(cfg, data, torch.device("cpu"))[1]
        assert cache.meta["dtype"] == "float16"
        assert torch.equal(cache.gather("labels", torch.arange(5)), data.train.labels[:5])


def _stamps(cfg, data) -> dict[str, int]:
    tdir = artifacts.teacher_dir(cfg, data)
    return {str(p.relative_to(tdir)): p.stat().st_mtime_ns for p in tdir.rglob("*") if p.suffix in (".h5", ".csv", ".yaml", ".png")}


def test_rerun_does_no_work(profiled):
    _, cfg, data, prof = profiled
    stamps = _stamps(cfg, data)
    assert {"features-float16.h5", f"{prof.dir.name}/profile.yaml", f"{prof.dir.name}/quality.csv"} <= set(stamps)
    profile.run(cfg, data)
    assert _stamps(cfg, data) == stamps


def test_cached_features_equal_live_teacher(profiled):
    _, cfg, data, prof = profiled
    teacher, _ = load_teacher(cfg, data, torch.device("cpu"))
    layers = prof.selected
    idx = torch.tensor([5, 0, 17, 3])
    with FeatureCache(prof.features) as cache:
        cached = CachedTeacher(cache, layers, True, torch.device("cpu"), 1 << 30)
        c_feats, c_logits = cached.batch(idx, data.normalize(data.train.images[idx]))
    l_feats, l_logits = LiveTeacher(teacher, layers, True).batch(idx, data.normalize(data.train.images[idx]))
    for i in layers:  # float16 cache vs float32 forward
        torch.testing.assert_close(c_feats[i], l_feats[i], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(c_logits, l_logits, rtol=1e-4, atol=1e-4)


def test_cached_and_live_teacher_train_the_same(profiled):
    """With augmentation off, distilling from features.h5 (float32) equals a live teacher forward."""
    import shutil

    tmp, _, _, _ = profiled
    metrics = {}
    for source in ("cache", "live"):
        cfg = tiny_config(tmp, "profile.cache_dtype=float32", "method.name=ours", f"train.teacher_source={source}")
        result = distill.run(cfg, seeds=[0])[0]
        metrics[source] = pd.read_csv(result.dir / "metrics.csv")
        shutil.rmtree(result.dir.parent)  # the source is runtime-only: both runs share a directory
    cols = ["train_loss", "loss_feat", "loss_ce", "train_acc", "test_acc"]
    pd.testing.assert_frame_equal(metrics["cache"][cols], metrics["live"][cols], rtol=1e-4, atol=1e-4)


def test_distill_report_and_skip(profiled):
    tmp, cfg, _, _ = profiled
    for method in ("ce", "ours", "kd"):
        cfg.method.name = method
        results = distill.run(cfg, seeds=[0])
        assert not results[0].skipped
        rdir = results[0].dir
        assert (rdir / "done").exists() and (rdir / "student.pt").exists()
        metrics = pd.read_csv(rdir / "metrics.csv")
        assert list(metrics["epoch"]) == [1, 2]
        resolved = yaml.safe_load((rdir / "config.yaml").read_text())
        assert resolved["run"]["seed"] == 0 and resolved["train"]["seed"] == 0 and "torch" in resolved["run"]["versions"]
        assert not (rdir / "checkpoint.pt").exists()
        summary = yaml.safe_load((rdir / "summary.yaml").read_text())
        assert summary["best_test_acc"] == metrics["test_acc"].max() and summary["epochs"] == 2
    assert "loss_feat" in metrics.columns or "loss_kd" in metrics.columns
    cfg.method.name = "ours"
    assert distill.run(cfg, seeds=[0])[0].skipped  # a rerun skips finished work
    out = report.run(Path(cfg.artifacts), tmp / "reports")
    acc = out["accuracy"]
    assert {"ce", "ours", "kd"} <= set(acc["method"])
    assert (tmp / "reports" / "accuracy.md").exists() and (tmp / "reports" / "epochs_to_target.md").exists()


def test_different_settings_never_share_a_run_dir(profiled):
    _, cfg, data, _ = profiled
    from common.methods import resolve_method
    import dataclasses

    spec = dataclasses.asdict(resolve_method(cfg.method))
    use = artifacts.teacher_use([1, 2], "float16")
    a = artifacts.run_dir(cfg, data, spec, use, 0)
    other = load_config(None, ["train.epochs=3"])
    other = dataclasses.replace(cfg, train=other.train)
    assert artifacts.run_dir(other, data, spec, use, 0) != a
    assert artifacts.run_dir(cfg, data, spec, artifacts.teacher_use([1, 3], "float16"), 0) != a
    assert artifacts.run_dir(cfg, data, spec, use, 1).parent == a.parent  # only the seed differs


def test_same_dataset_name_other_content_gets_other_teacher(tmp_path):
    cfg_a = tiny_config(tmp_path / "a")
    make_fashion_mnist(tmp_path / "b" / "fmnist", n_train=200, n_test=60, seed=1)
    cfg_b = tiny_config(tmp_path / "b")
    data_a, data_b = load_data(cfg_a.dataset), load_data(cfg_b.dataset)
    assert artifacts.teacher_id(cfg_a, data_a) != artifacts.teacher_id(cfg_b, data_b)
    # ...while moving the same data elsewhere keeps the id
    assert artifacts.teacher_id(cfg_a, data_a) == artifacts.teacher_id(cfg_a, load_data(cfg_a.dataset))


def test_corrupt_cache_is_refused_then_rebuilt_by_stage1(tmp_path):
    cfg = tiny_config(tmp_path, "teacher_train.epochs=1", "profile.layers=[1,2,3,4]")
    data = load_data(cfg.dataset)
    prof = profile.run(cfg, data)
    good = prof.features.read_bytes()
    prof.features.write_bytes(good[: len(good) // 2])  # a half-written file (e.g. copied badly)
    with pytest.raises(CacheError, match="incomplete or corrupt"):
        ensure_features(cfg, data, [1, 2], data.train_indices)
    profile.run(cfg, data)
    with FeatureCache(prof.features) as cache:
        assert cache.n == len(data.train.labels)


def test_changed_teacher_invalidates_cache(tmp_path):
    cfg = tiny_config(tmp_path, "teacher_train.epochs=1", "profile.layers=[1,2,3,4]")
    data = load_data(cfg.dataset)
    prof = profile.run(cfg, data)
    with FeatureCache(prof.features) as cache:
        old_sha = cache.meta["teacher_sha256"]
    # Replace the teacher's weights: the cache must be refused, then rebuilt.
    path = artifacts.teacher_dir(cfg, data) / "teacher.pt"
    state = torch.load(path, weights_only=True)
    state["best"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state["best"].items()}
    torch.save(state, path)
    new_sha = load_teacher(cfg, data, torch.device("cpu"))[1]
    with FeatureCache(prof.features) as cache, pytest.raises(CacheError, match="teacher_sha256"):
        cache.check({"teacher_sha256": new_sha}, rebuild_hint="make profile")
    # Stage 2 refuses the stale cache and names the field and the command that rebuilds it...
    with pytest.raises(CacheError, match="teacher_sha256.*make profile"):
        ensure_features(cfg, data, [1, 2], data.train_indices)
    # ...which rebuilds the features and the Q table for the new checkpoint.
    profile.run(cfg, data)
    with FeatureCache(prof.features) as cache:
        assert cache.meta["teacher_sha256"] == new_sha != old_sha


class _Interrupt(Exception):
    pass


def test_resume_gives_the_same_result(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "method.name=ce", "train.epochs=3")
    full = distill.run(cfg, seeds=[0])[0].dir
    reference = pd.read_csv(full / "metrics.csv")
    import shutil

    shutil.rmtree(full.parent)
    import common.train.loop as train_mod

    real = train_mod.evaluate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # die in epoch 2, after epoch 1's checkpoint
            raise _Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", flaky)
    with pytest.raises(_Interrupt):
        distill.run(cfg, seeds=[0])
    assert (full / "checkpoint.pt").exists() and not (full / "done").exists()
    monkeypatch.setattr(train_mod, "evaluate", real)
    calls["n"] = 0
    monkeypatch.setattr(train_mod, "evaluate", flaky)
    with pytest.raises(_Interrupt):  # --restart starts over: it dies again in its epoch 2
        distill.run(cfg, seeds=[0], restart=True)
    assert torch.load(full / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(train_mod, "evaluate", real)
    distill.run(cfg, seeds=[0])
    resumed = pd.read_csv(full / "metrics.csv")
    cols = ["epoch", "train_loss", "train_acc", "test_acc", "lr"]
    pd.testing.assert_frame_equal(resumed[cols], reference[cols])


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    data = load_data(cfg.dataset)

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(28 * 28, 10)
            self.steps = 0

        def forward(self, x, y, feats, logits, step=None):
            self.steps += 1
            out = self.lin(x.flatten(1))
            loss = torch.nn.functional.cross_entropy(out, y)
            if self.steps > 6:  # epoch 2 (6 steps per epoch)
                loss = loss * float("nan")
            return out, {"ce": loss}

        def forward_eval(self, x):
            return self.lin(x.flatten(1))

    with pytest.raises(TrainingError, match="not finite.*epoch 2.*epoch 1"):
        fit(Exploding(), data, cfg.train, tmp_path / "run", lr=0.01, train_indices=data.train_indices)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_one2one_needs_equal_layer_counts(profiled):
    _, cfg, data, _ = profiled
    from common.methods import resolve_method

    cfg2 = load_config(None, [f"dataset.root={cfg.dataset.root}", "teacher.name=resnet18", "method.name=ours", "method.student_layers=[1,2]", "profile.layers=[1,2,3]"])
    with pytest.raises(ConfigError, match="one-to-one"):
        distill.resolve_layer_lists(cfg2, resolve_method(cfg2.method), data)


def test_two_processes_share_one_teacher(tmp_path):
    """Two shell loops started at once on pairs that share a teacher train and profile it once."""
    cfg = tiny_config(tmp_path, "teacher_train.epochs=1")
    args = [
        sys.executable, "stage2_distill.py", "--quiet", f"dataset.root={cfg.dataset.root}", f"artifacts={cfg.artifacts}",
        "teacher.name=resnet18", "teacher.width=0.125", "student.width=0.125", "teacher_train.epochs=1",
        "teacher_train.batch_size=32", "train.epochs=1", "train.batch_size=32", "profile.subset_size=100",
        "profile.per_class_cap=10", "method.name=ours",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(args + [f"student.name={student}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for student in ("resnet9", "vgg11")
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    text = "\n".join(logs)
    assert text.count("teacher resnet18: training") == 1 and text.count("skipping training") >= 1
    assert text.count("step quality_subset_a") == 1  # S/I/E/Q ran once
    data = load_data(cfg.dataset)
    assert len(pd.read_csv(artifacts.teacher_dir(cfg, data) / "metrics.csv")) == 1


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_stage(script, list(args), timeout=120)


@pytest.mark.parametrize("script", ["stage1_profile_teacher.py", "stage2_distill.py", "stage3_evaluate.py"])
def test_scripts_have_help(script):
    out = _cli(script, "--help")
    assert out.returncode == 0 and "usage" in out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["stage2_distill.py", "--student", "resnet99"], ["unknown model 'resnet99'"]),
        (["stage2_distill.py", "train.epoch=3"], ["unknown config key 'train.epoch'"]),
        (["stage2_distill.py", "--method", "ourz"], ["unknown method 'ourz'"]),
        (["stage1_profile_teacher.py", "dataset.root=/nonexistent", "--list-layers"], ["/nonexistent"]),
        (["stage2_distill.py", "method.teacher_layers=[3,7,13,99]"], ["teacher layer 99 is out of range", "--list-layers"]),
        (["stage2_distill.py", "method.student_layers=[1,2]"], ["one-to-one"]),
    ],
)
def test_bad_input_is_one_line_error(args, words, tmp_path):
    out = _cli(*args, f"--artifacts={tmp_path}")
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("teacher, student", [("vit_b", "vit_ett"), ("vgg19", "vgg11"), ("resnet34", "mobilenetv2")])
@pytest.mark.parametrize("method", ["ours", "simkd", "semckd"])
def test_paper_pairs_run_through_all_stages(tmp_path_factory, teacher, student, method):
    """Every teacher/student pair of the paper distils end to end (tiny widths, one epoch)."""
    tmp = tmp_path_factory.getbasetemp() / f"pair_{teacher}_{student}"  # shared by the methods of a pair
    cfg = tiny_config(
        tmp, f"teacher.name={teacher}", f"student.name={student}", "teacher.width=0.125", "student.width=0.125",
        "teacher_train.epochs=1", "train.epochs=1", f"method.name={method}",
    )
    result = distill.run(cfg, seeds=[0])[0]
    metrics = pd.read_csv(result.dir / "metrics.csv")
    assert (result.dir / "done").exists() and len(metrics) == 1
    assert metrics["train_loss"].notna().all() and 0 <= metrics["test_acc"].iloc[0] <= 100
    resolved = yaml.safe_load((result.dir / "config.yaml").read_text())
    assert len(resolved["run"]["teacher_layers"]) == 4 and len(resolved["run"]["student_layers"]) == 4


def test_explicit_layer_lists_keep_their_order(profiled):
    """One-to-one pairs in the order given, so a reversed map is expressible (and hashed apart)."""
    _, cfg, data, _ = profiled
    from common.methods import resolve_method

    cfg2 = load_config(None, [f"dataset.root={cfg.dataset.root}", "teacher.name=resnet18", "method.name=ours", "method.teacher_layers=[4,3,-2,1]", "method.student_layers=[5,4,2,1]"])
    teacher_layers, student_layers = distill.resolve_layer_lists(cfg2, resolve_method(cfg2.method), data)
    n_teacher = len(list_layers(cfg2, data))
    assert teacher_layers == [4, 3, n_teacher - 2, 1] and student_layers == [5, 4, 2, 1]


def test_the_ce_baseline_does_not_check_profile_settings_it_never_uses(tmp_path):
    """subset A of 1 image per class is refused for a method that profiles the teacher, but the
    CE student never reads the teacher, so the same settings train it."""
    bad_profile = ["profile.subset_size=10", "train.epochs=1"]
    with pytest.raises(ConfigError, match="profile.subset_size=10"):
        distill.run(tiny_config(tmp_path, "method.name=ours", *bad_profile), seeds=[0])
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("teacher.pt"))
    (result,) = distill.run(tiny_config(tmp_path, "method.name=ce", *bad_profile), seeds=[0])
    assert (result.dir / "done").exists()


def test_methods_that_read_no_profile_are_not_refused_over_its_settings(profiled, caplog):
    """kd takes the teacher's logits, no layers: subset A of 1 image per class (refused for ours,
    above) must not stop it, and it prints no empty layer pairing. Its log is not a terminal
    (pytest captures stderr), as on a cluster: progress lines replace the bar there."""
    tmp, *_ = profiled
    caplog.set_level("INFO", logger="kd")
    cfg = tiny_config(
        tmp, "method.name=kd", "train.teacher_source=live", "profile.subset_size=10", "train.epochs=1",
        "train.log_interval_s=1e-9",  # train.progress=false (--quiet) as in tiny_config: the bar only
    )
    assert not sys.stderr.isatty()
    (result,) = distill.run(cfg, seeds=[0])
    assert (result.dir / "done").exists()
    assert "teacher layers" not in caplog.text
    lines = [r.getMessage() for r in caplog.records if "kd s0 epoch 1/1: batch" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == [f"kd s0 epoch 1/1: batch {i}/6" for i in range(1, 7)]  # 200 images, batches of 32
    assert all(" img/s, loss " in line and ", ETA " in line for line in lines)
    # runtime only: the same run with another interval is the finished one
    (again,) = distill.run(tiny_config(tmp, "method.name=kd", "train.teacher_source=live", "train.epochs=1", "train.log_interval_s=5"), seeds=[0])
    assert again.skipped and again.dir == result.dir


def test_layer_settings_are_refused_before_the_data_is_read(tmp_path, monkeypatch):
    """profile.k and the layer lists need only the dataset's shape, which fashion_mnist's registry
    entry knows: their errors must not wait for the files (ImageNet's listing takes minutes)."""
    cfg_k, cfg_layers = (tiny_config(tmp_path, extra) for extra in ("profile.k=99", "method.teacher_layers=[99]"))

    def no_data(*_args):
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr("common.checks.load_data", no_data)
    with pytest.raises(ConfigError, match="profile.k=99"):
        distill.run(cfg_k, seeds=[0])
    with pytest.raises(ConfigError, match="teacher layer"):
        distill.run(cfg_layers, seeds=[0])
    with pytest.raises(ConfigError, match="profile.k=99"):
        profile_checks(cfg_k)


def profile_checks(cfg: Config) -> None:
    from common.checks import load_data_checked

    load_data_checked(cfg)


def test_a_batch_larger_than_the_training_subset_is_refused_before_any_training(tmp_path):
    """It was found at the student's first epoch, after the teacher's whole training."""
    cfg = tiny_config(tmp_path, "method.name=kd", "train.train_subset=20")
    with pytest.raises(ConfigError, match="lower train.batch_size or raise train.train_subset"):
        distill.run(cfg, seeds=[0])
    assert not any((tmp_path / "artifacts").rglob("*.pt"))
