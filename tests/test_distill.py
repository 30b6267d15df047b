import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from torchslim.distill import KDConfig, KDObjective, distill, hinton_loss, kd_loss
from torchslim.errors import ConfigError, ModelError
from torchslim.train import TrainConfig


def _softmax(xs):
    m = max(xs)
    e = [math.exp(v - m) for v in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computed_value():
    s, t, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0
    p_t = _softmax([v / T for v in t])
    p_s = _softmax([v / T for v in s])
    expected = T * T * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_soft_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = F.softmax(t / T, 1)
    soft_ce = -(p_t * F.log_softmax(s / T, 1)).sum(1).mean()
    entropy = -(p_t * F.log_softmax(t / T, 1)).sum(1).mean()
    assert kd_loss(s, t, T).item() == pytest.approx((T * T * (soft_ce - entropy)).item(), rel=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_and_batch_mean():
    t = torch.randn(4, 5)
    assert kd_loss(t.clone(), t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # batch-mean: duplicating the batch does not change the value
    s = torch.randn(4, 5)
    assert kd_loss(torch.cat([s, s]), torch.cat([t, t]), 4.0).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-6)


def test_hinton_loss_weights_its_parts():
    torch.manual_seed(1)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    parts = hinton_loss(s, t, y, temperature=4.0, alpha=0.3)
    assert parts["task_loss"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.3 * parts["task_loss"].item() + 0.7 * parts["kd_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"alpha": -0.1}, {"alpha": 1.5}, {"temperature": 0.0}, {"temperature": -2}])
def test_kd_config_validates(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        KDConfig(**bad)


def test_teacher_is_frozen_and_warned_about(tiny_cnn):
    import copy

    teacher = copy.deepcopy(tiny_cnn).train()
    with pytest.warns(UserWarning, match="train mode"):
        KDObjective(teacher, KDConfig())
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_output_size_mismatch_is_a_clear_error(tiny_cnn, blobs):
    import torchslim.models as models

    teacher = models.create("fmnist_student", input_size=8, num_classes=3, width=4, fc=8).eval()
    objective = KDObjective(teacher, KDConfig())
    with pytest.raises(ModelError, match="same classes"):
        objective(tiny_cnn, blobs.x[:4], blobs.y[:4])


def test_distill_logs_loss_parts_and_improves_the_student(tiny_cnn, blobs):
    import copy

    import torchslim.models as models
    from torchslim.train import evaluate, fit

    torch.manual_seed(1)
    teacher = models.create("fmnist_student", input_size=8, num_classes=4, width=8, fc=16)
    fit(teacher, blobs, TrainConfig(epochs=3, lr=0.01, batch_size=32), progress=False)
    student = copy.deepcopy(tiny_cnn)
    before = evaluate(student, blobs)["accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = distill(student, teacher, blobs, KDConfig(temperature=2.0, alpha=0.5),
                          TrainConfig(lr=0.01, batch_size=32), epochs=3, progress=False)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("train_loss", "train_task_loss", "train_kd_loss"):
        assert all(math.isfinite(r[key]) for r in records)
    assert evaluate(student, blobs)["accuracy"] > before


def test_logit_defaults_are_the_robustness_benchmarks_choice():
    # benchmarks/robustness.py (see benchmarks/README.md): T = 4, alpha = 0.1 and DKD's beta = 8 left
    # small students below the same student trained alone at 1-3 epochs; KD at T = 2 left MLPs below
    # it after 10 epochs (third round), T = 1 did not; DKD at T = 4 did too, at T = 1 it ended above it.
    from torchslim.distill import DKDConfig

    assert (KDConfig().temperature, KDConfig().alpha) == (1.0, 0.5)
    assert (DKDConfig().temperature, DKDConfig().tckd_weight, DKDConfig().nckd_weight) == (1.0, 1.0, 1.0)


def test_dkd_warm_up_ramps_the_kd_terms_along_the_epochs_fit_reports():
    from torchslim.distill import DKDConfig, DistillObjective
    from torchslim.train import fit
    from torchslim.data import TensorSplit

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with DistillObjective(student, teacher, DKDConfig(warmup_epochs=2.0)) as objective:
        _, full = objective(student, x, y)  # outside fit: the full weights
        assert full["loss"].item() == pytest.approx((full["task_loss"] + full["tckd_loss"] + full["nckd_loss"]).item())
        objective.begin_step(0.5)
        _, quarter = objective(student, x, y)
        kd = quarter["tckd_loss"] + quarter["nckd_loss"]
        assert quarter["loss"].item() == pytest.approx((quarter["task_loss"] + 0.25 * kd).item())
        objective.begin_step(3.0)
        assert objective(student, x, y)[1]["loss"].item() == pytest.approx(full["loss"].item())

    seen = []

    class Recording(DistillObjective):
        def begin_step(self, epochs_done):
            seen.append(epochs_done)
            super().begin_step(epochs_done)

    train = TensorSplit(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    with Recording(student, teacher, DKDConfig()) as objective:
        fit(student, train, TrainConfig(epochs=2, batch_size=4), objective=objective, progress=False)
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0])
