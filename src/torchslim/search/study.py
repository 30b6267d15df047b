"""Optuna refinement of the measured front: a multi-objective study kept in the run folder.

After the Lagrangian sweep, :func:`refine` runs an Optuna study over the same per-group widths:
accuracy up, the budget's cost down (measured latency ratio, or bytes / MACs for those budgets),
the budget itself as a constraint (the accuracy drop for ``max_drop``, else the bound;
``trial.set_constraint`` on Optuna 5, ``constraints_func`` before). It starts from what the sweep measured: every stage-one point inside the study's space
is added as a finished trial (they were measured exactly as a trial is, so they are not run
again), and each group's widths are limited to the range the front spans, ``radius`` steps
wider, so new trials sample near the front. A trial builds its plan from the dense model, gives
it the search's short KD fine-tune, measures it end to end and records the point.

The study lives in Optuna's storage: a journal file ``RUN_DIR/study.journal`` by default, or any
database URL Optuna supports (``sqlite:///study.db``, ``postgresql://...``) for workers on other
machines. Calling :func:`torchslim.search.search` again on the same folder continues the study
(finished trials are never re-run); several processes can work on one study at once, each
pulling trials until it has ``trials`` finished ones. No more than ``trials`` are ever finished:
a worker that starts a trial the study no longer needs gives it back unrun (state FAIL,
``user_attrs["surplus"]``). A trial whose worker died (kill -9) is found by the next worker on the
same host, marked FAIL and its plan queued again; one on another host is not (its trial stays
RUNNING and the finishing process waits for it: fail it by hand, e.g. ``study.tell(n, state=FAIL)``).

Per finished trial a line is appended to ``RUN_DIR/trials.jsonl`` (trial number, worker, point),
the record a run can be audited with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from torchslim.config import Config
from torchslim.errors import ConfigError
from torchslim.search.front import Point, write_json
from torchslim.search.sensitivity import Tables
from torchslim.search.space import GroupChoice, plan_key

#: Study user attribute holding the fingerprint of the search settings (model, data, space, budget).
KEY_ATTR = "torchslim_key"
#: The stage-one cache in the run folder.
CACHE_FILE = "search_cache.json"
#: A RUNNING trial with no owner recorded after this long is a worker that died between ask and set-up.
_ORPHAN_S = 120.0


class StudyConfig(Config):
    """Where the Optuna study of a search lives and how its trials sample.

    Attributes:
        storage: an Optuna storage URL (``sqlite:///RUN_DIR/study.db``, ``postgresql://...``);
            None: a journal file ``study.journal`` in the search's ``out`` folder (in memory
            without one).
        study_name: the study's name in the storage (several searches can share a database).
        radius: how many steps of a group's allowed widths a trial may go beyond the range
            the measured front spans in that group (0: only widths some front plan uses).
        poll_s: how often a process that waits for other workers' trials looks at the study.

    Example:
        >>> from torchslim.search import StudyConfig
        >>> StudyConfig(storage="sqlite:///runs/auto/study.db").radius
        1
    """

    storage: str | None = None
    study_name: str = Field("torchslim-auto", min_length=1)
    radius: int = Field(1, ge=0, le=64)
    poll_s: float = Field(1.0, gt=0.0, le=60.0)


def require_optuna() -> Any:
    """The ``optuna`` module, or a clear error saying how to install it."""
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError("trials > 0 refine the front with Optuna, which is not installed: "
                          "pip install 'torchslim[search]' (or set trials=0 / --trials 0)") from exc
    return optuna


def worker_id() -> str:
    """``host:pid`` of this process (how a dead worker's trials are recognised)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _storage(optuna: Any, cfg: StudyConfig, folder: Path | None) -> Any:
    if cfg.storage is not None:
        return cfg.storage
    if folder is None:
        return None  # in memory: one process, nothing to resume
    folder.mkdir(parents=True, exist_ok=True)
    journal = optuna.storages.journal if hasattr(optuna.storages, "journal") else None
    path = str(folder / "study.journal")
    if journal is not None and hasattr(journal, "JournalFileBackend"):  # Optuna >= 4.0
        return optuna.storages.JournalStorage(journal.JournalFileBackend(path))
    return optuna.storages.JournalStorage(optuna.storages.JournalFileStorage(path))  # Optuna 3.x


@dataclass
class Space:
    """The study's search space: per group, a window of indices into ``group.keeps`` (0 = whole)."""

    groups: list[GroupChoice]
    low: dict[str, int]
    high: dict[str, int]

    @classmethod
    def around(cls, groups: list[GroupChoice], front: list[Point], radius: int) -> "Space":
        """Per group, the range of widths the front's plans use, ``radius`` steps wider on each side."""
        low, high = {}, {}
        for g in groups:
            idx = [g.keeps.index(p.plan[g.label]) for p in front if p.plan.get(g.label) in g.keeps]
            idx = idx or [0]
            low[g.label] = max(0, min(idx) - radius)
            high[g.label] = min(len(g.keeps) - 1, max(idx) + radius)
        return cls(groups, low, high)

    def distributions(self, optuna: Any) -> dict[str, Any]:
        return {g.label: optuna.distributions.IntDistribution(self.low[g.label], self.high[g.label])
                for g in self.groups}

    def params(self, plan: dict[str, int]) -> dict[str, int] | None:
        """The plan as study parameters, or None when it lies outside the windows."""
        out = {}
        for g in self.groups:
            keep = plan.get(g.label, g.size)
            if keep not in g.keeps:
                return None
            i = g.keeps.index(keep)
            if not self.low[g.label] <= i <= self.high[g.label]:
                return None
            out[g.label] = i
        return out

    def suggest(self, trial: Any) -> dict[str, int]:
        return {g.label: g.keeps[trial.suggest_int(g.label, self.low[g.label], self.high[g.label])]
                for g in self.groups}


def objectives(p: Point, budget: Any, dense: Point) -> tuple[float, float]:
    """(accuracy, cost): the cost is what the budget bounds or, for an accuracy budget, latency."""
    if budget.size_bytes is not None:
        return p.accuracy, p.bytes / max(dense.bytes, 1)
    if budget.macs is not None:
        return p.accuracy, p.macs / max(dense.macs, 1)
    return p.accuracy, p.latency_ratio


def constraint(p: Point, budget: Any, dense: Point) -> float:
    """Signed budget violation (<= 0 feasible), relative to the bound, so Optuna can rank infeasible trials."""
    if budget.max_drop is not None:
        return p.drop - budget.max_drop
    if budget.latency is not None:
        return p.latency_ratio / budget.latency - 1
    if budget.size_bytes is not None:
        return p.bytes / budget.size_bytes - 1
    return p.macs / (budget.macs * max(dense.macs, 1)) - 1


def _sampler(optuna: Any, seed: int, n_seeded: int) -> Any:
    kwargs: dict[str, Any] = {}
    if not hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna < 5: constraints come from the sampler
        kwargs["constraints_func"] = lambda t: [t.user_attrs.get("constraint", 0.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
        # constant_liar: trials running in other workers count as bad guesses, so workers spread out.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=max(1, 4 - n_seeded), **kwargs)


def _set_constraint(trial: Any, value: float) -> None:
    trial.set_user_attr("constraint", value)
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("budget", value)


def _is_new(t: Any) -> bool:
    """A trial this study ran (not a stage-one point added as a finished trial)."""
    return not t.user_attrs.get("seeded", False)


def open_study(cfg: StudyConfig, folder: Path | None, key: str, seed: int, directions: list[str],
               seeds: list[tuple[dict[str, int], Point, tuple[float, float], float]], space: Space, *,
               stage_one: tuple[Point, Tables, list[Point]] | None = None, create: bool = True) -> Any:
    """Create the study (adding ``seeds`` as finished trials, storing ``stage_one`` for workers) or load it.

    Raises:
        ConfigError: the study was made by a search with other settings.
    """
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(optuna, cfg, folder)
    sampler = _sampler(optuna, seed, len(seeds))
    try:
        if not create:
            raise optuna.exceptions.DuplicatedStudyError  # a worker only joins
        study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=directions,
                                    sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=cfg.study_name, sampler=sampler)
        _check_key(study, key, cfg, folder)
        return study
    study.set_user_attr(KEY_ATTR, key)
    if stage_one is not None:
        study.set_user_attr("stage_one", encode_stage_one(*stage_one))
    dists = space.distributions(optuna)
    for params, point, values, violation in seeds:
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=list(values),
            user_attrs={"seeded": True, "point": point.to_dict(), "constraint": violation},
            system_attrs={"constraints": [violation]}))
    return study


