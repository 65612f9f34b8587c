"""`train.compile` (common/train/compiled.py): the setting, its modes, that it stays out of the run
key, that a failed build is one line, and one compiled run against the eager one.

torch.compile on the CPU takes tens of seconds per new graph, so only one end-to-end run is
compiled (a BatchNorm + Linear student, whose graph is small); the CUDA mode ("reduce-overhead",
CUDA graphs) cannot run here and is checked only as the mode chosen.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.artifacts import discovery
from common.artifacts import layout as artifacts
from common.config import load_config
from common.errors import ConfigError
from common.train.compiled import compile_errors, compile_mode

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
METRICS = ["train_loss", "loss_ce", "train_acc", "test_acc", "lr"]


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_the_setting_takes_auto_true_false(value, expected):
    cfg = load_config(None, [f"train.compile={value}", f"teacher_train.compile={value}"])  # validated as it loads
    assert cfg.train.compile == expected and cfg.teacher_train.compile == expected


@pytest.mark.parametrize("section", ["train", "teacher_train"])
def test_any_other_value_is_one_config_error(section):
    with pytest.raises(ConfigError, match=rf"^{section}.compile='maybe' is not allowed; use auto .*, true .* or false$"):
        load_config(None, [f"{section}.compile=maybe"])


def test_auto_is_off_everywhere_and_true_picks_the_devices_mode():
    # auto: off on the CPU (it did not pay) and on CUDA until a GPU measures it
    assert compile_mode("auto", CPU) is None and compile_mode("auto", CUDA) is None
    assert compile_mode(False, CPU) is None and compile_mode(False, CUDA) is None
    assert compile_mode(True, CPU) == "default"
    assert compile_mode(True, CUDA) == "reduce-overhead"  # CUDA graphs: the loop's shapes are static


def test_compile_is_not_part_of_the_run_key_or_the_regime():
    on, off = (load_config(None, [f"train.compile={v}", f"teacher_train.compile={v}"]) for v in ("true", "false"))
    default = load_config(None, [])
    assert artifacts._train_key(on.train) == artifacts._train_key(off.train) == artifacts._train_key(default.train)
    assert artifacts._train_key(on.teacher_train) == artifacts._train_key(default.teacher_train)  # the teacher's key too
    assert discovery.regime({"train": {"compile": True, "epochs": 5}}) == discovery.regime({"train": {"epochs": 5}})


def test_compile_errors_leave_the_models_own_errors_alone():
    """Only a failed build becomes a ConfigError (test_a_failed_build_stops_the_run_with_one_line)."""
    for mode in ("default", None):
        with pytest.raises(ValueError, match="the model's own"):
            with compile_errors(mode):
                raise ValueError("the model's own error")


def _fit(tmp: Path, compiled: bool, *extra: str) -> pd.DataFrame:
    """2 epochs of 15 steps: `ce` on a BatchNorm + Linear student, through the one loop."""
    from common.config import MethodConfig
    from common.data.registry import load_data
    from common.methods import build_distiller, resolve_method
    from common.train.loop import fit
    from tests.fakedata import make_fashion_mnist

    if not (tmp / "fmnist").exists():
        make_fashion_mnist(tmp / "fmnist", n_train=120, n_test=40, seed=0)
    cfg = load_config(None, [f"dataset.root={tmp / 'fmnist'}", "train.epochs=2", "train.batch_size=8", "train.progress=false",
                             "train.tracker=none", f"train.compile={str(compiled).lower()}", *extra])
    data = load_data(cfg.dataset)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(28 * 28), torch.nn.Linear(28 * 28, data.num_classes))
    ce = build_distiller(resolve_method(MethodConfig(name="ce")), student, num_classes=data.num_classes, input_shape=(1, 28, 28),
                         teacher_layers=[], student_layers=[], teacher_shapes={})
    run = tmp / f"run_{compiled}"
    fit(ce, data, cfg.train, run, lr=0.01, train_indices=data.train_indices, weights_of=student)
    return pd.read_csv(run / "metrics.csv")


def test_a_failed_build_stops_the_run_with_one_line(tmp_path):
    """No C++ compiler (the CPU's Inductor needs one): a ConfigError at the first step, no traceback."""
    import torch._inductor.config as inductor

    # torch's own config patch: monkeypatch would delete the setting on undo (a config class's
    # __dict__ does not hold it)
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",)}), pytest.raises(ConfigError) as caught:
        _fit(tmp_path, True)
    message = str(caught.value)
    assert "\n" not in message, message
    assert re.fullmatch(r"train.compile=true: torch.compile \(mode default\) could not build the training step "
                        r"\(InvalidCxxCompiler: No working C\+\+ compiler found .*\); .* or set train.compile=false", message), message


def test_a_compiled_run_has_the_eager_runs_metrics(tmp_path):
    """The one compiled run of the suite (its build is most of this test's time): the same
    numbers as eager, within float rounding (fused kernels add in another order)."""
    from torch._dynamo.utils import counters

    eager = _fit(tmp_path, False)
    counters.clear()
    compiled = _fit(tmp_path, True)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # it did run compiled
    for column in METRICS:
        assert compiled[column].tolist() == pytest.approx(eager[column].tolist(), rel=1e-4), column
