"""DKD and CRD math (common/methods/dkd_loss.py, crd_loss.py): golden values from the independent
numpy re-derivation in tests/golden/make_kd_baselines_golden.py, and properties."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.methods import losses as L
from common.errors import ConfigError
from common.methods import crd_loss as C
from common.methods import dkd_loss as D

GOLDEN = json.loads((Path(__file__).parent / "golden" / "kd_baselines.json").read_text())


def t(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=1e-10, atol=1e-12)


def dkd_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = GOLDEN[name]["inputs"]
    return t(inputs["logits_s"]), t(inputs["logits_t"]), torch.tensor(inputs["target"])


# ----------------------------------------------------------------------------- DKD golden


@pytest.mark.parametrize("name", ["dkd_random", "dkd_confident"])
def test_tckd_nckd_per_sample_golden(name):
    zs, zt, target = dkd_inputs(name)
    for T, expected in GOLDEN[name]["per_T"].items():
        close(D.tckd_per_sample(zs, zt, target, float(T)), expected["tckd_per_sample"])
        close(D.nckd_per_sample(zs, zt, target, float(T)), expected["nckd_per_sample"])


@pytest.mark.parametrize("name", ["dkd_random", "dkd_confident"])
def test_dkd_loss_golden(name):
    zs, zt, target = dkd_inputs(name)
    for case in GOLDEN[name]["dkd"]:
        close(D.tckd(zs, zt, target, case["T"]), case["tckd"])
        close(D.nckd(zs, zt, target, case["T"]), case["nckd"])
        close(D.dkd_loss(zs, zt, target, alpha=case["alpha"], beta=case["beta"], T=case["T"]), case["dkd"])


def test_dkd_loss_defaults_are_the_papers():
    zs, zt, target = dkd_inputs("dkd_random")
    (case,) = [c for c in GOLDEN["dkd_random"]["dkd"] if (c["alpha"], c["beta"], c["T"]) == (1.0, 8.0, 4.0)]
    close(D.dkd_loss(zs, zt, target), case["dkd"])


def test_dkd_warmup_golden():
    case = GOLDEN["dkd_warmup"]
    assert [D.dkd_warmup(e, w) for e, w in case["inputs"]] == pytest.approx(case["expected"], rel=1e-15)
    assert D.dkd_warmup(1) == pytest.approx(0.05)  # 1-based epochs: epoch 1 at 1/20, as mdistiller
    assert D.dkd_warmup(20) == 1.0 and D.dkd_warmup(19) < 1.0
    assert D.dkd_warmup(3, warmup=0) == 1.0


def test_dkd_warmup_rejects_negative_warmup():
    with pytest.raises(ConfigError, match="warm-up"):
        D.dkd_warmup(1, warmup=-1)


# ----------------------------------------------------------------------------- DKD properties


def test_dkd_of_identical_logits_is_zero():
    z = torch.randn(6, 10, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (6,))
    assert D.tckd(z, z.clone(), target, 4.0).abs() < 1e-15
    assert D.nckd(z, z.clone(), target, 4.0).abs() < 1e-15
    assert D.dkd_loss(z, z.clone(), target).abs() < 1e-15
    # and it is not zero otherwise (the test above could not pass by returning 0)
    assert D.dkd_loss(z, z.flip(1), target) > 1e-3


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_is_tckd_plus_one_minus_pt_times_nckd(T):
    """DKD paper: KD = TCKD + (1 - p_t^T) NCKD per sample (all three with the same T^2)."""
    zs = torch.randn(8, 12, dtype=torch.float64) * 2
    zt = torch.randn(8, 12, dtype=torch.float64) * 5
    target = torch.randint(0, 12, (8,))
    p_t = torch.softmax(zt / T, dim=1).gather(1, target[:, None]).squeeze(1)
    decomposed = D.tckd_per_sample(zs, zt, target, T) + (1 - p_t) * D.nckd_per_sample(zs, zt, target, T)
    kd_per_sample = torch.stack([L.kd_loss(zs[i : i + 1], zt[i : i + 1], T) for i in range(8)]) * T**2
    torch.testing.assert_close(decomposed, kd_per_sample, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(decomposed.mean(), L.kd_loss(zs, zt, T) * T**2, rtol=1e-11, atol=1e-13)


def test_kd_decomposition_golden():
    """The same identity on the independent golden numbers (a check of the generator too)."""
    for name in ("dkd_random", "dkd_confident"):
        for terms in GOLDEN[name]["per_T"].values():
            lhs = t(terms["tckd_per_sample"]) + (1 - t(terms["p_target_teacher"])) * t(terms["nckd_per_sample"])
            close(lhs, terms["kd_per_sample"])


def test_dkd_gradients_reach_the_student_only():
    zs = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    D.dkd_loss(zs, zt, target).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    # each sample's logits sum to a constant gradient of 0 (softmax is shift-invariant)
    torch.testing.assert_close(zs.grad.sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_nckd_ignores_the_target_logits():
    zs = torch.randn(4, 6, dtype=torch.float64)
    zt = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 3, 5, 2])
    moved_s, moved_t = zs.clone(), zt.clone()
    moved_s[torch.arange(4), target] += 7.0
    moved_t[torch.arange(4), target] -= 5.0
    close(D.nckd(moved_s, moved_t, target, 4.0), D.nckd(zs, zt, target, 4.0).item())
    assert (D.tckd(moved_s, moved_t, target, 4.0) - D.tckd(zs, zt, target, 4.0)).abs() > 1e-3


def test_dkd_low_precision_inputs_are_computed_in_float32():
    zs, zt = torch.randn(4, 10), torch.randn(4, 10) * 3
    target = torch.randint(0, 10, (4,))
    value = D.dkd_loss(zs.bfloat16(), zt.bfloat16(), target)
    assert value.dtype == torch.float32
    reference = D.dkd_loss(zs.bfloat16().float(), zt.bfloat16().float(), target)
    torch.testing.assert_close(value, reference)


def test_dkd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="target"):
        D.dkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="alike"):
        D.dkd_loss(torch.randn(4, 5), torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_dkd_beta_table():
    assert D.dkd_beta("cifar:resnet32x4", "cifar:resnet8x4") == 8.0
    assert D.dkd_beta("resnet56", "resnet20") == 2.0
    assert D.dkd_beta("vgg13", "vgg8") == 6.0
    assert D.dkd_beta("resnet9", "resnet18") == D.DKD_BETA_DEFAULT
    from common.models.cifar import ZOO

    assert {name for pair in D.DKD_BETA for name in pair} <= set(ZOO)  # names as in the zoo


# ----------------------------------------------------------------------------- CRD golden


@pytest.mark.parametrize("name", ["nce_loss", "nce_loss_confident"])
def test_nce_loss_golden(name):
    case = GOLDEN[name]
    close(C.nce_loss(t(case["inputs"]["x"]), case["inputs"]["n_data"]), case["expected"])


def crd_from_golden() -> tuple[C.CRDLoss, dict, list]:
    inputs, expected = GOLDEN["crd_two_steps"]["inputs"], GOLDEN["crd_two_steps"]["expected"]
    crd = C.CRDLoss(
        inputs["s_dim"], inputs["t_dim"], inputs["n_data"], feat_dim=inputs["feat_dim"],
        n_negatives=inputs["n_negatives"], T=inputs["T"], momentum=inputs["momentum"],
    ).double()
    with torch.no_grad():
        crd.embed_s.linear.weight.copy_(t(inputs["embed_s_weight"]))
        crd.embed_s.linear.bias.copy_(t(inputs["embed_s_bias"]))
        crd.embed_t.linear.weight.copy_(t(inputs["embed_t_weight"]))
        crd.embed_t.linear.bias.copy_(t(inputs["embed_t_bias"]))
        crd.memory.memory_student.copy_(t(inputs["memory_student"]))
        crd.memory.memory_teacher.copy_(t(inputs["memory_teacher"]))
    return crd, inputs, expected


def test_crd_loss_two_steps_golden():
    """Embedding, scores, Z from the first batch only, NCE on both sides, momentum update."""
    crd, inputs, expected = crd_from_golden()
    for step, want in zip(inputs["steps"], expected):
        args = t(step["f_s"]), t(step["f_t"]), torch.tensor(step["idx"]), torch.tensor(step["contrast_idx"])
        close(crd.embed_s(args[0]), want["e_s"])
        close(crd.embed_t(args[1]), want["e_t"])
        close(crd(*args), want["loss"])
        close(crd.memory.z, want["z"])
        close(crd.memory.memory_student, want["memory_student"])
        close(crd.memory.memory_teacher, want["memory_teacher"])


def test_contrast_memory_scores_golden():
    crd, inputs, expected = crd_from_golden()
    for step, want in zip(inputs["steps"], expected):
        out_s, out_t = crd.memory(t(want["e_s"]), t(want["e_t"]), torch.tensor(step["idx"]), torch.tensor(step["contrast_idx"]))
        close(out_s, want["out_s"])
        close(out_t, want["out_t"])
        close(C.nce_loss(out_s, inputs["n_data"]), want["loss_s"])
        close(C.nce_loss(out_t, inputs["n_data"]), want["loss_t"])


def test_golden_negatives_come_from_other_classes():
    inputs = GOLDEN["crd_two_steps"]["inputs"]
    labels = inputs["labels"]
    for step in inputs["steps"]:
        for row in step["contrast_idx"]:
            assert all(labels[j] != labels[row[0]] for j in row[1:])


# ----------------------------------------------------------------------------- CRD properties


def test_memory_init_range_and_buffers():
    memory = C.ContrastMemory(feat_dim=12, n_data=300, n_negatives=5, generator=torch.Generator().manual_seed(1))
    stdv = 1 / math.sqrt(12 / 3)
    for bank in (memory.memory_student, memory.memory_teacher):
        assert bank.shape == (300, 12)
        assert bank.min() >= -stdv and bank.max() <= stdv
        assert bank.min() < -0.9 * stdv and bank.max() > 0.9 * stdv  # the whole range, not a corner
    assert not torch.equal(memory.memory_student, memory.memory_teacher)
    assert torch.equal(memory.z, torch.tensor([-1.0, -1.0]))
    assert {"memory_student", "memory_teacher", "z"} <= set(memory.state_dict())
    again = C.ContrastMemory(feat_dim=12, n_data=300, n_negatives=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(memory.memory_student, again.memory_student)


def test_memory_rows_stay_unit_norm_and_others_untouched():
    memory = C.ContrastMemory(feat_dim=8, n_data=40, n_negatives=6, momentum=0.25).double()
    before_s, before_t = memory.memory_student.clone(), memory.memory_teacher.clone()
    idx = torch.tensor([3, 17, 25, 39])
    e_s = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    e_t = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    contrast_idx = C.sample_negatives(idx, None, 6, torch.Generator().manual_seed(0), n_data=40)
    memory(e_s, e_t, idx, contrast_idx)
    for bank, before in ((memory.memory_student, before_s), (memory.memory_teacher, before_t)):
        torch.testing.assert_close(bank[idx].norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        rest = torch.ones(40, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(bank[rest], before[rest])
        assert not torch.equal(bank[idx], before[idx])
    # the student bank moved towards the student embeddings (RepDistiller memory_v1 <- v1)
    expected = 0.25 * before_s[idx] + 0.75 * e_s
    torch.testing.assert_close(memory.memory_student[idx], expected / expected.norm(dim=1, keepdim=True))


def test_z_is_set_once():
    memory = C.ContrastMemory(feat_dim=4, n_data=20, n_negatives=3).double()
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        idx = torch.randperm(20, generator=gen)[:5]
        e = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
        memory(e, e.flip(0), idx, C.sample_negatives(idx, None, 3, gen, n_data=20))
        if step == 0:
            z = memory.z.clone()
            assert (z > 0).all()
    assert torch.equal(memory.z, z)


def test_crd_gradients_reach_student_and_both_embeddings_not_teacher_features():
    crd = C.CRDLoss(s_dim=6, t_dim=9, n_data=30, feat_dim=5, n_negatives=4)
    f_s = torch.randn(4, 6, requires_grad=True)
    f_t = torch.randn(4, 9, requires_grad=True)
    idx = torch.tensor([0, 5, 11, 29])
    crd(f_s, f_t, idx, generator=torch.Generator().manual_seed(0)).backward()
    assert f_t.grad is None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for p in (*crd.embed_s.parameters(), *crd.embed_t.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in crd.buffers())


def test_crd_loss_decreases_on_a_toy_problem():
    """A linear student learns to match fixed teacher features of 32 samples through CRD alone."""
    torch.manual_seed(3)
    n_data, batch = 32, 8
    x = torch.randn(n_data, 10)
    teacher_features = torch.randn(n_data, 12)
    labels = torch.arange(n_data) % 4
    student = torch.nn.Linear(10, 6)
    crd = C.CRDLoss(s_dim=6, t_dim=12, n_data=n_data, feat_dim=8, n_negatives=8, T=0.1)
    optimiser = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    epoch_losses = []
    for _ in range(25):
        total = 0.0
        for idx in torch.randperm(n_data, generator=gen).split(batch):
            contrast_idx = C.sample_negatives(idx, labels, 8, gen)
            loss = crd(student(x[idx]), teacher_features[idx], idx, contrast_idx)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        epoch_losses.append(total / (n_data // batch))
    assert all(math.isfinite(v) for v in epoch_losses)
    assert sum(epoch_losses[-5:]) / 5 < 0.8 * sum(epoch_losses[1:6]) / 5, epoch_losses


def test_contrast_memory_runs_float32_under_autocast():
    crd = C.CRDLoss(s_dim=6, t_dim=6, n_data=30, feat_dim=5, n_negatives=4)
    idx = torch.tensor([1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd(torch.randn(3, 6), torch.randn(3, 6), idx, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert crd.memory.memory_student.dtype == torch.float32


def test_contrast_memory_rejects_a_wrong_contrast_idx_width():
    memory = C.ContrastMemory(feat_dim=4, n_data=20, n_negatives=3)
    e = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    with pytest.raises(ValueError, match="contrast_idx"):
        memory(e, e, torch.tensor([0, 1]), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_negatives": 0}, "negative"), ({"T": 0.0}, "temperature"), ({"momentum": 1.0}, "momentum"), ({"n_data": 1}, "samples")],
)
def test_contrast_memory_bad_settings(kwargs, match):
    settings = {"feat_dim": 4, "n_data": 20, "n_negatives": 3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        C.ContrastMemory(**settings)


# ----------------------------------------------------------------------------- negatives


def test_sample_negatives_from_other_classes():
    labels = torch.arange(60) % 5
    idx = torch.tensor([0, 7, 13, 59, 22])
    out = C.sample_negatives(idx, labels, 20, torch.Generator().manual_seed(0))
    assert out.shape == (5, 21) and out.dtype == torch.long
    assert torch.equal(out[:, 0], idx)
    assert (labels[out[:, 1:]] != labels[idx][:, None]).all()
    for row in out[:, 1:]:
        assert row.unique().numel() == 20  # without replacement while the pool (48) is large enough
    again = C.sample_negatives(idx, labels, 20, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = C.sample_negatives(idx, labels, 20, torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_sample_negatives_with_replacement_past_the_pool():
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = C.sample_negatives(torch.tensor([2]), labels, 7, torch.Generator().manual_seed(0))
    assert set(out[0, 1:].tolist()) <= {0, 1}  # only the two samples of the other class


def test_sample_negatives_uniform_without_labels():
    idx = torch.tensor([4, 9])
    out = C.sample_negatives(idx, None, 500, torch.Generator().manual_seed(0), n_data=10)
    assert torch.equal(out[:, 0], idx)
    assert out.min() >= 0 and out.max() < 10
    assert out[:, 1:].unique().numel() == 10  # all of the dataset, the positive's index too


def test_sample_negatives_bad_inputs():
    with pytest.raises(ConfigError, match="two classes"):
        C.sample_negatives(torch.tensor([0]), torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="at least 1 negative"):
        C.sample_negatives(torch.tensor([0]), None, 0, n_data=5)
    with pytest.raises(ValueError, match="labels or n_data"):
        C.sample_negatives(torch.tensor([0]), None, 3)


def test_sample_negatives_mixes_both_draws_by_the_rows_class():
    labels = torch.tensor([0] * 30 + [1] * 3)  # class 0's pool (3) is below 10 negatives, class 1's (30) is not
    idx = torch.tensor([0, 31, 5, 32])
    out = C.sample_negatives(idx, labels, 10, torch.Generator().manual_seed(0))
    for row, anchor in zip(out[:, 1:], labels[idx].tolist()):
        assert (labels[row] != anchor).all()
        assert row.unique().numel() == (3 if anchor == 0 else 10)  # with replacement past the pool only


@pytest.mark.parametrize("k", [4, 20])  # a pool of 8: without replacement, and with it
def test_sample_negatives_is_uniform_over_the_other_classes_rows(k):
    labels = torch.arange(12) % 3  # classes interleaved: the draw must not rely on sorted labels
    sampler = C.NegativeSampler(labels, k)
    gen = torch.Generator().manual_seed(0)
    idx = torch.zeros(2000, dtype=torch.long)  # class 0: its pool is the 8 rows of classes 1 and 2
    counts = torch.bincount(sampler(idx, gen)[:, 1:].flatten(), minlength=12)
    assert counts[labels == 0].sum() == 0
    expected = 2000 * k / 8
    assert ((counts[labels != 0] - expected).abs() < 0.1 * expected).all(), counts.tolist()


def test_a_crd_step_reads_nothing_back_from_the_device():
    """issue 19: the sampler and the memory (Z set once) need no host read per batch."""
    from tests.test_syncs import HostSyncCounter

    labels = torch.arange(40) % 4
    # each kind of draw: without replacement, with it (35 > the pool of 30), uniform
    samplers = [C.NegativeSampler(labels, 8), C.NegativeSampler(labels, 35), C.NegativeSampler(None, 8, n_data=40)]
    f_s, f_t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    with HostSyncCounter() as counter:
        for sampler in samplers:
            crd = C.CRDLoss(s_dim=6, t_dim=6, n_data=40, feat_dim=5, n_negatives=sampler.n_negatives)
            for _ in range(2):  # the first batch sets Z, the second keeps it
                idx = torch.randint(40, (4,))
                crd(f_s, f_t, idx, sampler(idx)).backward()
    assert counter.count == 0, dict(counter.where)


# ----------------------------------------------------------------------------- the presets, through the one loop


def _tiny_pair():
    from tests.test_methods import INPUT, NUM_CLASSES, TEACHER_SHAPES, toy_student, toy_teacher

    return INPUT, NUM_CLASSES, TEACHER_SHAPES, toy_student, toy_teacher


@pytest.mark.parametrize("epoch, factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (35, 1.0)])
def test_dkd_preset_is_ce_plus_the_warmed_up_dkd_term(epoch, factor):
    from common.config import MethodConfig
    from common.methods import build_distiller, resolve_method
    from common.methods.base import Step

    INPUT, N, _, toy_student, toy_teacher = _tiny_pair()
    spec = resolve_method(MethodConfig(name="dkd"))
    assert (spec.ce_weight, spec.kd_weight, spec.kd_temperature, spec.dkd_alpha, spec.dkd_warmup) == (1.0, 1.0, 4.0, 1.0, 20)
    torch.manual_seed(0)
    distiller = build_distiller(spec, toy_student(), num_classes=N, input_shape=INPUT, teacher_layers=[], student_layers=[], teacher_shapes={})
    images, labels, t_logits = torch.randn(8, *INPUT), torch.randint(0, N, (8,)), torch.randn(8, N)
    logits, losses = distiller.forward_train(images, labels, {}, t_logits, Step(torch.arange(8), epoch))
    assert set(losses) == {"ce", "dkd"}
    expected = factor * D.dkd_loss(logits, t_logits, labels, alpha=1.0, beta=D.DKD_BETA_DEFAULT, T=4.0)
    torch.testing.assert_close(losses["dkd"], expected)
    torch.testing.assert_close(losses["ce"], torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="step="):
        distiller.forward_train(images, labels, {}, t_logits)


@pytest.mark.parametrize("teacher, student, beta", [("cifar:resnet32x4", "cifar:resnet8x4", 8.0), ("cifar:vgg13", "cifar:vgg8", 6.0),
                                                    ("cifar:resnet56", "cifar:resnet20", 2.0), ("resnet34", "resnet9", 8.0)])
def test_dkd_beta_is_the_papers_for_the_pair_unless_set(teacher, student, beta):
    from common.config import load_config
    from common.methods import resolve_run_method

    cfg = load_config(None, ["method.name=dkd", f"teacher.name={teacher}", f"student.name={student}"])
    assert resolve_run_method(cfg).dkd_beta == beta
    cfg = load_config(None, ["method.name=dkd", f"teacher.name={teacher}", f"student.name={student}", "method.dkd_beta=3"])
    assert resolve_run_method(cfg).dkd_beta == 3.0
    assert resolve_run_method(load_config(None, ["method.name=kd"])).dkd_beta is None  # untouched for other methods


@pytest.mark.parametrize("key, value, match", [("dkd_warmup", "-1", "integer >= 0"), ("dkd_beta", "-2", "finite number"),
                                               ("crd_negatives", "0", "integer >= 1"), ("kd_standardize", "true", "does not apply to dkd")])
def test_bad_dkd_and_crd_values_are_one_config_error(key, value, match):
    from common.config import load_config
    from common.methods import resolve_method

    method = "crd" if key.startswith("crd") else "dkd"
    with pytest.raises(ConfigError, match=match):
        resolve_method(load_config(None, [f"method.name={method}", f"method.{key}={value}"]).method)


def test_crd_preset_embeds_the_penultimate_pair_and_updates_its_bank_rows():
    from common.config import MethodConfig
    from common.layers.hooks import extract
    from common.methods import build_distiller, resolve_method
    from common.methods.base import Step

    INPUT, N, SHAPES, toy_student, toy_teacher = _tiny_pair()
    spec = resolve_method(MethodConfig(name="crd", crd_negatives=6))
    assert (spec.ce_weight, spec.feature_weight, spec.kd_weight, spec.teacher_layers, spec.student_layers) == (1.0, 0.8, 0.0, (-1,), (-1,))
    assert resolve_method(MethodConfig(name="crd+kd")).kd_weight == 16.0  # RepDistiller's -a 1 on a T^2-scaled KL
    torch.manual_seed(0)
    teacher = toy_teacher().eval()
    rows = torch.arange(10, 50)  # a training subset: the bank has one entry per row of it
    labels_all = torch.arange(60) % N
    distiller = build_distiller(spec, toy_student(), num_classes=N, input_shape=INPUT, teacher_layers=[4], student_layers=[3],
                                teacher_shapes=SHAPES, train_rows=rows, train_labels=labels_all)
    memory = distiller.feature_term.loss.memory
    assert memory.memory_student.shape == (40, 128)
    batch = rows[[0, 5, 7, 20]]
    images = torch.randn(4, *INPUT)
    with torch.no_grad():
        features = extract(teacher, images, [4])
    before = memory.memory_student.clone()
    _, losses = distiller.forward_train(images, labels_all[batch], features, None, Step(batch, 1))
    assert set(losses) == {"ce", "feat"} and torch.isfinite(losses["feat"]) and losses["feat"] > 0
    changed = (memory.memory_student != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 5, 7, 20]  # bank positions of the batch's rows, nothing else
    distiller.check_rows(rows)  # the loop's check at setup, once per run: the rows the bank was built for pass
    with pytest.raises(ValueError, match=r"2 batch row\(s\) outside the training rows .*\(e.g. row 0\)"):
        distiller.check_rows(torch.tensor([0, 1, 10, 11]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 60\), got 10..60"):
        distiller.check_rows(torch.tensor([10, 60]))
    with pytest.raises(ConfigError, match="one layer pair"):
        build_distiller(spec, toy_student(), num_classes=N, input_shape=INPUT, teacher_layers=[3, 4], student_layers=[2, 3],
                        teacher_shapes=SHAPES, train_rows=rows, train_labels=labels_all)


@pytest.mark.stages
@pytest.mark.parametrize("method", ["dkd", "crd"])
def test_dkd_and_crd_train_through_stage_2(tmp_path_factory, method):
    """The one loop hands each method its step: a tiny stage-2 run of each, twice the same numbers."""
    import pandas as pd
    import yaml

    from common import distill
    from tests.test_pipeline import tiny_config

    tmp = tmp_path_factory.getbasetemp() / "kd_baselines_stage2"  # one teacher for both methods
    cfg = tiny_config(tmp, f"method.name={method}", "method.crd_negatives=32", "train.train_subset=100")
    result = distill.run(cfg, seeds=[0])[0]
    metrics = pd.read_csv(result.dir / "metrics.csv")
    assert (result.dir / "done").exists() and len(metrics) == 2
    term = "loss_dkd" if method == "dkd" else "loss_feat"
    assert metrics[term].gt(0).all() and metrics["loss_ce"].gt(0).all()
    resolved = yaml.safe_load((result.dir / "config.yaml").read_text())
    if method == "dkd":
        assert resolved["method"]["dkd_beta"] == 8.0 and resolved["run"]["teacher_layers"] == []
        # warm-up: epoch 2 weighs the DKD term twice epoch 1's (2/20 vs 1/20), for similar raw values
        assert metrics["loss_dkd"].iloc[1] > metrics["loss_dkd"].iloc[0]
    else:
        from common.data import load_data
        from common.layers.tables import layer_infos_for

        data = load_data(cfg.dataset)
        n_teacher, n_student = (len(layer_infos_for(m, data)) for m in (cfg.teacher, cfg.student))
        # the penultimate features: the last generalized layer of each, the vector the head reads
        assert resolved["run"]["teacher_layers"] == [n_teacher - 1] and resolved["run"]["student_layers"] == [n_student - 1]
