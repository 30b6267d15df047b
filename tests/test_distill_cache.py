"""Teacher-output cache: exact contents, fingerprint invalidation, disk files, refusal with augmentation."""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchslim.models as models
from torchslim.distill import (
    DistillConfig,
    DistillObjective,
    HintConfig,
    KDConfig,
    TeacherCache,
    cache_teacher_outputs,
    distill,
    fingerprint,
)
from torchslim.errors import ConfigError, DataError, ModelError
from torchslim.train import TrainConfig


@pytest.fixture
def teacher():
    torch.manual_seed(3)
    return models.create("fmnist_student", input_size=8, num_classes=4, width=6, fc=12).eval()


def test_fp32_cache_returns_exactly_what_the_teacher_computes(teacher, blobs):
    cache = cache_teacher_outputs(teacher, blobs, cache_format="fp32", layers=["features"], batch_size=1024)
    index = torch.tensor([5, 0, 200, 5, 31])
    with torch.no_grad():
        expected = teacher(blobs.x)
        expected_features = teacher.features(blobs.x)
    got = cache.lookup(index)
    assert torch.equal(got["logits"], expected[index])
    assert torch.equal(got["features"], expected_features[index])
    assert cache.num_samples == len(blobs.y) and cache.num_classes == 4


def test_fp16_and_topk_caches_keep_the_teacher_distribution(teacher, blobs):
    with torch.no_grad():
        expected = teacher(blobs.x)
    index = torch.arange(len(blobs.y))
    fp16 = cache_teacher_outputs(teacher, blobs, cache_format="fp16").lookup(index)["logits"]
    shifted = expected - expected.max(1, keepdim=True).values
    assert torch.allclose(fp16, shifted, atol=2e-3, rtol=1e-3)  # shifted so the largest is 0
    for temperature in (1.0, 4.0):
        assert torch.allclose(F.softmax(fp16 / temperature, 1), F.softmax(expected / temperature, 1), atol=1e-3)

    topk = cache_teacher_outputs(teacher, blobs, cache_format="topk", top_k=2).lookup(index)["logits"]
    p_true, p_cached = F.softmax(expected, 1), F.softmax(topk, 1)
    kept = expected.topk(2, 1).indices
    assert torch.allclose(p_cached.gather(1, kept), p_true.gather(1, kept), atol=2e-3)
    # the other classes share the rest of the mass equally
    rest = p_cached.scatter(1, kept, 0.0)
    assert torch.allclose(rest.sum(1), 1 - p_true.gather(1, kept).sum(1), atol=2e-3)
    assert torch.allclose(rest[rest > 0].view(-1, 2)[:, 0], rest[rest > 0].view(-1, 2)[:, 1])
    with pytest.raises(ConfigError, match="cache_top_k"):
        cache_teacher_outputs(teacher, blobs, cache_format="topk", top_k=4)


def test_fingerprint_changes_with_teacher_weights_data_and_settings(teacher, blobs):
    base = fingerprint(teacher, blobs.x)
    assert fingerprint(teacher, blobs.x) == base
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.classifier[-1].bias[0] += 1e-3
    assert fingerprint(changed, blobs.x) != base
    bn = copy.deepcopy(teacher)
    bn.features[1].running_mean[0] += 1e-3  # buffers count too
    assert fingerprint(bn, blobs.x) != base
    x = blobs.x.clone()
    x[7, 0, 0, 0] += 1e-3
    assert fingerprint(teacher, x) != base
    assert fingerprint(teacher, blobs.x, cache_format="fp32") != base
    assert fingerprint(teacher, blobs.x, layers=["features"]) != base


def test_cache_is_invalidated_when_teacher_weights_change(teacher, blobs, tmp_path):
    first = cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path, cache_format="fp32")
    assert first.matches(teacher, blobs.x)
    assert len(list(tmp_path.glob("teacher-outputs-*.safetensors"))) == 1
    with torch.no_grad():
        teacher.classifier[-1].weight.mul_(2.0)
    assert not first.matches(teacher, blobs.x)
    second = cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path, cache_format="fp32")
    assert second.fingerprint != first.fingerprint
    with torch.no_grad():
        assert torch.equal(second.lookup(torch.arange(4))["logits"], teacher(blobs.x[:4]))
    assert len(list(tmp_path.glob("teacher-outputs-*.safetensors"))) == 2
    # a cache built before the change is refused by distill
    student = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    with pytest.raises(DataError, match="fingerprint does not match"):
        distill(student, teacher, blobs, KDConfig(), epochs=1, teacher_cache=first, progress=False)


