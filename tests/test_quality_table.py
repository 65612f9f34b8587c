"""`quality_table`, the Python entry point for people who keep their own training code: the S/I/E/Q
table of a model on images and labels equals stage 1's quality.csv on the same data, from tensors
and from a DataLoader, and the package imports as `lfkd` beside a user's own `common`."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.data.registry import load_data
from common.errors import ConfigError, DataError
from common.profile import runner as profile
from common.profile.teacher import load_teacher
from common.quality import quality_table
from tests.stages import ENV, ROOT
from tests.test_pipeline import tiny_config

SETTINGS = dict(subset_size=100, per_class_cap=10, batch_size=64, memory_budget_mb=1)  # 1 MiB: the layers go in slices


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality_table")
    cfg = tiny_config(tmp, "teacher_train.epochs=1", "profile.memory_budget_mb=1", "profile.device=cpu", "teacher_train.device=cpu")
    data = load_data(cfg.dataset)
    result = profile.run(cfg, data)
    teacher, _ = load_teacher(cfg, data, torch.device("cpu"))
    assert torch.equal(data.train_indices, torch.arange(len(data.train.labels)))  # the pool is the whole split
    return result, teacher, data, cfg


def _same_as_stage1(table: pd.DataFrame, quality_csv: pd.DataFrame) -> None:
    stage1 = quality_csv.drop(columns=["baseline"])  # the registry's baseline list: not known for a user's model
    assert list(table.columns) == list(stage1.columns)
    assert list(table.pop("undefined")) == ["" if pd.isna(v) else v for v in stage1.pop("undefined")]  # the csv reads "" as NaN
    pd.testing.assert_frame_equal(table, stage1, check_exact=False, rtol=1e-12, check_dtype=False)


def test_the_table_from_tensors_equals_stage1s_quality_csv(stage1):
    result, teacher, data, cfg = stage1
    images = data.normalize(data.train.images)
    table = quality_table(teacher, images, data.train.labels, num_classes=data.num_classes, **SETTINGS)
    _same_as_stage1(table, pd.read_csv(result.dir / "quality.csv"))
    assert table.attrs["top_k"] == result.manifest.data["top_k"]
    assert list(table.loc[table.selected, "layer"]) == result.selected
    assert table["module"].iloc[0] == result.manifest.data["layers"][0]["module"]


def test_a_shuffled_dataloader_gives_the_same_table(stage1):
    result, teacher, data, cfg = stage1
    dataset = TensorDataset(data.normalize(data.train.images), data.train.labels)
    loader = DataLoader(dataset, batch_size=7, shuffle=True)  # read by index: the order does not matter
    teacher.train()
    table = quality_table(teacher, loader, num_classes=data.num_classes, **SETTINGS)
    assert teacher.training  # left in the mode it had
    teacher.eval()
    _same_as_stage1(table, pd.read_csv(result.dir / "quality.csv"))


def test_bad_input_is_one_clear_error(stage1):
    _, teacher, data, _ = stage1
    images = data.normalize(data.train.images[:40])
    with pytest.raises(DataError, match="labels must lie in"):
        quality_table(teacher, images, data.train.labels[:40] + 10, num_classes=10, subset_size=20, per_class_cap=2)
    with pytest.raises(DataError, match="39 labels for 40 images"):
        quality_table(teacher, images, data.train.labels[:39], num_classes=10)
    with pytest.raises(ConfigError, match="criterion is 'q'"):
        quality_table(teacher, images, data.train.labels[:40], num_classes=10, criterion="q")


def test_lfkd_imports_beside_a_users_own_common(tmp_path):
    # What `pip install -e .` sets up (pyproject.toml: lfkd -> common/), done by hand here: the
    # package found as `lfkd`, from a directory whose own `common/` comes first on the path.
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("MARK = 'theirs'\n")
    code = f"""
import importlib.util, json, sys
sys.path.insert(0, "")
spec = importlib.util.spec_from_file_location("lfkd", {str(ROOT / 'common' / '__init__.py')!r}, submodule_search_locations=[{str(ROOT / 'common')!r}])
lfkd = importlib.util.module_from_spec(spec); sys.modules["lfkd"] = lfkd; spec.loader.exec_module(lfkd)
import torch, common
from lfkd.quality import quality_table
from lfkd.models import create_model
model = create_model("resnet9", num_classes=2, in_channels=1, image_size=8, width=0.125)
x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1] * 4)
table = quality_table(model, x, y, num_classes=2, k=2, subset_size=4, per_class_cap=2)
from lfkd.alias import rewrite
ns = {{}}
exec(rewrite("import common.layers\\nimport importlib\\nnames = [common.layers.__name__, importlib.import_module('common.cache').__name__]", "<t>", "lfkd"), ns)
print(json.dumps([common.MARK, len(table), int(table.selected.sum()), sorted(m for m in sys.modules if m.split('.')[0] == 'common'), ns["names"]]))
"""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # the checkout is not on the path
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mark, n_layers, n_selected, loaded, rewritten = json.loads(out.stdout.splitlines()[-1])
    assert (mark, n_selected, loaded) == ("theirs", 2, ["common"]) and n_layers > 2
    assert rewritten == ["lfkd.layers", "lfkd.cache"]  # `import common.x` and module-path strings point at lfkd


def test_stage1_writes_the_selection_as_torchdistill_forward_hooks(stage1):
    import yaml
    from common.layers.hooks import extract
    from common.layers.tables import layer_infos_for
    from common.models import MODELS
    from tests.test_forward_hooks import torchdistill_outputs

    result, teacher, data, cfg = stage1
    hooks = yaml.safe_load((result.dir / "torchdistill_resnet9.yaml").read_text())
    quality = pd.read_csv(result.dir / "quality.csv")
    teacher_paths = hooks["teacher"]["forward_hook"]["output"]
    assert teacher_paths == list(quality.loc[quality.selected, "module"]) and hooks["teacher"]["forward_hook"]["input"] == []
    student_layers = list(MODELS.get("resnet9").baseline_layers)
    student_infos = layer_infos_for(cfg.student, data)
    assert hooks["student"]["forward_hook"]["output"] == [student_infos[i].path for i in student_layers]
    assert hooks["generalized_layers"] == {"teacher": result.selected, "student": student_layers}
    x = data.normalize(data.train.images[:4])
    ours = extract(teacher, x, result.selected)
    theirs = torchdistill_outputs(teacher, teacher_paths, x)
    assert all(torch.equal(theirs[path], ours[i]) for path, i in zip(teacher_paths, result.selected))
