import copy
import os

import pytest
import torch

from torchslim.errors import TrainingError
from torchslim.train import TrainConfig, atomic_write_text, evaluate, fit, load_checkpoint
from torchslim.train.loop import epoch_permutation

CFG = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, schedule="cosine")


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_is_deterministic_for_a_seed(tiny_cnn, blobs):
    a, b = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    ha = fit(a, blobs, CFG, seed=3, progress=False)
    hb = fit(b, blobs, CFG, seed=3, progress=False)
    assert _same_weights(a, b)
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]


def test_training_learns_and_reports_each_epoch(tiny_cnn, blobs):
    history = fit(tiny_cnn, blobs, CFG, val=blobs, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] == pytest.approx(evaluate(tiny_cnn, blobs)["accuracy"])
    assert history[-1]["lr"] < CFG.lr  # cosine schedule moved


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_mlp, blobs, tmp_path):
    # dropout-free model is not enough: use the RNG too, via a dropout layer
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), tiny_mlp)
    straight = copy.deepcopy(model)
    fit(straight, blobs, CFG, seed=1, progress=False)

    ckpt = tmp_path / "stage.pt"

    class Crash(Exception):
        pass

    def crash_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Crash

    interrupted = copy.deepcopy(model)
    with pytest.raises(Crash):
        fit(interrupted, blobs, CFG, seed=1, checkpoint_path=ckpt, on_epoch_end=crash_after_epoch_2, progress=False)
    torch.manual_seed(12345)  # whatever happened to the RNG meanwhile must not matter
    resumed = copy.deepcopy(model)  # a fresh process would rebuild the model from scratch
    history = fit(resumed, blobs, CFG, seed=1, checkpoint_path=ckpt, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert _same_weights(resumed, straight)


def test_a_masked_fine_tune_resumes_on_its_flat_cosine_schedule(tiny_mlp, blobs, tmp_path):
    # flat_cosine is a LambdaLR over a callable object: its state must come back with the checkpoint.
    from torchslim.prune import UnstructuredPruning, prune_

    prune_(tiny_mlp, UnstructuredPruning(sparsity=0.5))
    config = TrainConfig(epochs=3, batch_size=16)
    straight = copy.deepcopy(tiny_mlp)
    rates = [r["lr"] for r in fit(straight, blobs, config, seed=1, progress=False)]
    assert rates[0] == pytest.approx(config.lr * 3) and rates[-1] == pytest.approx(0.0, abs=1e-12)

    class Crash(Exception):
        pass

    def crash_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Crash

    ckpt = tmp_path / "stage.pt"
    with pytest.raises(Crash):
        fit(copy.deepcopy(tiny_mlp), blobs, config, seed=1, checkpoint_path=ckpt, on_epoch_end=crash_after_epoch_2,
            progress=False)
    resumed = copy.deepcopy(tiny_mlp)
    history = fit(resumed, blobs, config, seed=1, checkpoint_path=ckpt, progress=False)
    assert [r["lr"] for r in history] == pytest.approx(rates)
    assert _same_weights(resumed, straight)


def test_nan_loss_stops_with_epoch_and_step(tiny_cnn, blobs):
    bad = copy.deepcopy(blobs)
    bad.x = bad.x.clone()
    bad.x[70] = float("nan")
    with pytest.raises(TrainingError, match=r"epoch 1, step \d+"):
        fit(tiny_cnn, bad, TrainConfig(epochs=1, batch_size=32), progress=False)


def test_checkpoint_from_another_model_is_refused(tiny_cnn, tiny_mlp, blobs, tmp_path):
    ckpt = tmp_path / "c.pt"
    fit(tiny_cnn, blobs, TrainConfig(epochs=1, batch_size=64), checkpoint_path=ckpt, progress=False)
    with pytest.raises(TrainingError, match="another model"):
        fit(tiny_mlp, blobs, TrainConfig(epochs=2, batch_size=64), checkpoint_path=ckpt, progress=False)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 2))
    assert not torch.equal(epoch_permutation(50, 1, 2), epoch_permutation(50, 1, 3))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.jsonl"
    atomic_write_text(target, "old\n")
    from torchslim.train import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(tiny_mlp, blobs, tmp_path):
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), tiny_mlp)
    straight = copy.deepcopy(model)
    straight_history = fit(straight, blobs, CFG, seed=2, progress=False)

    class Crash(Exception):
        pass

    def crash_at_step_13(step):
        if step == 13:  # 8 steps per epoch: global step 13 is epoch 2, step 5
            raise Crash

    ckpt = tmp_path / "mid.pt"
    with pytest.raises(Crash):
        fit(copy.deepcopy(model), blobs, CFG, seed=2, checkpoint_path=ckpt, checkpoint_every_steps=3,
            on_step_end=crash_at_step_13, progress=False)
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["step"]) == (1, 3)  # the last checkpoint: epoch 2, after its step 3
    resumed = copy.deepcopy(model)
    history = fit(resumed, blobs, CFG, seed=2, checkpoint_path=ckpt, progress=False)
    assert _same_weights(resumed, straight)
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in straight_history])


