"""The final choice, decided by the full fine-tune: the front ranks plans, the fine-tune picks one.

Every point of the front is scored after the cut (BatchNorm re-estimated) or after a short
trial fine-tune: a proxy for what the plan recovers to. Under an accuracy budget the proxy is
pessimistic for the cut plans: on ``fmnist_teacher`` no cut plan was within 0.5 points after a
1-epoch trial on 2,000 samples, so the search returned the dense model as int8, where a plan
with 0.43 of the MACs, fine-tuned 3 epochs, is within 0.12 points (``recipes/fmnist_int8.yaml``).

So the budget is checked on what ships. Under ``max_drop``, the front's points faster than
the proxy's choice are put in order of measured latency and bisected with the full fine-tune
(recovered accuracy falls with latency along a front; points within timing noise of each
other in latency count as one, the more accurate by the proxy kept): each probe is fine-tuned exactly as
the chosen model is (and quantized, for an int8 point), scored on validation, and the fastest
probe within the drop wins; when none is, the proxy's choice stands. ``k`` probes cover a
front of ``2**k - 1`` faster points. Under a latency, size or MACs bound (measured exactly,
so every point is feasible or not), the ``k`` feasible points with the best proxy accuracy are
fine-tuned and the most accurate on validation wins.

Test accuracy is not used: the winner is scored on test once, by the caller.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from torchslim.search.finetunes import finetuned
from torchslim.search.front import Point
from torchslim.search.precision import INT8_MIN_GAIN, finish_int8
from torchslim.search.recipe import FINETUNE_ID
from torchslim.search.sensitivity import accuracy


def finetune_seed(recipe_seed: int, stage_id: str = FINETUNE_ID) -> int:
    """The seed the pipeline gives a stage (``RunContext.seed``): the search fine-tunes with it so
    the emitted recipe retraces the same batches."""
    digest = hashlib.sha256(f"{recipe_seed}:{stage_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def recovery_kd() -> Any:
    """The search's default fine-tune objective: Hinton KD from the dense model at T = 2, alpha = 0.5.

    Not the library's default (T = 1, chosen for small students trained from scratch, see
    :class:`torchslim.KDConfig`): a cut model recovering from its own dense original did better at
    T = 2. After the 3-epoch fine-tune, validation points lost against the dense model at T = 1 / T = 2:
    0.82 / 0.48 and 0.64 / 0.34 (fmnist_teacher, plans at 0.31 and 0.40 of the MACs) and 0.40 / 0.08
    (fmnist_student, 0.53 of the MACs), one seed each, on the benchmark's own models (``benchmarks/README.md``,
    ``auto_compression.py``). The search writes the objective into the recipe it emits, so the
    recipe replays it whatever the defaults become.
    """
    from torchslim.distill import DistillConfig, KDConfig

    return DistillConfig(logits=KDConfig(temperature=2.0, alpha=0.5))


def recovery_finetune(finetune: Any) -> Any:
    """The config a search fine-tune trains with: what ``fit`` picks for a pruned model, written out.

    Every fine-tune of a search recovers a compressed model (channels removed, masks, shared
    weights), so it gets :meth:`~torchslim.TrainConfig.for_pruned_model`'s 3x ``lr`` and
    ``flat_cosine`` where those were not given, also for a plan ``fit`` would not see as pruned
    (shared weights only; a Torch-Pruning baseline in the benchmarks). The emitted recipe writes
    every field of its configs, so its replay trains exactly as the search did. ``None`` stays ``None``.
    """
    return finetune.for_pruned_model() if finetune is not None else None


def kd_finetune_(model: nn.Module, teacher: nn.Module, train: Any, val: Any, config: Any, *, seed: int,
                 kd: Any = None, stage: str = FINETUNE_ID, cache_dir: Any = None) -> list[dict[str, Any]]:
    """KD fine-tune in place, as the pipeline's ``finetune`` stage with ``teacher`` does (same loss, cache, seed use).

    ``kd`` None: :func:`recovery_kd`. ``stage`` names the fine-tune in records and errors.
    ``cache_dir``: where the teacher's outputs are cached as files (None: in memory, this call only).
    """
    from torchslim.distill import DistillObjective, prepare_teacher_cache
    from torchslim.train import fit

    kd = kd if kd is not None else recovery_kd()
    teacher = copy.deepcopy(teacher).eval()
    cache = prepare_teacher_cache(teacher, train, kd, config, cache_dir=cache_dir)
    with DistillObjective(model, teacher, kd, example=train.x[:2], teacher_cache=cache,
                          label_smoothing=config.label_smoothing) as loss:
        return fit(model, train, config, objective=loss, val=val, seed=seed, stage=stage, progress=False)


def finish_point(run: Any, chosen: Point, train: Any, val: Any, finetune: Any, kd: Any,
            seed: int) -> tuple[nn.Module, dict[str, Any], Any]:
    """A point as the recipe builds it (cut, KD fine-tune, int8 for an int8 point), scored on val.

    Returns the float model, its metrics (of the int8 file for an int8 point) and the
    :class:`~torchslim.quant.QuantizedModel` (None for fp32). A packed point is finished by
    :func:`~torchslim.search.packed.finish_packed`.
    """
    if chosen.precision == "packed":
        from torchslim.search.packed import finish_packed

        return (*finish_packed(run, chosen, train, val, finetune, kd, seed), None)
    m = run.m  # the search's measurer: dense model, builder, int8 settings
    if chosen.source == "dense":
        model = copy.deepcopy(m.dense)
    elif finetune is not None and finetune.epochs > 0:
        # No BatchNorm re-estimation here: the recipe's prune_channels stage has none, and the
        # fine-tune's training passes re-estimate the statistics anyway.
        model = finetuned(run, chosen.plan, FINETUNE_ID, train, val, finetune, finetune_seed(seed), kd)
    else:
        model = m.build(chosen.plan)
    model.eval()
    val_acc = accuracy(model, val.x, val.y)
    metrics: dict[str, Any] = {"val_accuracy": val_acc, "val_drop": 100 * (run.dense_acc - val_acc),
                               "finetune_epochs": finetune.epochs if finetune is not None and chosen.source != "dense"
                               else 0}
    quantized = None
    if chosen.precision == "int8":
        quantized, q_metrics = finish_int8(model, run.int8_cfg, train, val, None, run.budget.threads, run.dense_acc)
        metrics = {**metrics, **q_metrics}
    return model, metrics, quantized


def score_on_test(model: nn.Module, quantized: Any, test: Any, threads: int) -> dict[str, Any]:
    """The chosen model scored once on test: its int8 file in ONNX Runtime (and the float export), or the model."""
    if test is None:
        return {"test_accuracy": None}
    if quantized is None:
        return {"test_accuracy": accuracy(model, test.x, test.y)}
    return {"test_accuracy": quantized.evaluate(test, threads=threads)["accuracy"],
            "fp32_test_accuracy": quantized.evaluate(test, precision="fp32", threads=threads)["accuracy"]}


@dataclass
class Finalist:
    """A point fine-tuned as the chosen model is: its model, validation metrics and int8 file (or None)."""

    point: Point
    model: Any
    metrics: dict[str, Any]
    quantized: Any = None
    feasible: bool = True

    def record(self) -> dict[str, Any]:
        """What ``pareto.json`` keeps of it."""
        p = self.point
        return {"plan": dict(p.plan), "source": p.source, "precision": p.precision,
                "latency_ratio": p.latency_ratio, "proxy_accuracy": p.accuracy, "proxy_drop": p.drop,
                "val_accuracy": self.metrics["val_accuracy"], "val_drop": self.metrics["val_drop"],
                "feasible": self.feasible}


Evaluate = Callable[[Point], tuple[Any, dict[str, Any], Any]]


def _same_plan(a: Point, b: Point) -> bool:
    return a.plan == b.plan and a.source == b.source


#: Latencies within this fraction of each other are one latency (timing noise): among such
#: points the most accurate by the proxy is the one fine-tuned. On fmnist_teacher the bisection
#: otherwise chose a plan at 0.226x (0.48 points lost after the fine-tune) over one at 0.229x
#: (0.34 points lost), a difference the timings cannot tell apart.
LATENCY_NOISE = 0.05

#: Validation points of proxy drop within which a point counts as on the front for the finalists:
#: about one standard error of an accuracy near 90 % on 5,000 validation samples (0.42 points).
#: On fmnist_teacher a uniform plan at 0.296x, 0.08 proxy points behind the 0.234x plan and so off
#: the front, ended as accurate as the dense model after the full fine-tune, and faster than the
#: plan the front's finalists chose (0.339x).
PROXY_NOISE = 0.5


def drop_candidates(front: list[Point], points: list[Point], proxy: Point | None,
                    noise: float = LATENCY_NOISE, margin: float = PROXY_NOISE) -> list[Point]:
    """Under ``max_drop``: the cut plans worth a full fine-tune, fastest first.

    The points faster than ``proxy`` (the proxy's feasible choice; all of them when it has none)
    that are on the front or within ``margin`` proxy points of it (of the front's best drop at
    their latency or faster: the proxy cannot tell them apart), the dense model excluded (it is
    not fine-tuned). An int8 point whose fp32 twin is within
    :data:`~torchslim.search.precision.INT8_MIN_GAIN` of its latency gives way to the twin, as the
    proxy's choice does. Points whose latencies are within ``noise`` (relative) of the fastest of
    their run count as one: only the most accurate by the proxy stays.
    """
    bound = proxy.latency_ratio if proxy is not None else float("inf")

    def near_front(p: Point) -> bool:
        reach = [q.drop for q in front if q.latency_ratio <= p.latency_ratio]
        return p.precision != "packed" and bool(reach) and p.drop <= min(reach) + margin

    out: list[Point] = []
    pool = list(front) + [q for q in points if q not in front and near_front(q)]
    for p in sorted(pool, key=lambda q: q.latency_ratio):
        if p.source == "dense" or p.latency_ratio >= bound:
            continue
        if p.precision == "int8":
            twins = [q for q in points if q.precision == "fp32" and _same_plan(q, p)]
            if twins and p.latency_ratio > (1 - INT8_MIN_GAIN) * min(q.latency_ratio for q in twins):
                p = min(twins, key=lambda q: q.latency_ratio)
        if not any(_same_plan(q, p) and q.precision == p.precision for q in out):
            out.append(p)
    kept: list[list[Point]] = []
    for p in sorted(out, key=lambda q: q.latency_ratio):
        if kept and p.latency_ratio <= (1 + noise) * kept[-1][0].latency_ratio:
            kept[-1].append(p)
        else:
            kept.append([p])
    return [max(run, key=lambda q: (q.accuracy, -q.latency_ratio)) for run in kept]


def bisect_drop(candidates: list[Point], max_drop: float, evaluate: Evaluate, k: int,
                say: Callable[[str], None]) -> tuple[Finalist | None, list[Finalist]]:
    """The fastest candidate within ``max_drop`` after the full fine-tune, found with at most ``k`` probes.

    ``candidates`` are fastest first; the fine-tuned accuracy is taken to rise with latency, so
    the feasible candidates are a suffix, and a bracketing search finds where it starts. The first
    probe is the middle one; once a probe on each side of the drop is known, the next is the
    candidate nearest to where the straight line between their measured (latency, drop) crosses
    ``max_drop`` (regula falsi), not the middle: with few probes a bisection stops far from the
    crossing when one probe lands just outside the drop. The drop falls faster with latency near
    the fast end, so the line tends to cross on the feasible side of the true crossing.

    Returns:
        The winner (None when no probe met the drop) and every probe, in the order run.
    """
    lo, hi, best = 0, len(candidates), None
    below: Finalist | None = None  # the slowest probe found outside the drop so far
    tried: list[Finalist] = []
    while lo < hi and len(tried) < k:
        mid = (lo + hi) // 2 if best is None or below is None else _crossing(candidates, lo, hi, below, best, max_drop)
        f = _probe(candidates[mid], evaluate, say, len(tried) + 1, k)
        f.feasible = f.metrics["val_drop"] <= max_drop + 1e-9
        tried.append(f)
        if f.feasible:
            best, hi = f, mid
        else:
            below, lo = f, mid + 1
    return best, tried


def _crossing(candidates: list[Point], lo: int, hi: int, out: Finalist, ok: Finalist, max_drop: float) -> int:
    """The index in ``[lo, hi)`` of the candidate nearest (in latency) to where the line through the
    probes ``out`` (outside the drop) and ``ok`` (within it) crosses ``max_drop``.

    Nearest, not the first one above: the candidates between two probes can be few, and the first
    above the crossing can be far slower than one just below it (fmnist_student: 0.80x taken where
    0.47x, 0.06x below the line's 0.53x, was within the drop).
    """
    (t0, d0), (t1, d1) = [(f.point.latency_ratio, f.metrics["val_drop"]) for f in (out, ok)]
    share = (d0 - max_drop) / (d0 - d1) if d0 > d1 else 0.5
    target = t0 + share * (t1 - t0)
    return min(range(lo, hi), key=lambda i: abs(candidates[i].latency_ratio - target))


def best_within_bound(feasible: list[Point], evaluate: Evaluate, k: int,
                      say: Callable[[str], None]) -> tuple[Finalist | None, list[Finalist]]:
    """Under a latency / size / MACs bound: the ``k`` most accurate feasible cut points (by the
    proxy) fine-tuned; the most accurate on validation wins (None when there is no cut point).

    A finalist whose metrics say it no longer ``fits`` (a packed file that came out over the size
    bound after the fine-tune) cannot win.
    """
    cut = sorted((p for p in feasible if p.source != "dense"), key=lambda p: (-p.accuracy, p.latency_ratio))
    tried = [_probe(p, evaluate, say, i, min(k, len(cut))) for i, p in enumerate(cut[:k], 1)]
    for f in tried:
        f.feasible = f.metrics.get("fits", True)
    best = max((f for f in tried if f.feasible), key=lambda f: (f.metrics["val_accuracy"], -f.point.latency_ratio),
               default=None)
    return best, tried


def _probe(p: Point, evaluate: Evaluate, say: Callable[[str], None], i: int, k: int) -> Finalist:
    model, metrics, quantized = evaluate(p)
    say(f"finalist {i}/{k}: {p.source}/{p.precision} at {p.latency_ratio:.3f}x dense, proxy {p.drop:+.2f} pts -> "
        f"val {100 * metrics['val_accuracy']:.2f}% ({metrics['val_drop']:+.2f} pts) after the full fine-tune")
    return Finalist(p, model, metrics, quantized)