def test_cache_files_round_trip_and_are_reused(teacher, blobs, tmp_path, monkeypatch):
    cache = cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path, layers=["features"])
    (path,) = tmp_path.glob("teacher-outputs-*.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded = TeacherCache.load(path)
    assert loaded.fingerprint == cache.fingerprint and loaded.layers == ("features",)
    assert all(torch.equal(loaded.tensors[k], cache.tensors[k]) for k in cache.tensors)

    def no_teacher_runs(*args, **kwargs):
        raise AssertionError("the teacher ran although a matching cache file exists")

    monkeypatch.setattr(TeacherCache, "_build", no_teacher_runs)
    again = cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path, layers=["features"])
    assert again.fingerprint == cache.fingerprint


def test_a_damaged_cache_file_is_rebuilt_with_a_warning(teacher, blobs, tmp_path):
    cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="not a readable torchslim teacher cache"):
        rebuilt = cache_teacher_outputs(teacher, blobs, cache_dir=tmp_path)
    assert TeacherCache.load(path).fingerprint == rebuilt.fingerprint


@dataclasses.dataclass
class AugmentedSplit:
    x: torch.Tensor
    y: torch.Tensor
    transform: object = "random_crop"


def test_random_augmentation_refuses_the_cache_or_runs_the_teacher_online(teacher, blobs):
    split = AugmentedSplit(blobs.x, blobs.y)
    with pytest.raises(DataError, match="random augmentation"):
        cache_teacher_outputs(teacher, split)
    student = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    with pytest.raises(DataError, match="teacher_outputs is 'cached' but .*random augmentation"):
        distill(student, teacher, split, DistillConfig(teacher_outputs="cached"), epochs=1, progress=False)
    records = distill(student, teacher, split, DistillConfig(teacher_outputs="auto"), epochs=1, progress=False)
    assert records[0]["teacher_outputs"] == "online"


def test_cached_distillation_trains_exactly_like_online(teacher, blobs):
    torch.manual_seed(0)
    init = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    trained = {}
    for mode in ("online", "cached"):
        student = copy.deepcopy(init)
        cfg = DistillConfig(logits=KDConfig(temperature=3.0, alpha=0.2), teacher_outputs=mode, cache_format="fp32")
        records = distill(student, teacher, blobs, cfg, TrainConfig(batch_size=32, lr=0.01), epochs=2,
                          progress=False, seed=4)
        assert records[-1]["teacher_outputs"] == mode
        trained[mode] = (student.state_dict(), records[-1]["train_kd_loss"])
    assert trained["cached"][1] == pytest.approx(trained["online"][1], rel=1e-5)
    for key, value in trained["online"][0].items():
        assert torch.allclose(trained["cached"][0][key].float(), value.float(), atol=1e-5), key


def test_objective_takes_the_index_from_the_loop_or_from_an_indexed_split(teacher, blobs):
    student = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    cache = cache_teacher_outputs(teacher, blobs, cache_format="fp32")
    online = DistillObjective(student, teacher, KDConfig())
    cached = DistillObjective(student, teacher, KDConfig(), teacher_cache=cache)
    idx = torch.tensor([3, 9, 100])
    x, y = blobs.x[idx], blobs.y[idx]
    expected = online(student, x, y)[1]["kd_loss"]
    assert cached(student, x, y, index=idx)[1]["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    split = cached.indexed(blobs)
    x2 = split.x[idx]  # what fit does: train.x[idx], then the objective call
    assert cached(student, x2, y)[1]["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(Exception, match="indices"):
        cached(student, x, y, index=idx[:2])
    fresh = DistillObjective(student, teacher, KDConfig(), teacher_cache=cache)
    with pytest.raises(Exception, match="sample indices"):
        fresh(student, x, y)


def test_cache_must_hold_the_hint_layers_and_a_nan_teacher_is_an_error(teacher, blobs):
    student = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    cache = cache_teacher_outputs(teacher, blobs)
    with pytest.raises(ModelError, match="no features for teacher layers"):
        DistillObjective(student, teacher, DistillConfig(hints=HintConfig()), example=blobs.x[:2], teacher_cache=cache)
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        broken.classifier[-1].bias[0] = float("nan")
    with pytest.raises(ModelError, match="NaN or Inf"):
        cache_teacher_outputs(broken, blobs)


def test_auto_runs_online_when_the_cache_would_be_too_big(teacher, blobs):
    student = models.create("fmnist_student", input_size=8, num_classes=4, width=4, fc=8)
    cfg = DistillConfig(hints=HintConfig(), cache_max_mb=0.01)  # features: 256 x 12x2x2 fp16 = 24 kB > 10 kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = distill(student, teacher, blobs, cfg, epochs=1, progress=False)
    assert records[0]["teacher_outputs"] == "online"
    records = distill(student, teacher, blobs, cfg.model_copy(update={"cache_max_mb": 1.0}), epochs=1, progress=False)
    assert records[0]["teacher_outputs"] == "cached"
