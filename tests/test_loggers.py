"""Metric loggers: fit's per-step and per-epoch values, read back from each back end's files."""

import json
import sys

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.train import TrainConfig, fit
from torchslim.train.loggers import FanOutLogger, JsonlLogger, LoggerConfig, MetricLogger, make_logger

CFG = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05)  # 256 samples: 8 steps an epoch


class Recorder(MetricLogger):
    def __init__(self):
        self.steps, self.epochs = [], []

    def log_step(self, stage, step, values):
        self.steps.append((stage, step, dict(values)))

    def log_epoch(self, stage, epoch, values):
        self.epochs.append((stage, epoch, dict(values)))


def test_fit_logs_every_n_steps_and_every_epoch(tiny_mlp, blobs):
    rec = Recorder()
    history = fit(tiny_mlp, blobs, CFG, logger=rec, log_every_steps=3, progress=False, stage="s")
    assert [step for _, step, _ in rec.steps] == [3, 6, 9, 12, 15]
    assert all(stage == "s" and set(v) == {"loss", "lr"} for stage, _, v in rec.steps)
    assert [(e, v) for _, e, v in rec.epochs] == [(r["epoch"], r) for r in history]


def test_log_every_steps_none_logs_epochs_only(tiny_mlp, blobs):
    rec = Recorder()
    fit(tiny_mlp, blobs, CFG, logger=rec, log_every_steps=None, progress=False)
    assert rec.steps == [] and len(rec.epochs) == 2
    with pytest.raises(ConfigError, match="log_every_steps"):
        fit(tiny_mlp, blobs, CFG, logger=rec, log_every_steps=0, progress=False)


def test_jsonl_logger_file_holds_what_fit_recorded(tiny_mlp, blobs, tmp_path):
    with make_logger(["jsonl"], tmp_path, "run") as logger:
        history = fit(tiny_mlp, blobs, CFG, logger=logger, log_every_steps=4, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [4, 8, 12, 16]
    for written, record in zip(epochs, history, strict=True):
        assert {k: written[k] for k in record} == record


def test_jsonl_logger_appends(tmp_path):
    for value in (1.0, 2.0):
        with JsonlLogger(tmp_path / "a" / "log.jsonl") as logger:
            logger.log_step("s", 1, {"loss": value})
    assert [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()] == [1.0, 2.0]


def test_tensorboard_logger_event_files_hold_what_fit_recorded(tiny_mlp, blobs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = Recorder()
    with FanOutLogger([make_logger(["tensorboard"], tmp_path, "run"), rec]) as logger:
        history = fit(tiny_mlp, blobs, CFG, val=blobs, logger=logger, log_every_steps=5, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/epoch/train_loss", "train/epoch/val_accuracy", "train/step/loss", "train/step/lr"} <= tags
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        scalars = events.Scalars(f"train/epoch/{key}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in history], rel=1e-6)
    losses = events.Scalars("train/step/loss")
    assert [(s.step, s.value) for s in losses] == [(step, pytest.approx(v["loss"], rel=1e-6))
                                                   for _, step, v in rec.steps]


def test_mlflow_logger_store_holds_what_fit_recorded(tiny_mlp, blobs, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from torchslim.train.loggers import _file_store_allowed

    rec = Recorder()
    mlflow_logger = make_logger(LoggerConfig(names=["mlflow"]), tmp_path, "my-run")
    with FanOutLogger([mlflow_logger, rec]) as logger:
        history = fit(tiny_mlp, blobs, CFG, val=blobs, logger=logger, log_every_steps=5, progress=False)
    (inner,) = mlflow_logger.loggers
    uri = (tmp_path / "mlruns").resolve().as_uri()
    assert inner.tracking_uri == uri
    with _file_store_allowed(uri):
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("torchslim").experiment_id])[0]
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    for key in ("train_loss", "val_accuracy", "lr"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/epoch/{key}"))
        assert got == [(r["epoch"], pytest.approx(r[key])) for r in history]
    got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/step/loss"))
    assert got == [(step, pytest.approx(v["loss"])) for _, step, v in rec.steps]


@pytest.mark.parametrize("name, module, extra", [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                 ("mlflow", "mlflow", "mlflow")])
def test_missing_optional_package_is_a_config_error_naming_the_extra(name, module, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now raises ImportError
    if module == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
        monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(ConfigError, match=rf"pip install 'torchslim\[{extra}\]'"):
        make_logger(["jsonl", name], tmp_path, "run")
    assert not list((tmp_path).glob("tensorboard"))


def test_unknown_or_repeated_logger_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        make_logger(["wandb"], tmp_path, "run")
    with pytest.raises(ConfigError, match="repeat"):
        make_logger(["jsonl", "jsonl"], tmp_path, "run")
    with pytest.raises(ConfigError):
        LoggerConfig(names=["csv"])


DDP_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
import torchslim.models as models
from torchslim.data import TensorSplit
from torchslim.train import TrainConfig, fit
from torchslim.train.distributed import init_distributed
from torchslim.train.loggers import JsonlLogger

ctx, device = init_distributed("cpu")
torch.manual_seed(0)
model = models.create("lenet300_100", input_size=8, num_classes=4, hidden1=8, hidden2=8)
x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 4
with JsonlLogger(f"{sys.argv[1]}/log{ctx.rank}.jsonl") as logger:
    fit(model, TensorSplit(x, y), TrainConfig(epochs=2, batch_size=16), logger=logger, log_every_steps=2,
        dist=ctx, progress=False)
dist.barrier()  # both ranks leave together: a rank torn down while the other still talks aborts
dist.destroy_process_group()
# Under heavy load torch 2.13's gloo threads have aborted a rank at interpreter teardown, after
# everything above was written ("terminate called without an active exception"); what is tested
# is the logs, so the rank leaves without running the C++ static destructors.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.e2e
@pytest.mark.slow  # torchrun with two processes: CI runs it
def test_only_rank_0_logs_under_ddp(tmp_path):
    import os
    import subprocess

    script = tmp_path / "ddp_log.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = [json.loads(line) for line in (tmp_path / "log0.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("step", r.get("epoch"))) for r in rank0] == [
        ("step", 2), ("step", 4), ("epoch", 1), ("step", 6), ("step", 8), ("epoch", 2)]
    assert (tmp_path / "log1.jsonl").read_text() == ""
