"""torchslim.search.study: the Optuna refinement, its storage in the run folder, resume, several workers.

Tiny on purpose: digits, a width-8 fmnist_teacher, two searchable groups with 3 widths each, trial
fine-tunes of 64 samples, 10 ms of timing per point (noisy latencies, real ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import torchslim as ts
import torchslim.search as search
from torchslim.errors import ConfigError
from torchslim.search import Budget, SearchSpace, StudyConfig
from torchslim.search import study as st
from torchslim.search.front import Point
from torchslim.search.space import GroupChoice
from conftest import digits_teacher

optuna = pytest.importorskip("optuna")

SPACE = SearchSpace(keep=[1.0, 0.75, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"],
                    exclude=["features.0", "features.3", "features.7"])
BUDGET = Budget(max_drop=5.0, batch=16, latency_budget_s=0.01)
TRIAL = {"trial_finetune": ts.TrainConfig(epochs=1, batch_size=32), "trial_samples": 64}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(splits):
    return digits_teacher(splits.train, epochs=4)


def _study(folder: Path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(storage=storage, study_name="torchslim-auto")


def _own_complete(study) -> list:
    return [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if not t.user_attrs.get("seeded")]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


def test_trials_without_optuna_name_the_extra(monkeypatch):
    from torchslim.search.api import _prepare

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    model = ts.models.create("fmnist_teacher", input_size=8, num_classes=10, width=8, fc=32)
    x = types.SimpleNamespace(x=torch.randn(8, 1, 8, 8), y=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"pip install 'torchslim\[search\]'"):
        _prepare(model, x, x, BUDGET, SPACE, None, 0, True, None, None, 2, None)
    run = _prepare(model, x, x, BUDGET, SPACE, None, 0, True, None, None, 0, None)  # trials=0 needs no Optuna
    assert run.trials == 0 and [g.label for g in run.groups] == ["features.10", "classifier.0"]


# A study without a model: plans of two groups, a made-up accuracy and latency per plan.
GROUPS = [GroupChoice("a", "a", ("a",), 8, (8, 6, 4, 2)), GroupChoice("b", "b", ("b",), 8, (8, 6, 4, 2))]
DENSE = Point({"a": 8, "b": 8}, "dense", 0.95, 0.0, 1.0, 1.0, 1.0, 100, 100)


def _fake(plan: dict[str, int], source: str = "trial") -> Point:
    acc = 0.95 - 0.02 * (8 - plan["a"]) - 0.01 * (8 - plan["b"]) ** 1.5 / 3
    lat = (plan["a"] * plan["b"]) / 64
    return Point(dict(plan), source, acc, 100 * (0.95 - acc), lat, lat, lat, 100, 100)


SWEEP = [_fake({"a": 8, "b": 6}, "sweep"), _fake({"a": 6, "b": 6}, "sweep")]


def _open(folder: Path):
    space = st.Space.around(GROUPS, search.pareto_front([DENSE, *SWEEP]), radius=1)
    seeds = st.seeds_for([DENSE, *SWEEP], space, Budget(max_drop=2.0), DENSE)
    return st.open_study(StudyConfig(poll_s=0.01), folder, "key", 0, ["maximize", "minimize"], seeds, space), space


def _refine(folder: Path, n: int, say=lambda line: None) -> list[dict]:
    study, space = _open(folder)
    calls: list[dict] = []

    def measure(plan):
        calls.append(plan)
        return _fake(plan)

    st.refine(study, space, n, measure, Budget(max_drop=2.0), DENSE, [DENSE, *SWEEP], folder, say, poll_s=0.01)
    return calls


def test_study_resumes_without_rerunning_finished_trials(tmp_path):
    lines: list[str] = []

    def stop_after_three(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, once three trials have finished

    with pytest.raises(KeyboardInterrupt):
        _refine(tmp_path, 8, stop_after_three)
    first = {t.number: t.user_attrs["point"] for t in _own_complete(_study(tmp_path))}
    assert len(first) == 3 and all(line.startswith("[trial ") and "left" in line for line in lines)
    assert len(_study(tmp_path).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3 + 2  # + the 2 seeds

    # A worker killed mid-trial leaves a RUNNING trial owned by a process that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _study(tmp_path).ask()
    stale.suggest_int("a", 0, 2)
    stale.suggest_int("b", 0, 2)
    stale.set_user_attr("worker", f"{st.socket.gethostname()}:{dead.pid}")

    said: list[str] = []
    calls = _refine(tmp_path, 8, said.append)
    study = _study(tmp_path)
    done = {t.number: t.user_attrs["point"] for t in _own_complete(study)}
    assert len(done) == 8 and all(done[n] == p for n, p in first.items())  # finished trials kept as they were
    measured_before = {tuple(sorted(p["plan"].items())) for p in first.values()}
    assert not measured_before & {tuple(sorted(p.items())) for p in calls}  # and never measured again
    assert sum(line.startswith("[trial ") for line in said) == 5
    assert study.get_trials()[stale.number].state == optuna.trial.TrialState.FAIL
    assert any(t.user_attrs.get("retry_of") == stale.number for t in study.get_trials())  # its plan queued again
    records = _records(tmp_path)
    assert sorted(r["trial"] for r in records) == sorted(done)  # one record per finished trial
    assert _refine(tmp_path, 8) == []  # a finished study runs nothing
    with pytest.raises(ConfigError, match="other settings"):  # a study made by another search is refused
        st.open_study(StudyConfig(), tmp_path, "another key", 0, ["maximize", "minimize"], [], st.Space([], {}, {}))


@pytest.mark.slow  # SQLAlchemy's import and schema set-up alone take seconds
def test_study_in_a_database_given_by_url(tmp_path):
    cfg = StudyConfig(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s1", poll_s=0.01)
    space = st.Space.around(GROUPS, search.pareto_front([DENSE, *SWEEP]), radius=1)
    seeds = st.seeds_for([DENSE, *SWEEP], space, Budget(max_drop=2.0), DENSE)
    study = st.open_study(cfg, None, "key", 0, ["maximize", "minimize"], seeds, space)
    st.refine(study, space, 3, _fake, Budget(max_drop=2.0), DENSE, [DENSE, *SWEEP], None, lambda line: None)
    again = optuna.load_study(storage=cfg.storage, study_name="s1")
    assert len(_own_complete(again)) == 3 and len(again.trials) >= 3 + len(seeds)
    assert not (tmp_path / "study.journal").exists()


def test_a_trial_started_after_the_study_is_full_is_given_back(tmp_path):
    study, space = _open(tmp_path)
    a, b = study.ask(), study.ask()  # two workers start trials together when one is still needed
    assert not st._surplus(study, optuna, a.number, 1)
    assert st._surplus(study, optuna, b.number, 1)  # the later one steps back, the earlier runs
    assert st._surplus(study, optuna, a.number, 0)


def test_study_space_is_the_front_widened_by_radius():
    groups = [GroupChoice("a", "a", ("a",), 8, (8, 6, 4, 2)), GroupChoice("b", "b", ("b",), 8, (8, 6, 4, 2))]
    front = [Point({"a": 8, "b": 6}, "sweep", 0.9, 0, 1, 1, 0.9, 1, 1), Point({"a": 6, "b": 6}, "sweep", 0.8, 0, 1, 1,
                                                                                0.8, 1, 1)]
    space = st.Space.around(groups, front, radius=1)
    assert (space.low, space.high) == ({"a": 0, "b": 0}, {"a": 2, "b": 2})
    assert space.params({"a": 4, "b": 8}) == {"a": 2, "b": 0}
    assert space.params({"a": 2, "b": 8}) is None  # outside a's window: not a seed
    dense = Point({"a": 8, "b": 8}, "dense", 0.95, 0, 1, 1, 1.0, 10, 10)
    seeds = st.seeds_for([dense, *front, front[0]], space, Budget(max_drop=10.0), dense)
    assert [s[0] for s in seeds] == [{"a": 0, "b": 1}, {"a": 1, "b": 1}]  # dense and the repeat left out
    assert st.constraint(front[1], Budget(max_drop=10.0), dense) == pytest.approx(0 - 10.0)
    assert st.objectives(front[1], Budget(macs=0.5), dense) == (0.8, 0.1)


def test_cli_checks_auto_arguments(tmp_path, capsys):
    from torchslim.cli.main import build_parser, main

    args = build_parser().parse_args(["auto", "--resume", str(tmp_path), "--worker", "--trials", "9"])
    assert args.resume == str(tmp_path) and args.worker and args.trials == 9
    assert main(["auto", "m.slim", "--data", "digits", "--max-drop", "1", "--worker"]) == 2
    assert "--resume RUN_DIR" in capsys.readouterr().err
    assert main(["auto", "--resume", str(tmp_path)]) == 2
    assert "not a torchslim auto run folder" in capsys.readouterr().err
    assert main(["auto", "m.slim", "--data", "digits"]) == 2
    assert "a budget" in capsys.readouterr().err


_WORKER = """
import sys, torch
torch.set_num_threads(1)
import torchslim as ts
from torchslim.search import Budget, SearchSpace, StudyConfig, search_worker
splits = ts.data.load_dataset("digits")
space = SearchSpace(keep=[1.0, 0.75, 0.5], bn_batches=1, max_candidates=2, precision=["fp32"],
                    exclude=["features.0", "features.3", "features.7"])
