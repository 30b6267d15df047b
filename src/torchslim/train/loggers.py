"""Metric loggers: where :func:`~torchslim.train.fit` sends per-step loss parts and per-epoch records.

Three back ends, each behind the same small interface (:class:`MetricLogger`):

==================  ======================================  ===============================
name                writes                                  needs
==================  ======================================  ===============================
``jsonl``           ``FOLDER/log.jsonl``, one JSON record    nothing (the default)
                    per line
``tensorboard``     ``FOLDER/tensorboard/RUN_NAME/``         ``pip install 'torchslim[tensorboard]'``
                    event files
``mlflow``          an MLflow run in ``FOLDER/mlruns``       ``pip install 'torchslim[mlflow]'``
                    (a local file store), or any tracking
                    URI given
==================  ======================================  ===============================

Scalars are named ``STAGE/step/KEY`` (x axis: the global optimizer step) and
``STAGE/epoch/KEY`` (x axis: the epoch number, from 1), so a stage's per-step
``loss`` and its per-epoch ``train_loss`` never share a plot's x axis. The JSON
lines hold the same values as ``{"kind": "step"|"epoch", "stage", "step"|"epoch",
"time", ...values}``.

A logger is owned by whoever made it: ``fit`` logs through it but never closes
it, so one logger can span every stage of a run. Close it (or use it as a
context manager) when done.

Example:
    >>> import tempfile, torch, torchslim as ts
    >>> from torchslim.train.loggers import make_logger
    >>> from torchslim.data import TensorSplit
    >>> split = TensorSplit(torch.randn(16, 1, 8, 8), torch.arange(16) % 4)
    >>> model = ts.models.create("lenet300_100", input_size=8, num_classes=4, hidden1=8, hidden2=8)
    >>> with tempfile.TemporaryDirectory() as folder, make_logger(["jsonl"], folder, "demo") as logger:
    ...     history = ts.fit(model, split, ts.TrainConfig(epochs=1, batch_size=8), logger=logger,
    ...                      log_every_steps=1, progress=False)
    ...     lines = open(f"{folder}/log.jsonl").read().splitlines()
    >>> len(lines)  # two steps, one epoch
    3
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

from pydantic import Field

from torchslim.config import Config
from torchslim.errors import ConfigError

__all__ = [
    "FanOutLogger", "JsonlLogger", "LoggerConfig", "MLflowLogger", "MetricLogger", "TensorBoardLogger", "make_logger",
]

LoggerName = Literal["jsonl", "tensorboard", "mlflow"]


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers among ``values`` (bools, strings and NaN-free checks left to the caller)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class MetricLogger:
    """Interface of every logger; the base class logs nothing.

    Subclasses override the three methods. Values are plain Python numbers (and, in
    epoch records, a few strings such as ``stage``); back ends that only take numbers
    skip the rest.
    """

    def log_step(self, stage: str, step: int, values: Mapping[str, Any]) -> None:
        """Record one optimizer step's values (``step`` counts from 1 across the stage's epochs)."""

    def log_epoch(self, stage: str, epoch: int, values: Mapping[str, Any]) -> None:
        """Record one epoch's record (``epoch`` counts from 1), as :func:`~torchslim.train.fit` returns it."""

    def close(self) -> None:
        """Flush and release files; the logger must not be used afterwards."""

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class JsonlLogger(MetricLogger):
    """One JSON object per line, appended to ``path``.

    Each record is written with a single ``write`` on a file opened in append mode and
    flushed at once, so a killed run leaves whole lines (at most the last one cut) and
    a reader can follow the file while it grows.

    Args:
        path: the file; its folder is created; an existing file is appended to.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        # allow_nan=False would raise mid-training on a NaN metric; write null instead.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, default=str) + "\n")
        self._file.flush()

    def log_step(self, stage: str, step: int, values: Mapping[str, Any]) -> None:
        self._write({"kind": "step", "stage": stage, "step": step, "time": time.time(), **values})

    def log_epoch(self, stage: str, epoch: int, values: Mapping[str, Any]) -> None:
        self._write({"kind": "epoch", **values, "stage": stage, "epoch": epoch, "time": time.time()})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _missing(package: str, extra: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"the '{extra}' logger needs the {package} package, which is not installed ({exc}): "
                       f"pip install 'torchslim[{extra}]'")


class TensorBoardLogger(MetricLogger):
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: the folder of this run's event files (``tensorboard --logdir`` its parent
            to compare runs).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", "tensorboard", exc) from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_step(self, stage: str, step: int, values: Mapping[str, Any]) -> None:
        for key, value in _scalars(values).items():
            self._writer.add_scalar(f"{stage}/step/{key}", value, step)

    def log_epoch(self, stage: str, epoch: int, values: Mapping[str, Any]) -> None:
        for key, value in _scalars(values).items():
            if key != "epoch":
                self._writer.add_scalar(f"{stage}/epoch/{key}", value, epoch)
        self._writer.flush()  # epochs are rare: make them visible to a running TensorBoard at once

    def close(self) -> None:
        self._writer.close()


@contextlib.contextmanager
def _file_store_allowed(tracking_uri: str) -> Iterator[None]:
    """Let MLflow open a ``file:`` store while the client is built.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set. A local folder is what torchslim's run folders
    want (no database, no server), so the variable is set for the store's creation only
    (MLflow caches the store) and the user's own setting is left as it was.
    """
    if not tracking_uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MLflowLogger(MetricLogger):
    """An MLflow run, through ``mlflow.tracking.MlflowClient`` (never the global ``mlflow.start_run``).

    Works with ``mlflow-skinny`` (``pip install 'torchslim[mlflow]'``) for the default local
    file store; a database URI (``sqlite:///...``) needs the full ``mlflow`` package.

    Args:
        tracking_uri: where runs are stored, e.g. ``file:/abs/path/mlruns`` or a server URL.
        run_name: the run's name in the MLflow UI.
        experiment: experiment name (created when absent).
        params: logged once as the run's parameters (e.g. a flattened recipe).

    Raises:
        ConfigError: ``mlflow`` (or ``mlflow-skinny``) is not installed, or MLflow refuses the URI.

    Attributes:
        run_id: the MLflow run's id (read metrics back with
            ``MlflowClient(tracking_uri).get_metric_history(run_id, key)``).
    """

    def __init__(self, tracking_uri: str, run_name: str, *, experiment: str = "torchslim",
                 params: Mapping[str, Any] | None = None):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow", exc) from None
        self._metric = Metric
        self.tracking_uri = tracking_uri
        try:
            with _file_store_allowed(tracking_uri):
                self._client = MlflowClient(tracking_uri)
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
                self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as exc:  # MlflowException and friends: name the URI
            raise ConfigError(f"MLflow cannot open tracking URI {tracking_uri!r}: {exc}") from exc
        if params:
            self._client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def _log(self, prefix: str, step: int, values: Mapping[str, Any]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self._metric(f"{prefix}/{key}", value, stamp, step)
                   for key, value in _scalars(values).items() if not (prefix.endswith("/epoch") and key == "epoch")]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)  # one request per call, not per value

    def log_step(self, stage: str, step: int, values: Mapping[str, Any]) -> None:
        self._log(f"{stage}/step", step, values)

    def log_epoch(self, stage: str, epoch: int, values: Mapping[str, Any]) -> None:
        self._log(f"{stage}/epoch", epoch, values)

    def close(self) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id)
            self.run_id = None


class FanOutLogger(MetricLogger):
    """Sends every record to each of ``loggers``; :meth:`close` closes them all (even if one fails)."""

    def __init__(self, loggers: Sequence[MetricLogger]):
        self.loggers = list(loggers)

    def log_step(self, stage: str, step: int, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_step(stage, step, values)

    def log_epoch(self, stage: str, epoch: int, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_epoch(stage, epoch, values)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


class LoggerConfig(Config):
    """Which metric loggers a run writes to (see :mod:`torchslim.train.loggers`).

    Attributes:
        names: any of ``jsonl``, ``tensorboard``, ``mlflow`` (each at most once).
        log_every_steps: per-step values every this many optimizer steps (passed to
            :func:`~torchslim.train.fit` as ``log_every_steps``); None logs epochs only.
        mlflow_tracking_uri: MLflow's tracking URI; None means a local file store in
            ``FOLDER/mlruns``.
        mlflow_experiment: MLflow experiment name.

    Example:
        >>> from torchslim.train.loggers import LoggerConfig
        >>> LoggerConfig(names=["jsonl", "tensorboard"]).log_every_steps
        10
    """

    names: list[LoggerName] = Field(default_factory=lambda: ["jsonl"])
    log_every_steps: int | None = Field(10, ge=1)
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = Field("torchslim", min_length=1)


def make_logger(names: Sequence[str] | LoggerConfig, folder: str | os.PathLike, run_name: str) -> MetricLogger:
    """Build the loggers ``names`` asks for, writing under ``folder``, as one :class:`MetricLogger`.

    Args:
        names: a list such as ``["jsonl", "tensorboard", "mlflow"]``, or a :class:`LoggerConfig`.
            An empty list gives a logger that logs nothing.
        folder: the run folder: ``log.jsonl``, ``tensorboard/RUN_NAME/`` and ``mlruns/`` go here.
        run_name: names the TensorBoard sub-folder and the MLflow run.

    Returns:
        A :class:`FanOutLogger` over the requested loggers (the caller closes it).

    Raises:
        ConfigError: an unknown or repeated name, or the package a logger needs is missing
            (the message says which ``pip install 'torchslim[...]'`` to run).
    """
    config = names if isinstance(names, LoggerConfig) else None
    if config is None:
        if isinstance(names, str):
            raise ConfigError(f"logger names must be a list such as ['jsonl'], got the string {names!r}")
        known = ("jsonl", "tensorboard", "mlflow")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown logger {unknown[0]!r}; known: {', '.join(known)}")
        config = LoggerConfig(names=list(names))
    if len(set(config.names)) != len(config.names):
        raise ConfigError(f"logger names repeat: {config.names}")
    folder = Path(folder)
    loggers: list[MetricLogger] = []
    try:
        for name in config.names:
            if name == "jsonl":
                loggers.append(JsonlLogger(folder / "log.jsonl"))
            elif name == "tensorboard":
                loggers.append(TensorBoardLogger(folder / "tensorboard" / run_name))
            else:
                uri = config.mlflow_tracking_uri or (folder / "mlruns").resolve().as_uri()
                loggers.append(MLflowLogger(uri, run_name, experiment=config.mlflow_experiment))
    except BaseException:
        FanOutLogger(loggers).close()  # nothing half-open is left behind
        raise
    return FanOutLogger(loggers)