def _check_key(study: Any, key: str, cfg: StudyConfig, folder: Path | None) -> None:
    made_with = study.user_attrs.get(KEY_ATTR)
    if made_with is not None and made_with != key:
        raise ConfigError(f"study {cfg.study_name!r} in {cfg.storage or folder} was made by a search with other "
                          "settings (model, data, budget, space or trial fine-tune): resume with the same "
                          "settings, or give a new run folder / study name")


def settings_key(model: Any, train: Any, val: Any, budget: Any, space: Any, kd: Any, seed: int, uniform: bool,
                 trial: Any, trial_samples: int | None) -> str:
    """A hash of everything stage one and the trials depend on: weights, data, budget, space, fine-tunes."""
    import torch

    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu().reshape(-1)  # 1-D: a 0-d tensor cannot be viewed as bytes
        h.update(f"{name}{t.dtype}{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    for name, t in sorted(model.state_dict().items()):
        add(name, t)
    for split in (train, val):
        add("x", split.x)
        add("y", split.y)
    if kd is None:  # the objective the fine-tunes will use: a changed default must not reuse old trials
        from torchslim.search.finalists import recovery_kd

        kd = recovery_kd()
    settings = {"budget": budget.to_dict(), "space": space.to_dict(), "kd": kd.to_dict(),
                "seed": seed, "uniform": uniform, "trial": trial.to_dict() if trial is not None else None,
                "trial_samples": trial_samples}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def encode_stage_one(dense: Point, tables: Tables, points: list[Point]) -> dict[str, Any]:
    return {"dense": dense.to_dict(), "tables": tables.to_dict(), "points": [p.to_dict() for p in points]}


def decode_stage_one(d: dict[str, Any]) -> tuple[Point, Tables, list[Point]]:
    t = d["tables"]
    tables = Tables(t["dense_accuracy"], {g: {int(k): v for k, v in x.items()} for g, x in t["drop"].items()},
                    {g: {int(k): v for k, v in x.items()} for g, x in t["latency"].items()})
    return Point(**d["dense"]), tables, [Point(**p) for p in d["points"]]


def save_stage_one(folder: Path, key: str, dense: Point, tables: Tables, points: list[Point],
                   packed_tables: list[dict[str, Any]] | None = None) -> None:
    """``folder/search_cache.json``: the expensive per-group tables and the sweep's measured points.

    ``packed_tables`` (the packed axes' per-layer tables, as dicts) ride along, so a resumed
    search writes them into ``pareto.json`` again without rebuilding them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CACHE_FILE, {"key": key, **encode_stage_one(dense, tables, points),
                                     "packed_tables": packed_tables or []})


def _read_cache(folder: Path, key: str) -> dict[str, Any] | None:
    """``folder/search_cache.json`` as a dict, if it exists and was made with these settings."""
    path = folder / CACHE_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    return d if d.get("key") == key else None


def load_packed_tables(folder: Path, key: str) -> list[dict[str, Any]]:
    """The packed tables cached beside stage one with these settings (``[]`` if none)."""
    d = _read_cache(folder, key)
    return d.get("packed_tables", []) if d is not None else []


def load_stage_one(folder: Path, key: str) -> tuple[Point, Tables, list[Point]] | None:
    """The cached stage one, if ``folder`` has one made with these settings."""
    d = _read_cache(folder, key)
    return decode_stage_one(d) if d is not None else None


def peek_stage_one(cfg: StudyConfig, folder: Path | None, key: str) -> tuple[Point, Tables, list[Point]] | None:
    """The stage one stored in an existing study (a resumed search whose folder lost its cache), else None."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.storage is None and (folder is None or not (folder / "study.journal").is_file()):
        return None
    try:
        study = optuna.load_study(storage=_storage(optuna, cfg, folder), study_name=cfg.study_name)
    except KeyError:
        return None
    _check_key(study, key, cfg, folder)
    d = study.user_attrs.get("stage_one")
    return decode_stage_one(d) if d else None


def wait_for_stage_one(cfg: StudyConfig, folder: Path | None, key: str, wait_s: float,
                       say: Callable[[str], None]) -> tuple[Point, Tables, list[Point]]:
    """A worker's stage one: from the study, once the search has created it (waiting up to ``wait_s``)."""
    if cfg.storage is None and folder is None:
        raise ConfigError("a search worker needs the study's storage: the search's run folder (out=) or "
                          "study=StudyConfig(storage=URL)")
    deadline = time.time() + wait_s
    told = False
    while True:
        found = peek_stage_one(cfg, folder, key)
        if found is not None:
            return found
        if time.time() > deadline:
            raise ConfigError(f"no study {cfg.study_name!r} with stage-one results in {cfg.storage or folder} after "
                              f"{wait_s:.0f}s: start the search first (torchslim auto ... --trials N), then workers")
        if not told:
            say(f"waiting for the search to create study {cfg.study_name!r} in {cfg.storage or folder}")
            told = True
        time.sleep(cfg.poll_s)


def _reap(study: Any, optuna: Any, names: set[str], say: Callable[[str], None]) -> None:
    """Fail RUNNING trials whose worker on this host is gone, and queue their plans again."""
    host = socket.gethostname()
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner is None:
            started = t.datetime_start.timestamp() if t.datetime_start else now
            dead = now - started > _ORPHAN_S
        else:
            h, _, pid = owner.rpartition(":")
            dead = h == host and not _alive(int(pid))
        if not dead:
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if set(t.params) == names and not t.user_attrs.get("surplus"):  # a whole plan: run it again
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        say(f"trial {t.number}: its worker {owner or '(unknown)'} is gone; marked failed, its plan queued again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts(study: Any, optuna: Any) -> tuple[int, int]:
    s = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(s.COMPLETE, s.RUNNING))
    done = sum(1 for t in trials if t.state == s.COMPLETE and _is_new(t))
    return done, sum(1 for t in trials if t.state == s.RUNNING)


def _surplus(study: Any, optuna: Any, number: int, n: int) -> bool:
    """Whether the trial just started is one more than the study needs.

    Trials are ranked by number: the storage numbers them in the order their creation reached
    it, and a worker checks after its own trial exists, so of two that start together the later
    one sees the earlier, never the other way round. (Not by ``datetime_start``: each process
    stamps it before its write reaches the storage, so two workers could each see the other as
    later and both run; a CI run overshot 6 trials by one that way. A plan queued again after its
    worker died keeps its older number and may still overshoot by one.)
    """
    s = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(s.COMPLETE, s.RUNNING))
    done = sum(1 for t in trials if t.state == s.COMPLETE and _is_new(t))
    ahead = sum(1 for t in trials if t.state == s.RUNNING and t.number < number)
    return done + ahead >= n


