"""Stage 1 -> stage 2 hand-over: the manifest is read, not re-derived; keys follow dependencies;
the feature cache holds the students' rows and grows on demand."""
from __future__ import annotations

import pytest
import torch
import yaml

from common import distill
from common.artifacts import layout as artifacts
from common.profile import runner as profile
from common.cache.reader import FeatureCache
from common.data.registry import load_data
from common.errors import CacheError
from common.layers.tables import layer_shapes
from common.profile.features import ensure_features, features_path
from common.profile.manifest import load_manifest
from common.profile.stats import q_subsets
from tests.test_pipeline import tiny_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    base = ("teacher_train.epochs=1", "train.epochs=1", "train.train_subset=60")
    cfg = tiny_config(tmp, *base)
    return tmp, base, cfg, load_data(cfg.dataset)


def _run_layers(result) -> list[int]:
    return yaml.safe_load((result.dir / "config.yaml").read_text())["run"]["teacher_layers"]


@pytest.mark.stages
def test_manifest_lists_every_criterion_and_the_cache(workspace):
    _, _, cfg, data = workspace
    manifest = profile.run(cfg, data).manifest
    content = yaml.safe_load((manifest.dir / "profile.yaml").read_text())
    assert content == manifest.data
    assert [layer["index"] for layer in content["layers"]] == list(range(10))
    assert {"S", "I", "E", "Q", "sqrtIE"} <= set(content["layers"][0]) and content["layers"][0]["shape"]
    assert set(content["top_k"]) == {"k", "Q", "S", "I", "E", "sqrtIE"} and content["top_k"]["k"] == 4
    assert content["selection"]["layers"] == content["top_k"]["Q"]
    assert content["teacher"]["sha256"] and content["dataset"]["fingerprint"] == data.fingerprint
    assert manifest.features.exists() and content["features"]["rows"] == 60
    assert set(content["features"]["layers"]) >= set(content["selection"]["layers"])


@pytest.mark.stages
def test_profile_criterion_is_the_one_criterion_stage2_uses(workspace):
    tmp, base, _, data = workspace
    cfg = tiny_config(tmp, *base, "profile.criterion=S", "method.name=ours")
    result = distill.run(cfg, seeds=[0])[0]
    manifest = load_manifest(cfg, data)
    assert manifest.selected == manifest.data["top_k"]["S"] == _run_layers(result)
    assert yaml.safe_load((manifest.dir / "selection.yaml").read_text())["layers"] == _run_layers(result)
    # the ablation preset names its criterion and takes the same profile's top-k by it
    cfg_e = tiny_config(tmp, *base, "method.name=ours_e")
    assert _run_layers(distill.run(cfg_e, seeds=[0])[0]) == load_manifest(cfg_e, data).data["top_k"]["E"]


@pytest.mark.stages
def test_changing_k_reselects_without_recomputing_or_invalidating_runs(workspace):
    tmp, base, cfg, data = workspace
    profile.run(cfg, data)
    stats = artifacts.quality_dir(cfg, data) / "layer_stats.csv"
    before = stats.stat().st_mtime_ns
    finished = {}
    for method in ("ce", "kd"):
        finished[method] = distill.run(tiny_config(tmp, *base, f"method.name={method}"), seeds=[0])[0].dir
    cfg3 = tiny_config(tmp, *base, "profile.k=3", "method.student_layers=[1,2,3]")
    prof3 = profile.run(cfg3, data)
    assert stats.stat().st_mtime_ns == before  # S/I/E/Q not recomputed
    assert prof3.dir != artifacts.profile_dir(cfg, data) and len(prof3.selected) == 3
    for method in ("ce", "kd"):
        again = distill.run(tiny_config(tmp, *base, "profile.k=3", f"method.name={method}"), seeds=[0])[0]
        assert again.skipped and again.dir == finished[method]


@pytest.mark.stages
def test_feature_cache_holds_the_training_rows_and_grows_on_demand(workspace):
    tmp, base, cfg, data = workspace
    profile.run(cfg, data)
    path = features_path(cfg, data)
    rows60 = data.training_subset(60, cfg.dataset.split_seed)
    with FeatureCache(path) as cache:
        assert torch.equal(cache.positions.sort().values, rows60)
        assert not torch.equal(cache.positions, rows60)  # stored shuffled (disk blocks mix classes)
        outside = next(i for i in range(len(data.train.labels)) if i not in set(rows60.tolist()))
        with pytest.raises(CacheError, match=f"no row for training position {outside}"):
            cache.gather("labels", torch.tensor([outside]))
        assert torch.equal(cache.gather("labels", rows60.flip(0)), data.train.labels[rows60.flip(0)])
    # a student on more rows extends the cache; the old rows keep their values
    rows120 = data.training_subset(120, cfg.dataset.split_seed)
    with FeatureCache(path) as cache:
        old = cache.gather("logits", rows60)
    ensure_features(cfg, data, [1, 2], rows120)
    with FeatureCache(path) as cache:
        assert cache.covers(rows120) and cache.covers(rows60)
        torch.testing.assert_close(cache.gather("logits", rows60), old)
        assert {1, 2} <= set(cache.meta["layers"])


@pytest.mark.stages
def test_activations_are_written_only_on_request_and_hold_subset_a(workspace):
    tmp, base, cfg, data = workspace
    profile.run(cfg, data)
    assert not (artifacts.quality_dir(cfg, data) / "activations.h5").exists()
    kept = tiny_config(tmp, *base, "profile.keep_activations=true", "profile.seed=1")
    profile.run(kept, data)
    subset_a, _ = q_subsets(kept, data)
    with FeatureCache(artifacts.quality_dir(kept, data) / "activations.h5") as acts:
        assert torch.equal(acts.positions, subset_a) and len(acts.meta["layers"]) == 10
        assert acts.shape("layer_0") == tuple(layer_shapes(kept, data)[0])


def test_the_artifact_layout_reads_back_what_it_builds(tmp_path):
    """artifacts.iter_variants / iter_teachers invert run_dir / teacher_dir (one home for the layout)."""
    from common.artifacts import layout as artifacts
    from common.config import load_config

    cfg = load_config(None, [f"artifacts={tmp_path}", "teacher.name=resnet34", "student.name=mobilenetv2"])

    class FakeData:
        fingerprint = "f" * 16

    method = {"name": "ours+ce"}
    for seed in (2, 0):
        d = artifacts.run_dir(cfg, FakeData(), method, {"layers": [1], "cache_dtype": "float16"}, seed)
        d.mkdir(parents=True)
    tdir = artifacts.teacher_dir(cfg, FakeData())
    tdir.mkdir(parents=True)
    (tdir / "config.yaml").write_text("{}\n")
    (variant,) = list(artifacts.iter_variants(tmp_path))
    assert (variant.dataset, variant.teacher, variant.student, variant.method, variant.pair) == ("fashion_mnist", "resnet34", "mobilenetv2", "ours+ce", "resnet34__mobilenetv2")
    assert variant.run_hash == artifacts.run_hash(cfg, FakeData(), method, {"layers": [1], "cache_dtype": "float16"})
    assert list(variant.seed_dirs()) == [0, 2]
    (teacher,) = list(artifacts.iter_teachers(tmp_path))
    assert (teacher.teacher, teacher.teacher_id, teacher.dir) == ("resnet34", artifacts.teacher_id(cfg, FakeData()), tdir)
    assert artifacts.split_hashed("ours+ce-abc12345") == ("ours+ce", "abc12345") and artifacts.split_pair("resnet34") is None
