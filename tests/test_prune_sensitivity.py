"""Sensitivity analysis, per-layer allocation, report helpers, and the docstring examples."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.prune import (
    AGPSchedule,
    IterativeSchedule,
    MagnitudePruning,
    SensitivityConfig,
    SensitivityResult,
    UnstructuredPruning,
    describe_pruning,
    layer_sparsity,
    masked_layers,
    prune_,
    pruning_summary,
    sensitivity_analysis,
    sparsity_table,
)
from torchslim.train import TrainConfig, fit


@pytest.fixture
def trained_cnn(tiny_cnn, blobs):
    fit(tiny_cnn, blobs, TrainConfig(epochs=2, batch_size=32, lr=0.01), progress=False)
    return tiny_cnn


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("premasked", [False, True])
def test_sensitivity_analysis_leaves_the_model_unchanged(trained_cnn, blobs, premasked):
    if premasked:
        prune_(trained_cnn, UnstructuredPruning(sparsity=0.3))
    trained_cnn.train()
    before = _state(trained_cnn)
    params = [id(p) for p in trained_cnn.parameters()]
    trained_cnn.eval()
    out = trained_cnn(blobs.x[:8])
    trained_cnn.train()
    result = sensitivity_analysis(trained_cnn, blobs, SensitivityConfig(sparsities=[0.5, 0.9, 0.99]))
    assert trained_cnn.training
    after = trained_cnn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in trained_cnn.parameters()] == params
    for _, module in masked_layers(trained_cnn):
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)  # cached weight refreshed
    trained_cnn.eval()
    assert torch.equal(trained_cnn(blobs.x[:8]), out)
    assert list(result.layers) == ["features.0", "features.4", "classifier.0", "classifier.2"]
    assert all(len(v["accuracy"]) == 3 for v in result.layers.values())


def test_sensitivity_drops_grow_with_sparsity_and_results_round_trip(trained_cnn, blobs, tmp_path):
    result = sensitivity_analysis(trained_cnn, blobs, SensitivityConfig(sparsities=[0.2, 0.95], max_samples=200))
    assert result.samples == 200
    worst = [v["accuracy"][-1] for v in result.layers.values()]
    assert min(worst) < result.baseline["accuracy"]
    data = json.loads(json.dumps(result.to_dict()))
    assert SensitivityResult.from_dict(data) == result
    table = result.table()
    assert "| features.0 |" in table and "95%" in table
    png = result.plot(tmp_path / "sens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sens.png"]  # no temporary file left behind


def test_sensitivity_with_taylor_needs_data_and_uses_it(trained_cnn, blobs):
    cfg = SensitivityConfig(sparsities=[0.5], pruning=UnstructuredPruning(criterion="taylor", taylor_batches=2))
    with pytest.raises(ConfigError, match="needs data"):
        sensitivity_analysis(trained_cnn, blobs, cfg)
    result = sensitivity_analysis(trained_cnn, blobs, cfg, data=blobs)
    assert result.criterion == "taylor"


def _result():
    # "robust" loses nothing up to 90%; "fragile" loses accuracy fast.
    return SensitivityResult("l1", [0.5, 0.7, 0.9], {"accuracy": 0.9, "loss": 0.3}, {
        "robust": {"numel": 1000, "accuracy": [0.9, 0.9, 0.9], "loss": [0.3] * 3},
        "middle": {"numel": 600, "accuracy": [0.9, 0.88, 0.8], "loss": [0.3] * 3},
        "fragile": {"numel": 400, "accuracy": [0.85, 0.7, 0.4], "loss": [0.3] * 3},
    }, samples=100, min_kept=1)


@pytest.mark.parametrize("target", [0.3, 0.6, 0.75, 0.95])
def test_allocation_prunes_robust_layers_more_and_hits_the_target_exactly(target):
    result = _result()
    sparsities = result.layer_sparsities(target)
    zeros = {n: round(s * result.layers[n]["numel"]) for n, s in sparsities.items()}
    assert sum(zeros.values()) == round(target * 2000)
    assert sparsities["robust"] >= sparsities["middle"] >= sparsities["fragile"]
    assert all(0 <= s < 1 for s in sparsities.values())


def test_allocation_feeds_a_pruning_config(trained_cnn, blobs):
    result = sensitivity_analysis(trained_cnn, blobs, SensitivityConfig(sparsities=[0.3, 0.6, 0.9]))
    cfg = result.pruning_config(0.7)
    prune_(trained_cnn, cfg)
    stats = layer_sparsity(trained_cnn, masked_layers(trained_cnn))
    total = sum(s["total"] for s in stats.values())
    assert sum(s["zeros"] for s in stats.values()) == round(0.7 * total)


def test_sensitivity_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="sparsities: .*strictly increasing"):
        SensitivityConfig(sparsities=[0.5, 0.3])
    with pytest.raises(ConfigError, match="sparsities: .*in \\(0, 1\\)"):
        SensitivityConfig(sparsities=[0.0])
    with pytest.raises(ConfigError, match="pruning must be set by 'sparsity'"):
        SensitivityConfig(pruning=UnstructuredPruning(n_m=(2, 4)))
    with pytest.raises(ConfigError, match="pruning.criterion: unknown criterion"):
        SensitivityConfig(pruning={"criterion": "nope"})


def test_describe_pruning_states_criterion_scope_and_schedule():
    one_shot = describe_pruning(MagnitudePruning(sparsity=0.9))
    assert "magnitude |w| (L1)" in one_shot and "90% sparsity ranked globally" in one_shot and "one-shot" in one_shot
    gradual = describe_pruning(UnstructuredPruning(criterion="taylor", sparsity=0.95, scope="layer",
                                                   exclude_first_last=True, overrides={"re:fc.*": None}),
                               AGPSchedule(final_sparsity=0.95, end_step=500, frequency=50))
    for text in ("Taylor", "in every layer", "first and last layers excluded", "re:fc.*=unpruned",
                 "AGP", "every 50 steps"):
        assert text in gradual
    iterative = describe_pruning(UnstructuredPruning(han_quality=1.5), IterativeSchedule(rounds=4, rewind_epoch=1))
    assert "Han et al." in iterative and "4 prune→retrain rounds" in iterative and "rewound" in iterative
    assert "2:4" in describe_pruning(UnstructuredPruning(n_m=(2, 4)))


def test_pruning_summary_has_table_and_numbers(tiny_mlp):
    cfg = UnstructuredPruning(sparsity=0.5)
    prune_(tiny_mlp, cfg)
    summary = pruning_summary(tiny_mlp, cfg)
    assert summary["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["table"].splitlines()[0] == "| layer | weights | zeros | sparsity |"
    assert "| **total** |" in summary["table"] and "classifier.2" in summary["table"]
    assert summary["table"] == sparsity_table(tiny_mlp)
    json.dumps(summary)


@pytest.mark.parametrize("module", [
    "importance", "masking", "unstructured", "api", "schedule", "iterative", "sensitivity", "report",
])
def test_docstring_examples_run(module):
    import importlib

    mod = importlib.import_module(f"torchslim.prune.{module}")
    torch.manual_seed(0)
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