def trial_points(study: Any) -> list[Point]:
    """The points of the study's finished trials (its own, not the added stage-one points), their
    twins (int8 files) included, by trial number."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if _is_new(t) and "point" in t.user_attrs and t.user_attrs.get("duplicate_of") is None:
            out += [Point(**t.user_attrs["point"])] + [Point(**d) for d in t.user_attrs.get("twins", [])]
    return sorted(out, key=lambda p: p.extra.get("trial", 0))


def refine(study: Any, space: Space, n: int, measure: Callable[[dict[str, int]], Point], budget: Any, dense: Point,
           known: list[Point], folder: Path | None, say: Callable[[str], None], *, wait: bool = True,
           poll_s: float = 1.0, twins: Callable[[Point], list[Point]] | None = None,
           shown: list[Point] | None = None) -> int:
    """Run trials of ``study`` until it has ``n`` finished ones (its own; the seeds do not count).

    Args:
        study: from :func:`open_study`.
        space: the study's windows.
        n: finished trials wanted in the study, over every worker (resuming counts what is there).
        measure: builds, fine-tunes and measures a plan (``source="trial"``).
        budget / dense: for the objectives, the constraint and "best feasible so far".
        known: the stage-one points of the study's kind (fp32 plans): a trial drawing one of their
            plans is recorded, not measured again.
        folder: the run folder (``trials.jsonl`` is appended to), or None.
        say: one line per trial.
        wait: when the remaining trials run in other workers, wait for them to finish (the
            process that finishes the search does); False: return (a worker that only helps).
        poll_s: seconds between looks at the study while waiting.
        twins: more points of a trial's model (its int8 or packed file), measured after it: they join
            the front (:func:`trial_points`) but not the study's objectives, which are the plan's.
        shown: every stage-one point, for "best feasible so far" (default ``known``; under a size
            bound the packed points are the feasible ones).

    Returns:
        How many trials this process ran.
    """
    import optuna

    s = optuna.trial.TrialState
    me = worker_id()
    ran = 0
    start = time.time()
    while True:
        _reap(study, optuna, {g.label for g in space.groups}, say)
        done, running = _counts(study, optuna)
        if done >= n:
            return ran
        if done + running >= n:
            if not wait:
                return ran
            time.sleep(poll_s)
            continue
        trial = study.ask()
        trial.set_user_attr("worker", me)
        if _surplus(study, optuna, trial.number, n):
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=s.FAIL)
            continue
        t0 = time.time()
        plan = space.suggest(trial)
        twin = _twin(study, optuna, plan, known)
        if twin is not None:
            # Already measured (the dense model, a sweep point or another trial): recorded, not measured again.
            label, q = twin
            p = Point(**{**q.to_dict(), "extra": {**q.extra, "trial": trial.number, "worker": me,
                                                  "duplicate_of": label}})
            trial.set_user_attr("duplicate_of", label)
        else:
            try:
                p = measure(plan)
            except BaseException as exc:
                study.tell(trial, state=s.FAIL)
                if isinstance(exc, KeyboardInterrupt):  # stopped, not broken: the plan is run on resume
                    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
                raise
            p.extra.update({"trial": trial.number, "worker": me, "seconds": time.time() - t0})
            more = [q.to_dict() for q in (twins(p) if twins is not None else [])]
            for q in more:
                q["extra"].update({"trial": trial.number, "worker": me})
            trial.set_user_attr("twins", more)
        violation = constraint(p, budget, dense)
        trial.set_user_attr("point", p.to_dict())
        _set_constraint(trial, violation)
        study.tell(trial, list(objectives(p, budget, dense)))
        ran += 1
        if folder is not None:
            record = {"trial": trial.number, "worker": me, "duplicate_of": trial.user_attrs.get("duplicate_of"),
                      "point": p.to_dict(), "twins": trial.user_attrs.get("twins", [])}
            # One short write in append mode: lines from several workers do not interleave.
            with open(folder / "trials.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=float) + "\n")
        say(_progress_line(study, optuna, p, n, budget, dense, known if shown is None else shown, start, ran))


def _twin(study: Any, optuna: Any, plan: dict[str, int], known: list[Point]) -> tuple[Any, Point] | None:
    """A measurement of ``plan`` already made: (trial number or stage-one source, its point)."""
    key = plan_key(plan)
    for q in known:
        if plan_key({**q.plan}) == key:
            return q.source, q
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        d = t.user_attrs.get("point")
        if d is not None and plan_key(d["plan"]) == key:
            return t.number, Point(**d)
    return None


def _progress_line(study: Any, optuna: Any, p: Point, n: int, budget: Any, dense: Point, known: list[Point],
                   start: float, ran: int) -> str:
    s = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(s.COMPLETE, s.RUNNING))
    own = [t for t in trials if t.state == s.COMPLETE and _is_new(t)]
    running = sum(1 for t in trials if t.state == s.RUNNING)
    pts = known + [Point(**d) for t in own if "point" in t.user_attrs
                   for d in [t.user_attrs["point"], *t.user_attrs.get("twins", [])]]
    ok = [q for q in pts if constraint(q, budget, dense) <= 1e-9]
    if budget.max_drop is not None:
        best = min(ok, key=lambda q: q.latency_ratio) if ok else None
    else:
        best = max(ok, key=lambda q: q.accuracy) if ok else None
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in own
             if t.datetime_complete and t.datetime_start and t.user_attrs.get("duplicate_of") is None]
    mean = sum(spans) / len(spans) if spans else (time.time() - start) / max(ran, 1)
    left = max(n - len(own), 0) * mean / max(running, 1)
    twin = p.extra.get("duplicate_of")
    where = f"trial {twin}" if isinstance(twin, int) else twin
    dup = f" (already measured: {where}, not run again)" if twin is not None else ""
    return (f"[trial {len(own)}/{n}] #{p.extra.get('trial')} val {100 * p.accuracy:6.2f}% ({p.drop:+.2f} pts) "
            f"latency {p.latency_ratio:.3f}x {p.latency_p50_ms:.2f} ms{dup} | best feasible so far: "
            + (f"{100 * best.accuracy:.2f}% at {best.latency_ratio:.3f}x ({best.source})" if best else "none yet")
            + f" | {time.time() - start:.0f}s, about {left:.0f}s left"
            + (f", {running} running in other workers" if running else ""))


def seeds_for(points: list[Point], space: Space, budget: Any, dense: Point) -> list[tuple]:
    """Stage-one points inside the study's space, as (params, point, objectives, violation)."""
    out, seen = [], set()
    for p in points:
        if p.source == "dense":
            continue
        params = space.params(p.plan)
        if params is None or plan_key(p.plan) in seen:
            continue
        seen.add(plan_key(p.plan))
        if not all(math.isfinite(v) for v in objectives(p, budget, dense)):
            continue
        out.append((params, p, objectives(p, budget, dense), constraint(p, budget, dense)))
    return out
