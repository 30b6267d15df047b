"""KD, DKD, hint and attention losses: values on hand-made inputs, T² scaling, extreme temperatures."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchslim.distill import (
    DistillConfig,
    DKDConfig,
    KDConfig,
    attention_loss,
    attention_map,
    dkd_loss,
    hint_loss,
    kd_loss,
)
from torchslim.errors import ConfigError


def _softmax(xs):
    m = max(xs)
    e = [math.exp(v - m) for v in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def test_kd_loss_is_t_squared_times_soft_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    for temperature in (1.0, 4.0, 10.0):
        p_t = F.softmax(t.double() / temperature, 1)  # float64 reference: T² amplifies rounding
        soft_ce = -(p_t * F.log_softmax(s.double() / temperature, 1)).sum(1).mean()
        entropy = -(p_t * p_t.log()).sum(1).mean()
        expected = temperature**2 * (soft_ce - entropy)
        assert kd_loss(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_t_squared_keeps_the_gradient_magnitude_comparable_across_temperatures():
    torch.manual_seed(0)
    t = torch.randn(32, 10) * 3
    s0 = torch.randn(32, 10) * 3
    norms, unscaled = {}, {}
    for temperature in (2.0, 4.0, 8.0, 16.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temperature).backward()
        norms[temperature] = s.grad.norm().item()
        unscaled[temperature] = norms[temperature] / temperature**2
    assert max(norms.values()) / min(norms.values()) < 3.0
    # Without T², the gradient would shrink by ~T² (here a factor of ~64 from T=2 to T=16).
    assert unscaled[2.0] / unscaled[16.0] > 20.0


@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 1e3, 1e4])
def test_extreme_temperatures_stay_finite_and_correct(temperature):
    torch.manual_seed(0)
    s, t = (torch.randn(16, 10) * 5).requires_grad_(True), torch.randn(16, 10) * 5
    y = torch.randint(0, 10, (16,))
    loss = kd_loss(s, t, temperature)
    parts = dkd_loss(s, t, y, temperature)
    total = loss + parts["tckd_loss"] + parts["nckd_loss"]
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()
    assert loss.item() >= 0 and parts["tckd_loss"].item() >= -1e-6 and parts["nckd_loss"].item() >= -1e-6
    if temperature >= 1e3:
        # T -> inf: T^2 KL -> 1/2 mean_k of the squared centred logit difference.
        d = (t - s.detach()).double()
        limit = 0.5 * ((d - d.mean(1, keepdim=True)) ** 2).mean(1).mean()
        assert loss.item() == pytest.approx(limit.item(), rel=2e-2 if temperature == 1e3 else 2e-3)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), 1e9])
def test_temperatures_out_of_range_are_refused_by_the_functions(temperature):
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature)
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(s, s, torch.tensor([0, 1]), temperature)


@pytest.mark.parametrize("cls", [KDConfig, DKDConfig])
@pytest.mark.parametrize("temperature", [1e-4, 0.05, 101.0, 1e4])
def test_configs_refuse_extreme_temperatures_naming_the_field(cls, temperature):
    with pytest.raises(ConfigError, match="temperature"):
        cls(temperature=temperature)


def test_dkd_reduces_to_its_two_parts_on_hand_made_logits():
    s, t, T = [2.0, 0.5, -1.0, 0.0], [3.0, 1.0, 0.0, -2.0], 2.0
    label = 0
    p_s, p_t = _softmax([v / T for v in s]), _softmax([v / T for v in t])
    tckd = T * T * _kl([p_t[0], 1 - p_t[0]], [p_s[0], 1 - p_s[0]])
    hat_s, hat_t = _softmax([v / T for v in s[1:]]), _softmax([v / T for v in t[1:]])
    nckd = T * T * _kl(hat_t, hat_s)
    parts = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([label]), T)
    assert parts["tckd_loss"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd_loss"].item() == pytest.approx(nckd, rel=1e-5)
    # and Hinton KD is TCKD + (1 - p_t^target) NCKD
    kd = kd_loss(torch.tensor([s]), torch.tensor([t]), T).item()
    assert kd == pytest.approx(tckd + (1 - p_t[0]) * nckd, rel=1e-5)


def test_dkd_decomposition_holds_per_sample_on_random_logits():
    torch.manual_seed(0)
    s, t, y, T = torch.randn(8, 6), torch.randn(8, 6), torch.randint(0, 6, (8,)), 3.0
    for i in range(8):
        parts = dkd_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], T)
        p_target = F.softmax(t[i] / T, 0)[y[i]].item()
        expected = parts["tckd_loss"].item() + (1 - p_target) * parts["nckd_loss"].item()
        assert kd_loss(s[i:i + 1], t[i:i + 1], T).item() == pytest.approx(expected, rel=1e-4)


def test_dkd_parts_are_zero_when_student_equals_teacher():
    t = torch.randn(4, 5)
    parts = dkd_loss(t.clone(), t, torch.tensor([0, 1, 2, 3]), 4.0)
    assert parts["tckd_loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["nckd_loss"].item() == pytest.approx(0.0, abs=1e-5)


def test_hint_and_attention_losses():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert hint_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        hint_loss(a, b[:, :2])
    maps = attention_map(a)
    assert maps.shape == (2, 16) and torch.allclose(maps.norm(dim=1), torch.ones(2))
    # channel counts may differ; a map scaled by a constant has the same attention
    assert attention_loss(torch.cat([a, a], 1), 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_loss(a, b).item() > 0
    with pytest.raises(ValueError, match="spatial"):
        attention_loss(a, b[:, :, :2])


def test_describe_gives_the_report_method_temperature_and_weights():
    from torchslim.distill import AttentionConfig, HintConfig

    kd = DistillConfig(logits=KDConfig(temperature=4.0, alpha=0.1), hints=HintConfig(weight=0.5))
    assert kd.describe() == {
        "method": "kd+hints", "temperature": 4.0, "alpha": 0.1,
        "weights": {"task_loss": 0.1, "kd_loss": 0.9, "hint_loss": 0.5},
        "hint_layers": {"features": "features"}, "teacher_outputs": "auto",
    }
    dkd = DistillConfig(logits=DKDConfig(), attention=AttentionConfig())
    assert dkd.describe()["method"] == "dkd+attention" and "alpha" not in dkd.describe()
    assert dkd.weights() == {"task_loss": 1.0, "tckd_loss": 1.0, "nckd_loss": 1.0, "attention_loss": 1000.0}


def test_logits_config_is_picked_by_method_and_defaults_to_kd():
    assert isinstance(DistillConfig(logits={"temperature": 2.0}).logits, KDConfig)
    assert isinstance(DistillConfig(logits={"method": "dkd"}).logits, DKDConfig)
    with pytest.raises(ConfigError, match="logits.method must be 'kd' or 'dkd'"):
        DistillConfig(logits={"method": "fitnets"})
    with pytest.raises(ConfigError, match="beta: unknown key"):
        DistillConfig(logits={"method": "dkd", "beta": 8})


def test_at_t_1_a_confident_teachers_class_ranking_reaches_dkd_but_hardly_kd():
    # Why both defaults are T = 1 (benchmarks/README.md, robustness, third round): the shipped teacher
    # is nearly one-hot on its training samples. At T = 1 Hinton KD then weighs the other classes by
    # the teacher's doubt (~1e-4 here), while NCKD renormalizes over them and still sees the ranking.
    teacher = torch.tensor([[12.0, 3.0, 0.0, 0.0]])
    student = torch.tensor([[12.0, 0.0, 3.0, 0.0]])  # right class, other classes ranked the other way
    labels = torch.tensor([0])
    assert kd_loss(student, teacher, 1.0).item() < 1e-3
    assert dkd_loss(student, teacher, labels, 1.0)["nckd_loss"].item() > 1.0