budget = Budget(max_drop=5.0, batch=16, latency_budget_s=0.01)
n = search_worker(ts.load(sys.argv[1]).eval(), splits.train, splits.val, budget,
                  space, trials=int(sys.argv[3]), out=sys.argv[2], study=StudyConfig(poll_s=0.1),
                  trial_finetune=ts.TrainConfig(epochs=1, batch_size=32), trial_samples=64, progress=print)
print("ran", n, flush=True)
"""


@pytest.mark.slow
def test_two_worker_processes_share_one_journal_study(model, splits, tmp_path):
    out, n = tmp_path / "auto", 6
    ts.save(model, tmp_path / "m.slim")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "m.slim"), str(out), str(n)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    # Start the search once both are up and waiting for its study, so all three share the trials.
    for w in workers:
        assert "waiting for the search" in w.stdout.readline()
    lines: list[str] = []

    def hold_until_a_worker_ran(line: str) -> None:
        # The search's first trial line waits for a worker's first trial: on a loaded machine the search
        # could otherwise run all n trials before either worker has polled, and nothing would be shared.
        lines.append(line)
        if sum(x.startswith("[trial ") for x in lines) != 1:
            return
        deadline = time.time() + 60
        while time.time() < deadline:
            text = (out / "trials.jsonl").read_text() if (out / "trials.jsonl").is_file() else ""
            if any(f'"worker": "{st.worker_id()}"' not in rec for rec in text.splitlines()):
                return
            time.sleep(0.05)

    r = search.search(model, splits.train, splits.val, BUDGET, SPACE, out=out, trials=n,
                      progress=hold_until_a_worker_ran, study=StudyConfig(poll_s=0.1), **TRIAL)
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    done = _own_complete(_study(out))
    assert len(done) == n  # none lost, none extra
    records = _records(out)
    numbers = [rec["trial"] for rec in records]
    assert sorted(numbers) == sorted(t.number for t in done) and len(set(numbers)) == n  # each ran exactly once
    ran = {rec["worker"] for rec in records}
    assert ran <= {st.worker_id(), *(f"{st.socket.gethostname()}:{w.pid}" for w in workers)}
    assert len(ran) >= 2, (ran, logs)  # the trials really were shared
    assert sum(int(log.split("ran ")[-1]) for log in logs) + sum(x.startswith("[trial ") for x in lines) == n
    assert {p.extra["trial"] for p in r.points if p.source == "trial"} <= {t.number for t in done}


@pytest.mark.slow
def test_cli_auto_trials_workers_and_resume(model, tmp_path, capsys):
    from torchslim.cli.main import main

    ts.save(model, tmp_path / "m.slim")
    out = tmp_path / "auto"
    base = ["auto", str(tmp_path / "m.slim"), "--data", "digits", "--max-drop", "5", "--batch", "16", "--threads", "1",
            "--precision", "fp32",
            "--keep", "1,0.75,0.5", "--max-candidates", "2", "--latency-budget", "0.01", "--exclude", "features.0",
            "features.3", "features.7", "--trial-samples", "64", "--out", str(out)]
    assert main([*base, "--trials", "2", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "started 1 worker process" in printed and "by Optuna trials" in printed
    assert (out / "worker-1.log").is_file() and (out / "auto.json").is_file()
    assert main(["auto", "--resume", str(out), "--trials", "3"]) == 0  # continue: the tables are cached
    printed = capsys.readouterr().out
    assert "reused" in printed and "sensitivity" not in printed
    assert sum(line.startswith("[trial ") for line in printed.splitlines()) == 1  # only the missing trial ran
    assert len(_own_complete(_study(out))) == 3 and len(_records(out)) == 3


@pytest.mark.slow
def test_each_trial_is_also_measured_as_int8(model, splits, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    space = SPACE.model_copy(update={"precision": ["fp32", "int8"], "int8_calibration_samples": 64})
    r = search.search(model, splits.train, splits.val, BUDGET, space, out=tmp_path, trials=3, **TRIAL)
    fp32 = {p.extra["trial"]: p for p in r.points if p.source == "trial" and p.precision == "fp32"}
    int8 = {p.extra["trial"]: p for p in r.points if p.source == "trial" and p.precision == "int8"}
    assert fp32 and int8.keys() == fp32.keys()  # every trial that measured a new plan has its int8 twin
    for k, p in fp32.items():
        assert int8[k].plan == p.plan and int8[k].extra["int8"]["fp32_twin_accuracy"] == p.accuracy
        assert int8[k].bytes < p.bytes  # the int8 file, measured as such
    records = [rec for rec in _records(tmp_path) if rec["duplicate_of"] is None]
    assert sorted(rec["trial"] for rec in records) == sorted(fp32)
    assert all(len(rec["twins"]) == 1 and rec["twins"][0]["precision"] == "int8" for rec in records)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert sum(p["source"] == "trial" and p["precision"] == "int8" for p in saved["points"]) == len(int8)
