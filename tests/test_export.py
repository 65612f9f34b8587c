"""`make export`: ONNX and TorchScript students that match PyTorch, their costs, skip / redo, errors."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from common import cli, distill
from common.artifacts import discovery
from common.export import runner as export
from common.export import files as export_files
from common.export import record as export_record
from common.report import exports as export_tables
from common.export import latency
from common.report import tables
from common.config import load_config, to_dict
from common.data.registry import load_data
from common.errors import DataError, ExportError
from common.files import sha256_file
from common.models import create_model
from tests.fakedata import make_cifar10
from tests.test_pipeline import tiny_config

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

FAST = export.ExportSettings(threads=1, warmup=1, repeats=2, check_images=64)
OUTPUT_FILES = (export_record.ONNX_FILE, export_record.TORCHSCRIPT_FILE, export_record.RECORD_FILE)


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of a CNN counted by module hooks (not FlopCounterMode): per output element, a
    convolution does in_channels / groups * kh * kw multiply-adds, a linear layer in_features."""
    total = 0

    def conv(m, inputs, out):
        nonlocal total
        total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in hooks:
        h.remove()
    return total


def vit_macs(model: nn.Module, image_size: int, in_channels: int) -> int:
    """A ViT's MACs by formula: patch projection, per block QKV and output projections, QK^T and
    AV, the MLP; then the head."""
    conv = model.patch_embed.conv_proj
    patch, dim = conv.kernel_size[0], conv.out_channels
    grid = image_size // patch
    tokens = 1 + grid * grid
    block = model.encoder[0]
    mlp = block.mlp[0].out_features
    per_block = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp
    return grid * grid * dim * in_channels * patch * patch + len(model.encoder) * per_block + dim * model.head.out_features


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar10(root, n_train=50, n_test=20, seed=0)
    return root


def write_run(artifacts: Path, data_root: Path, student: str, *, method: str = "ce", seed: int = 0, width: float = 0.125,
              model: nn.Module | None = None, done: bool = True, variant: str = "abcdef12", dataset: str = "cifar10") -> Path:
    """A finished run directory as stage 2 writes it (config.yaml from a resolved config, student.pt,
    metrics.csv, done) for a CIFAR-shaped dataset, with random weights: every parameter and
    BatchNorm statistic moved off its initial value by noise of its own scale, so that a
    zero-initialised head cannot make a comparison vacuous. Also used by bench/bench_export.py."""
    cfg = load_config(None, [f"dataset.name={dataset}", f"dataset.root={data_root}", f"student.name={student}",
                             f"student.width={width}", "teacher.name=resnet18", f"artifacts={artifacts}"])
    if model is None:
        classes = {"cifar10": 10, "cifar100": 100}[dataset]
        model = create_model(student, num_classes=classes, in_channels=3, image_size=32, width=width)
        with torch.no_grad():
            for p in model.parameters():
                scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
                p.add_(torch.randn_like(p) * scale)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    run_dir = artifacts / dataset / f"resnet18__{student}" / f"{method}-{variant}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    resolved = {**to_dict(cfg), "seeds": [seed], "method": {"name": method}, "run": {"kind": "student", "method": method, "seed": seed}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"best": state, "last": state, "best_epoch": 1}, run_dir / "student.pt")
    (run_dir / "metrics.csv").write_text("epoch,test_acc,elapsed_s\n1,40.0,1.0\n")
    if done:
        (run_dir / "done").write_text("2025-01-01T00:00:00\n")
    return run_dir


def test_count_macs_of_known_layers():
    assert latency.count_macs(nn.Linear(5, 3), torch.randn(4, 5)) == 15  # batch 4 in, one image counted
    conv = nn.Conv2d(1, 2, 3)  # 6x6 -> 4x4: 2 * 16 outputs of 1 * 3 * 3 MACs each
    assert latency.count_macs(conv, torch.randn(2, 1, 6, 6)) == 288
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # 4 * 25 outputs of 9 MACs
    assert latency.count_macs(depthwise, torch.randn(1, 4, 5, 5)) == 900
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()  # T=3: QKV 3*8*24, out 3*8*8, QK^T + AV 2 * 3*3*8
    model = nn.Sequential()
    model.forward = lambda x: attention(x, x, x, need_weights=False)[0]
    assert latency.count_macs(model, torch.randn(1, 3, 8)) == 3 * 8 * 24 + 3 * 8 * 8 + 2 * 3 * 3 * 8
    assert latency.count_params(conv) == 2 * 9 + 2