def test_ctrl_c_writes_a_checkpoint_and_resumes_exactly(tiny_mlp, blobs, tmp_path):
    import signal

    from torchslim.errors import TrainingInterrupted

    straight = copy.deepcopy(tiny_mlp)
    fit(straight, blobs, CFG, seed=4, progress=False)

    def press_ctrl_c(step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    ckpt = tmp_path / "int.pt"
    # Python's default handler, or SIG_IGN when the tests run in the background (nohup, cmd &)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 2"):
        fit(copy.deepcopy(tiny_mlp), blobs, CFG, seed=4, checkpoint_path=ckpt, on_step_end=press_ctrl_c,
            progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = copy.deepcopy(tiny_mlp)
    fit(resumed, blobs, CFG, seed=4, checkpoint_path=ckpt, progress=False)
    assert _same_weights(resumed, straight)


def test_objectives_that_ask_for_it_get_each_batchs_row_indices(tiny_mlp, blobs):
    seen = []

    class IndexedObjective:
        uses_index = True

        def __call__(self, model, x, y, index=None):
            # The rows the loop took must be exactly the ones it passes as index.
            assert torch.equal(x, blobs.x[index]) and torch.equal(y, blobs.y[index])
            seen.append(index.clone())
            logits = model(x)
            return logits, {"loss": torch.nn.functional.cross_entropy(logits, y)}

    fit(tiny_mlp, blobs, TrainConfig(epochs=1, batch_size=16), objective=IndexedObjective(), progress=False)
    rows = torch.cat(seen)
    assert sorted(rows.tolist()) == list(range(len(blobs.y)))  # one epoch visits every row once


def test_model_without_trainable_parameters_is_named_before_the_optimizer(tiny_mlp, blobs):
    tiny_mlp.requires_grad_(False)
    with pytest.raises(TrainingError, match=r"no trainable parameters \(all requires_grad=False\?\)"):
        fit(tiny_mlp, blobs, CFG, progress=False)


def test_fit_leaves_the_thread_count_alone(tiny_mlp, blobs):
    before = torch.get_num_threads()
    fit(tiny_mlp, blobs, TrainConfig(epochs=1, batch_size=64), progress=False)
    assert torch.get_num_threads() == before


def test_stop_flag_is_reduced_on_the_training_device(monkeypatch):
    # NCCL cannot reduce a CPU tensor: the flag must be built on the training device.
    from torchslim.train import loop

    class Reduced(Exception):
        pass

    def all_reduce(tensor):
        raise Reduced(tensor.device)

    monkeypatch.setattr(loop.torch_dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced) as got:
        loop._stop_everywhere(loop._StopRequest(), loop.DistContext(0, 2), None, torch.device("meta"))
    assert got.value.args == (torch.device("meta"),)


def test_default_schedule_follows_the_budget():
    # Chosen in benchmarks/robustness.py (see benchmarks/README.md): cosine to zero halves the average
    # learning rate of short fine-tunes and distillations; it wins from scratch at 10 epochs.
    assert [TrainConfig(epochs=e).schedule for e in (1, 3, 4, 10)] == ["constant", "constant", "cosine", "cosine"]
    assert TrainConfig(epochs=1, schedule="cosine").schedule == "cosine"
    assert TrainConfig(epochs=10, schedule="constant").schedule == "constant"
    long = TrainConfig(**{**TrainConfig().model_dump(exclude_unset=True), "epochs": 10})
    assert long.schedule == "cosine"  # an unset schedule is chosen again for the new budget
    assert TrainConfig.model_validate(TrainConfig(epochs=10).model_dump()) == TrainConfig(epochs=10)
    history = fit(torch.nn.Linear(4, 2), _blobs_for_default(), TrainConfig(epochs=2, batch_size=8), progress=False)
    assert [r["lr"] for r in history] == [TrainConfig().lr] * 2


def test_a_masked_model_fine_tunes_at_three_times_the_rate_flat_then_cosine_unless_given():
    # After pruning, 3x the rate held for half the steps then cosine beat 1x constant and plain
    # cosine at 98 % (benchmarks/README.md, robustness, fifth round).
    from torchslim.prune import UnstructuredPruning, prune_
    from torchslim.train.config import PRUNED_LR_FACTOR

    def lrs(config, masked):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        if masked:
            prune_(model, UnstructuredPruning(sparsity=0.5))
        return [r["lr"] for r in fit(model, _blobs_for_default(), config, progress=False)]

    two = TrainConfig(epochs=2, batch_size=8)
    assert two.schedule == "constant"
    fixed = two.for_pruned_model()
    assert (fixed.lr, fixed.schedule) == (two.lr * PRUNED_LR_FACTOR, "flat_cosine")
    assert fixed.for_pruned_model().lr == fixed.lr  # fitting again does not multiply twice
    masked = lrs(two, masked=True)
    # The record is the rate after the epoch's last step: still flat after the first half, then 0.
    assert masked == pytest.approx([two.lr * PRUNED_LR_FACTOR, 0.0], abs=1e-6)
    assert lrs(two, masked=False) == [two.lr] * 2  # from scratch: the budget rule, constant
    given = TrainConfig(epochs=2, batch_size=8, lr=0.01, schedule="constant")
    assert given.for_pruned_model() is given and lrs(given, masked=True) == [0.01] * 2


def test_a_model_with_channels_removed_fine_tunes_by_the_pruned_model_rule_also_after_loading(tmp_path):
    # The rule beat 1x constant after channel removal too (benchmarks/README.md, robustness, seventh round).
    import torchslim as ts
    from torchslim.core.transforms import channels_removed

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    cut = ts.prune_channels(dense, torch.randn(1, 4), ts.ChannelPruning(target_macs=0.5)).model
    assert channels_removed(cut) and not channels_removed(dense)
    two = TrainConfig(epochs=2, batch_size=8)
    lrs = lambda m: [r["lr"] for r in fit(m, _blobs_for_default(), two, progress=False)]  # noqa: E731
    assert lrs(copy.deepcopy(cut)) == pytest.approx([3 * two.lr, 0.0], abs=1e-6)
    assert lrs(copy.deepcopy(dense)) == [two.lr] * 2
    ts.save(cut, tmp_path / "cut.slim")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loaded = ts.load(tmp_path / "cut.slim", model=fresh)
    assert channels_removed(loaded) and lrs(loaded) == pytest.approx([3 * two.lr, 0.0], abs=1e-6)


def test_flat_cosine_holds_the_rate_for_half_the_steps_then_falls_to_zero():
    from torchslim.train.loop import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(epochs=2, schedule="flat_cosine"), steps_per_epoch=5)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:5] == [1.0] * 5  # the flat half
    assert rates[5:] == sorted(rates[5:], reverse=True) and 0 < rates[-1] < rates[5] <= 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # zero after the last step


def _blobs_for_default():
    from torchslim.data import TensorSplit

    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