def test_median_time_and_cpu():
    calls = []
    timing = latency.median_time(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= timing.q1_ms <= timing.median_ms <= timing.q3_ms
    assert latency.cpu_model() and latency.available_cores() >= 1


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One CE student trained by stage 2 for one epoch (the config.yaml and student.pt it writes), exported."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(tmp, "train.epochs=1", "method.name=ce")
    result = distill.run(cfg, seeds=[0])[0]
    results = export.export_all(Path(cfg.artifacts), settings=FAST)
    assert [r.dir for r in results] == [result.dir] and not results[0].skipped
    return cfg, result.dir


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exported_files_match_pytorch(real_run):
    cfg, run_dir = real_run
    data = load_data(cfg.dataset)
    model = create_model("resnet9", num_classes=10, in_channels=1, image_size=28, width=0.125)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True)["best"])
    model.eval()
    images = data.normalize(data.test.images[:7])
    with torch.no_grad():
        want = model(images)
    session = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "logits"
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch axis is dynamic
    for batch in (images[:1], images):
        got = session.run(None, {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, want[: len(batch)].numpy(), atol=1e-4, rtol=0)
    scripted = torch.jit.load(str(run_dir / "student.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(scripted(images[:1]), want[:1], atol=1e-4, rtol=0)
    proto = onnx.load(str(run_dir / "student.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == export_files.OPSET
    props = {p.key: p.value for p in proto.metadata_props}
    assert yaml.safe_load(props["input_mean"]) == pytest.approx(data.mean.tolist())


def test_record_has_every_field(real_run):
    cfg, run_dir = real_run
    record = yaml.safe_load((run_dir / "export.yaml").read_text())
    model = create_model("resnet9", num_classes=10, in_channels=1, image_size=28, width=0.125)
    assert record["format"] == export_record.FORMAT
    assert record["source"] == {"file": "student.pt", "sha256": sha256_file(run_dir / "student.pt"),
                                "bytes": (run_dir / "student.pt").stat().st_size, "weights": "best", "best_epoch": 1}
    assert record["student"] == {"name": "resnet9", "width": 0.125, "num_classes": 10, "in_channels": 1, "image_size": 28}
    assert record["input"]["shape"] == ["batch", 1, 28, 28] and len(record["input"]["std"]) == 1
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert record["macs_per_image"] == hook_macs(model, torch.zeros(1, 1, 28, 28)) > 0
    for section, name in (("onnx", "student.onnx"), ("torchscript", "student.torchscript.pt")):
        entry = record[section]
        assert entry["file"] == name and entry["bytes"] == (run_dir / name).stat().st_size > 0
        assert 0 <= entry["max_abs_diff"] <= 1e-4 and entry["top1_agreement"] == 1.0 and entry["images"] == 60
    assert record["onnx"]["opset"] == export_files.OPSET
    lat = record["latency"]
    assert lat["threads"] == 1 and lat["cpu"] and lat["repeats"] == 2 and lat["warmup"] == 1
    for batch in ("batch1", "batch64"):
        for runtime in ("onnxruntime", "pytorch"):
            t = lat[batch][runtime]
            assert 0 < t["q1"] <= t["median"] <= t["q3"]
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "code"} <= set(record["versions"])


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {name: (run_dir / name).stat().st_mtime_ns for name in OUTPUT_FILES}


def test_rerun_skips_and_new_weights_export_again(real_run):
    cfg, run_dir = real_run
    before = _mtimes(run_dir)
    results = export.export_all(Path(cfg.artifacts), settings=FAST)
    assert [r.skipped for r in results] == [True] and _mtimes(run_dir) == before
    saved = torch.load(run_dir / "student.pt", weights_only=True)
    saved["best"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in saved["best"].items()}
    torch.save(saved, run_dir / "student.pt")  # the run was redone
    assert not export_record.is_up_to_date(run_dir)
    results = export.export_all(Path(cfg.artifacts), settings=FAST)
    assert [r.skipped for r in results] == [False]
    after = _mtimes(run_dir)
    assert all(after[name] != before[name] for name in OUTPUT_FILES)
    assert export_record.read_record(run_dir)["source"]["sha256"] == sha256_file(run_dir / "student.pt")
    (run_dir / "student.onnx").rename(run_dir / "moved.onnx")  # a lost file is exported again too
    assert not export_record.is_up_to_date(run_dir)
    (run_dir / "moved.onnx").rename(run_dir / "student.onnx")
    assert export_record.is_up_to_date(run_dir)


# ----------------------------------------------------------------------------- registry students


@pytest.mark.parametrize("student", ["resnet9", "vgg11", "mobilenetv2", "vit_ett"])
def test_registry_students_export_and_match(tmp_path, cifar, student):
    run_dir = write_run(tmp_path / "artifacts", cifar, student)
    record = export.export_run(run_dir, FAST).record
    data = load_data(load_config(None, ["dataset.name=cifar10", f"dataset.root={cifar}"]).dataset)
    model = create_model(student, num_classes=10, in_channels=3, image_size=32, width=0.125)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True)["best"])
    model.eval()
    images = data.normalize(data.test.images)
    with torch.no_grad():
        want = model(images).numpy()
    assert np.abs(want).max() > 0.1  # a comparison that can fail
    got = ort.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert record["onnx"]["max_abs_diff"] <= 1e-4 and record["torchscript"]["max_abs_diff"] <= 1e-4
    expected = vit_macs(model, 32, 3) if student == "vit_ett" else hook_macs(model, images)
    assert record["macs_per_image"] == expected
    assert record["params"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- what is not exported


@torch.library.custom_op("kdtest::doubled", mutates_args=())
def _doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_doubled.register_fake
def _(x):
    return torch.empty_like(x)


class Doubled(nn.Module):
    """An op with no ONNX translation (a custom op registered with torch only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _doubled(x)


def test_unexportable_op_names_run_and_part(tmp_path, cifar, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Doubled()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    monkeypatch.setattr("common.models.create_model", lambda *a, **k: model)
    run_dir = write_run(tmp_path / "artifacts", cifar, "resnet9", model=model)
    with pytest.raises(ExportError) as info:
        export.export_run(run_dir, FAST)
    message = str(info.value)
    assert str(run_dir) in message and "part '1.1' (Doubled)" in message and "kdtest.doubled" in message
    assert "\n" not in message
    assert not any((run_dir / name).exists() for name in OUTPUT_FILES)
    assert not list(run_dir.glob(".*.tmp"))


def test_outputs_beyond_tolerance_are_an_error():
    reference = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    ok = export_files.agreement(reference + 1e-5, reference, 1e-3, "x")
    assert ok["max_abs_diff"] == pytest.approx(1e-5, rel=0.01) and ok["top1_agreement"] == 1.0
    with pytest.raises(ExportError, match="differ from PyTorch's by 0.5"):
        export_files.agreement(reference + torch.tensor([[0.0, 0.0], [0.0, 0.5]]), reference, 1e-3, "x")
    with pytest.raises(ExportError):
        export_files.agreement(reference * math.nan, reference, 1e-3, "x")


# ----------------------------------------------------------------------------- table and command line


def test_unfinished_runs_left_alone_and_the_export_table(tmp_path, cifar):
    artifacts = tmp_path / "artifacts"
    finished = [write_run(artifacts, cifar, "resnet9", seed=s) for s in (0, 1)]
    running = write_run(artifacts, cifar, "resnet9", seed=2, done=False)
    assert export_tables.write_export_tables(discovery.find_runs(artifacts), tmp_path / "reports") == ("", {})  # no empty table
    results = export.export_all(artifacts, settings=FAST)
    assert [r.dir for r in results] == finished
    assert not any((running / name).exists() for name in OUTPUT_FILES)
    with pytest.raises(DataError, match="not finished"):
        export.export_run(running, FAST)
    (running / "done").write_text("2025-01-01T00:00:00\n")  # finished after the export: not exported yet
    saved = torch.load(finished[1] / "student.pt", weights_only=True)
    torch.save(saved | {"best_epoch": 2}, finished[1] / "student.pt")  # redone since its export
    table = export_tables.export_table(discovery.find_runs(artifacts))
    assert dict(zip(table["seed"], table["export"])) == {0: "exported", 1: "stale", 2: "missing"}
    assert math.isnan(table.loc[table["seed"] == 2, "params"].iloc[0]) and str(running) in set(table["path"])
    summary = export_tables.export_summary(table)
    assert len(summary) == 1
    row = summary.iloc[0]
    record = export_record.read_record(finished[0])
    assert (row["n_exported"], row["n_runs"], row["params"]) == (1, 3, record["params"])
    assert row["ort_b1_ms"] == record["latency"]["batch1"]["onnxruntime"]["median"]
    accuracy = tables.accuracy_table(discovery.find_runs(artifacts))
    text = export_tables.export_markdown(summary, accuracy)
    header = text.splitlines()[0]
    for column in ["best (%)", "params (M)", "MMACs", "ONNX (MB)", "ORT b1 (ms)", "PyTorch b64 (ms)", "max diff ONNX"]:
        assert column in header
    assert "| 1/3 " in text and "40.00" in text and "1 threads" in text
    assert "best (%)" not in export_tables.export_markdown(summary)
    written, files = export_tables.write_export_tables(discovery.find_runs(artifacts), tmp_path / "reports", accuracy)
    assert written == text and (tmp_path / "reports" / "export.md").read_text() == text
    assert len(pd.read_csv(files["export.csv"])) == 1 and len(pd.read_csv(files["export_runs.csv"])) == 3


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(lambda: export.body(list(argv)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_prints_the_table_and_refuses_bad_input(real_run, tmp_path, capsys):
    cfg, _ = real_run
    artifacts = cfg.artifacts
    code, out, _ = _cli(capsys, "--artifacts", artifacts, "--pairs", "resnet18:resnet9", "--threads", "1")
    assert code == 0 and "resnet18 → resnet9" in out and "0 run(s) exported, 1 up to date" in out
    for argv, expected in [
        (["--artifacts", str(tmp_path / "nowhere")], "not found"),
        (["--artifacts", artifacts, "--threads", "0"], "--threads 0 must be at least 1"),
        (["--artifacts", artifacts, "--methods", "kd"], "no finished runs match the filters; finished datasets: fashion_mnist; pairs: resnet18:resnet9; methods: ce"),
        (["--artifacts", artifacts, "--bogus"], "unrecognized arguments"),
    ]:
        code, out, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
