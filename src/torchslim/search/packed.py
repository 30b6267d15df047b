"""Per-layer unstructured sparsity and weight-sharing bits: the axes that shrink the packed ``.slim`` file.

Neither axis makes a file faster in ONNX Runtime (its kernels are dense), so they serve a
size bound (``Budget(size_bytes=...)``); the size counted for such a point is the packed
``.slim`` file (:func:`torchslim.quant.pack.pack`: relative indices, codebooks, Huffman codes),
the Deep-Compression artifact, written and measured, never estimated.

1. *Bases.* The dense model and ``SearchSpace.packed_bases - 1`` fp32 channel plans of the
   latency front at its inner quantiles (one: its middle): the channel cut and these axes compose.
2. *Tables.* For each base, each Conv/Linear layer alone is compressed to each
   (sparsity, bits) choice: its accuracy drop on the sensitivity subset (BatchNorm
   re-estimated, no fine-tune) and its weight tensor's bytes in the packed file. A packed
   file is its header plus one stream per tensor, so the bytes add up exactly; the drops are
   taken to add up, as the channel tables' do.
3. *Allocation.* The multiple-choice knapsack solved exactly (dynamic programming over bytes)
   at a few fractions of the bound (:data:`BOUND_TARGETS`), and a Lagrangian sweep over
   ``drop + λ · bytes`` (the knapsack's lower hull) spread over the other sizes: at most
   ``max_candidates`` plans, each built, packed, scored on the whole validation split and timed.
4. *Uniform baseline.* The dense model with one (sparsity, bits) choice in every layer.
5. *Optuna trials* (``trials > 0``) sample channel plans; each trial's fine-tuned model is also
   compressed with the codes the nearest base's table solves at the bound and measured as its
   packed file (:func:`packed_twin`), a point that joins the size front like a sweep point (the
   study's objectives stay the fp32 file's). A worker process measures these twins when it runs
   beside the run folder (the tables are read from its cache).

A chosen packed point is finished as Deep Compression does it and as the emitted recipe
replays it: channels cut, weights pruned per layer (magnitude), the full KD fine-tune with
the masks held, k-means weight sharing, a shorter KD fine-tune of the centroids
(:func:`share_finetune`), and the packed file.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.nn as nn

from torchslim.errors import ConfigError
from torchslim.search.front import Point
from torchslim.search.sensitivity import accuracy, recalibrate_bn_

#: Recipe stage ids of the packed axes (the seeds of their fine-tunes derive from them).
SPARSE_ID, SHARE_ID, PACK_ID = "sparse", "shared", "packed"
#: What a size bound searches when the space names neither axis.
DEFAULT_SPARSITY = [0.5, 0.75, 0.9, 0.95]
DEFAULT_SHARE_BITS = [8, 5, 4, 3]
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: One layer's choice: (fraction of its weights pruned, weight-sharing bits or None for float).
Code = tuple[float, "int | None"]


def resolve_axes(space: Any, budget: Any) -> tuple[list[float], list[int]]:
    """The sparsity and bits choices this search measures (both empty: the axes are off).

    Raises:
        ConfigError: an axis given under a budget it cannot serve (latency, MACs, accuracy drop).
    """
    sparsity, bits = space.sparsity, space.share_bits
    if budget.size_bytes is None:
        if sparsity or bits:
            raise ConfigError("SearchSpace.sparsity and share_bits shrink the packed .slim file, not its latency "
                              "in a dense runtime nor its MACs: use them with a size budget (Budget(size_bytes=...), "
                              f"torchslim auto --size), or leave them unset (budget: {budget.describe()})")
        return [], []
    if sparsity is None and bits is None:
        sparsity, bits = DEFAULT_SPARSITY, DEFAULT_SHARE_BITS
    return sorted(set(sparsity or [])), sorted(set(bits or []), reverse=True)


def code_choices(sparsity: list[float], bits: list[int]) -> list[Code]:
    """Every (sparsity, bits) pair, the untouched layer ``(0.0, None)`` first."""
    return [(s, b) for s in [0.0, *sparsity] for b in [None, *bits]]


def code_label(code: Code) -> str:
    """``"0.9/4b"``, ``"0/fp32"``: a choice as a JSON key and in messages."""
    s, b = code
    return f"{s:g}/{f'{b}b' if b is not None else 'fp32'}"


def parse_code(label: str) -> Code:
    s, b = label.split("/")
    return float(s), (None if b == "fp32" else int(b[:-1]))


def compressible_layers(model: nn.Module) -> list[str]:
    """The Conv/Linear layers (with a weight that trains), in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, _LAYERS) and m.weight.requires_grad]


def pruning_config(plan: dict[str, Code]) -> Any:
    """The per-layer magnitude pruning of ``plan`` (None when it prunes nothing)."""
    from torchslim.prune import UnstructuredPruning

    overrides = {n: s for n, (s, _) in plan.items() if s > 0}
    if not overrides:
        return None
    # Within one layer every magnitude criterion ranks the same: l1 names it plainly.
    return UnstructuredPruning(criterion="l1", scope="layer", sparsity=0.0, overrides=overrides,
                               include=list(overrides), min_kept=1)


def sharing_config(plan: dict[str, Code]) -> Any:
    """The per-layer weight sharing of ``plan`` (None when every layer stays float)."""
    from torchslim.quant.sharing import WeightSharing

    if all(b is None for _, b in plan.values()):
        return None
    return WeightSharing(overrides={n: b for n, (_, b) in plan.items()}, init="linear", iterations=50)


def share_finetune(finetune: Any) -> Any:
    """The centroids' fine-tune after sharing: a third of the weights' epochs (at least 1), same settings."""
    return finetune.model_copy(update={"epochs": max(1, finetune.epochs // 3)})


def compress_(model: nn.Module, plan: dict[str, Code], *, finalize: bool = True) -> nn.Module:
    """Prune and share ``model``'s layers in place as ``plan`` says (shared layers baked unless told not to)."""
    from torchslim.prune import prune_
    from torchslim.quant.sharing import finalize_sharing_, share_weights_

    p, s = pruning_config(plan), sharing_config(plan)
    if p is not None:
        prune_(model, p)
    if s is not None:
        share_weights_(model, s)
        if finalize:
            finalize_sharing_(model)
    return model


def packed_size(model: nn.Module, example: Any, folder: Path) -> tuple[int, dict[str, int]]:
    """Bytes of ``model``'s packed file, written to ``folder`` and measured, and each tensor's share."""
    from torchslim.quant.pack import pack

    report = pack(model, folder / "candidate.packed.slim", input_shape=list(example.shape[1:]))
    (folder / "candidate.packed.slim").unlink()
    return report.file_bytes, {layer.name: layer.stored_bytes for layer in report.layers}


@dataclass
class PackedTables:
    """One base's per-layer tables: ``drop[layer][code]`` (points, against the base) and ``bytes[layer][code]``.

    ``base_drop`` is the base's own drop against the dense model (whole validation split).
    """

    base: str
    plan: dict[str, int]
    file_bytes: int
    drop: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    base_drop: float = 0.0

    def predict(self, codes: dict[str, Code]) -> tuple[float, int]:
        """Predicted (drop in points against the dense model, packed bytes) of ``codes`` on this base."""
        drop, size = self.base_drop, self.file_bytes
        for layer, code in codes.items():
            key = code_label(code)
            drop += self.drop[layer][key]
            size += self.bytes[layer][key] - self.bytes[layer][code_label((0.0, None))]
        return drop, size

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "plan": self.plan, "base_drop": self.base_drop, "file_bytes": self.file_bytes,
                "drop": self.drop, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PackedTables":
        """The inverse of :meth:`to_dict` (a resumed search's tables from its run folder)."""
        return cls(d["base"], d["plan"], d["file_bytes"], d["drop"], d["bytes"], d["base_drop"])


def cached_packed_tables(folder: Path, key: str) -> list[PackedTables]:
    """The packed tables a search with settings ``key`` cached in ``folder`` (``[]`` if none)."""
    from torchslim.search.study import load_packed_tables

    return [PackedTables.from_dict(d) for d in load_packed_tables(folder, key)]


def build_packed_tables(base: nn.Module, label: str, plan: dict[str, int], choices: list[Code], run: Any,
                        val_x: Any, val_y: Any, say: Callable[[str], None], base_drop: float = 0.0) -> PackedTables:
    """Each layer of ``base`` compressed alone to each choice: drop on the subset and bytes in the packed file."""
    from torchslim.quant.pack import packed_tensor_bytes

    m, space = run.m, run.space
    # Against the base with its BatchNorm re-estimated as every variant's is: a drop is then the
    # layer's change alone, not the re-estimation's noise (0.4 points of 1,000 samples on fmnist_student).
    reference = copy.deepcopy(base)
    recalibrate_bn_(reference, m.train_x, space.bn_batches, space.bn_batch_size)
    base_acc = accuracy(reference, val_x, val_y)
    file_bytes, dense_rows = packed_size(base, m.example, m.folder)
    drop: dict[str, dict[str, float]] = {}
    size: dict[str, dict[str, int]] = {}
    for layer in compressible_layers(base):
        key = f"{layer}.weight"
        drop[layer], size[layer] = {code_label((0.0, None)): 0.0}, {code_label((0.0, None)): dense_rows[key]}
        for code in choices[1:]:
            model = compress_(copy.deepcopy(base), {layer: code})
            recalibrate_bn_(model, m.train_x, space.bn_batches, space.bn_batch_size)
            drop[layer][code_label(code)] = 100.0 * (base_acc - accuracy(model, val_x, val_y))
            size[layer][code_label(code)] = packed_tensor_bytes(model, key)
        say(f"packed sensitivity ({label}) {layer}: " + ", ".join(
            f"{k} {drop[layer][k]:+.2f} pts/{size[layer][k]:,} B" for k in list(drop[layer])[1:]))
    return PackedTables(label, dict(plan), file_bytes, drop, size, base_drop)


def allocate_codes(tables: PackedTables, choices: list[Code], n_lambdas: int) -> list[dict[str, Code]]:
    """A Lagrangian sweep over ``drop + λ · bytes``: the distinct per-layer plans, largest first."""
    labels = [code_label(c) for c in choices]
    slopes = [(tables.drop[g][b] - tables.drop[g][a]) / (tables.bytes[g][a] - tables.bytes[g][b])
              for g in tables.drop for a in labels for b in labels
              if tables.bytes[g][a] > tables.bytes[g][b] and tables.drop[g][b] > tables.drop[g][a]]
    grid = [0.0, *(np.geomspace(min(slopes) / 2, max(slopes) * 2, n_lambdas).tolist() if slopes else []), math.inf]
    seen: dict[tuple, dict[str, Code]] = {}
    for lam in grid:
        plan = {}
        for g in tables.drop:
            if math.isinf(lam):
                best = min(labels, key=lambda k: (tables.bytes[g][k], tables.drop[g][k]))
            else:
                best = min(labels, key=lambda k: (tables.drop[g][k] + lam * tables.bytes[g][k], tables.bytes[g][k]))
            plan[g] = parse_code(best)
        seen.setdefault(tuple(sorted(plan.items())), plan)
    return sorted(seen.values(), key=lambda p: -tables.predict(p)[1])


#: Under a size bound, plans are also solved for exactly at these fractions of it (the highest
#: leaves room for the prediction's error and for k-means coding fine-tuned weights a little larger).
BOUND_TARGETS = (0.97, 0.9, 0.8, 0.65)


def knapsack_codes(tables: PackedTables, choices: list[Code], bytes_bound: int,
                   resolution: int = 400) -> dict[str, Code] | None:
    """The plan of least predicted drop whose predicted bytes are within ``bytes_bound`` (None: none is).

    The multiple-choice knapsack solved by dynamic programming over bytes rounded up to
    ``resolution`` steps of the budget left for the layers' weights (so a plan it returns is
    within the bound, and the best one up to that rounding), where the Lagrangian sweep only
    reaches the hull's corners (on fmnist_student it jumped from 36 KB to 12 KB,
    past every plan near a 25 KB bound).
    """
    labels = [code_label(c) for c in choices]
    untouched = code_label((0.0, None))
    fixed = tables.file_bytes - sum(tables.bytes[g][untouched] for g in tables.drop)
    room = bytes_bound - fixed
    if room <= 0:
        return None
    step = room / resolution
    best: dict[int, tuple[float, dict[str, str]]] = {0: (0.0, {})}  # units used -> (least drop, plan)
    for g in tables.drop:
        nxt: dict[int, tuple[float, dict[str, str]]] = {}
        for used, (drop, plan) in best.items():
            for k in labels:
                u = used + math.ceil(tables.bytes[g][k] / step - 1e-9)
                if u > resolution:
                    continue
                d = drop + tables.drop[g][k]
                if u not in nxt or d < nxt[u][0]:
                    nxt[u] = (d, {**plan, g: k})
        best = nxt
    if not best:
        return None
    _, plan = min(best.values(), key=lambda v: v[0])
    return {g: parse_code(k) for g, k in plan.items()}


def bound_plans(tables: PackedTables, choices: list[Code], bytes_bound: int | None) -> list[dict[str, Code]]:
    """The knapsack's plans at :data:`BOUND_TARGETS` of the bound, distinct (none without a bound)."""
    if bytes_bound is None:
        return []
    out: dict[tuple, dict[str, Code]] = {}
    for f in BOUND_TARGETS:
        plan = knapsack_codes(tables, choices, int(f * bytes_bound))
        if plan is not None:
            out.setdefault(tuple(sorted(plan.items())), plan)
    return list(out.values())


def _spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items evenly spread, both ends included."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted({int(round(i)) for i in np.linspace(0, len(items) - 1, count)})]


def _inner(items: list[Any], count: int) -> list[Any]:
    """``count`` items at the inner quantiles (one: the middle), the ends left out when there are more."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted({int(round((j + 1) * (len(items) - 1) / (count + 1))) for j in range(count)})]


def measure_packed(run: Any, plan: dict[str, int], source: str, codes: dict[str, Code],
                   tables: PackedTables | None, base: nn.Module | None = None) -> Point:
    """``plan``'s channel cut (``base``, when already built), then ``codes``; packed, scored on the whole
    validation split and timed."""
    m, space, budget = run.m, run.space, run.budget
    model = copy.deepcopy(base) if base is not None else _base_model(run, plan)
    compress_(model, codes)
    recalibrate_bn_(model, m.train_x, space.bn_batches, space.bn_batch_size)
    acc = accuracy(model, run.val.x, run.val.y)
    size, _ = packed_size(model, m.example, m.folder)
    lat = m.latency(model)
    predicted = tables.predict(codes) if tables is not None else (None, None)
    extra = {"packed": {layer: code_label(c) for layer, c in codes.items()}, "base": tables.base if tables else
             "dense", "predicted_bytes": predicted[1], "trial_finetune_epochs": 0}
    return Point(dict(plan), source, acc, 100 * (run.dense_acc - acc), lat["p50_ms"], lat["p90_ms"], lat["ratio"],
                 size, m.macs(model), predicted[0], None, budget.batch, budget.runtime, extra, precision="packed")


def packed_twin(run: Any, model: nn.Module, point: Point) -> Point | None:
    """An Optuna trial's model also as a packed file (under a size bound): its int8-twin counterpart.

    Trials sample channel plans; under a tight size bound no fp32 file of one can meet it, so each
    trial's fine-tuned model is also compressed with the (sparsity, bits) codes that the packed
    table of the nearest base (in kept fractions) solves at the bound, its bytes scaled layer by
    layer to the trial's weight counts, then packed and measured like a stage-one packed point
    (``source="trial"``). None when the search has no packed tables or no codes fit.
    """
    if not run.packed_tables or run.budget.size_bytes is None:
        return None
    sizes = {g.label: g.size for g in run.groups}
    table = min(run.packed_tables, key=lambda t: sum(abs(t.plan.get(g, n) - point.plan.get(g, n)) / n
                                                     for g, n in sizes.items()))
    base = _base_weight_counts(run, table)
    scale = {name: model.get_submodule(name).weight.numel() / max(base[name], 1) for name in table.drop}
    scaled = PackedTables(table.base, dict(point.plan), table.file_bytes, table.drop,
                          {g: {k: int(round(v * scale[g])) for k, v in d.items()} for g, d in table.bytes.items()},
                          table.base_drop)
    untouched = code_label((0.0, None))
    scaled.file_bytes += sum(scaled.bytes[g][untouched] - table.bytes[g][untouched] for g in table.drop)
    codes = knapsack_codes(scaled, code_choices(*run.packed_axes), int(BOUND_TARGETS[0] * run.budget.size_bytes))
    return None if codes is None else measure_packed(run, point.plan, "trial", codes, scaled, model)


def _base_weight_counts(run: Any, table: PackedTables) -> dict[str, int]:
    """Each table layer's weight count in the table's base model (built once per base and run, then kept)."""
    cache = run.__dict__.setdefault("_packed_base_counts", {})
    key = tuple(sorted(table.plan.items()))
    if key not in cache:
        base = _base_model(run, table.plan, recalibrate=False)
        cache[key] = {name: base.get_submodule(name).weight.numel() for name in table.drop}
    return cache[key]


def _base_model(run: Any, plan: dict[str, int], *, recalibrate: bool = True) -> nn.Module:
    from torchslim.search.space import dense_plan

    if plan == dense_plan(run.groups):
        return copy.deepcopy(run.m.dense).eval()
    return run.m.build(plan, recalibrate=recalibrate)


def packed_points(run: Any, dense: Point, points: list[Point], say: Callable[[str], None]) -> list[Point]:
    """The packed axes' points (sweep per base, and the uniform baseline on the dense model); tables on ``run``."""
    from torchslim.search.front import pareto_front

    sparsity, bits = run.packed_axes
    choices = code_choices(sparsity, bits)
    space = run.space
    n = min(space.sensitivity_samples, len(run.val.y))
    cut = [p for p in pareto_front([p for p in points if p.precision == "fp32"]) if p.source != "dense"]
    # The front's middle, not its fastest end: there the cut has already cost the accuracy that
    # sparsity and sharing could have kept.
    bases = [dense, *_inner(cut, space.packed_bases - 1)] if space.packed_bases > 1 else [dense]
    out: list[Point] = []
    run.packed_tables = []
    for base in bases:
        label = "dense" if base is dense else f"{base.source} {base.latency_ratio:.3f}x"
        built = _base_model(run, base.plan)  # once per base: every plan on it starts from a copy
        tables = build_packed_tables(built, label, base.plan, choices, run, run.val.x[:n], run.val.y[:n], say,
                                     base_drop=base.drop)
        run.packed_tables.append(tables)
        # Plans solved at the bound first, then the sweep's spread over the rest of the sizes.
        at_bound = bound_plans(tables, choices, run.budget.size_bytes)
        keys = {tuple(sorted(p.items())) for p in at_bound}
        swept = [p for p in allocate_codes(tables, choices, space.lambdas) if tuple(sorted(p.items())) not in keys]
        plans = at_bound + _spread(swept, max(space.max_candidates - len(at_bound), 2))
        for j, codes in enumerate(plans, 1):
            p = measure_packed(run, base.plan, "sweep", codes, tables, built)
            out.append(p)
            say(f"[packed {label} {j}/{len(plans)}] val {100 * p.accuracy:6.2f}% ({p.drop:+.2f} pts, predicted "
                f"{p.predicted_drop:+.2f}) {p.bytes:,} bytes (predicted {p.extra['predicted_bytes']:,}) "
                f"latency {p.latency_ratio:.3f}x")
    if run.uniform:
        layers = compressible_layers(run.m.dense)
        for code in choices[1:]:
            p = measure_packed(run, dense.plan, "uniform", {layer: code for layer in layers}, None, run.m.dense)
            out.append(p)
            say(f"[packed uniform {code_label(code)}] val {100 * p.accuracy:6.2f}% ({p.drop:+.2f} pts) "
                f"{p.bytes:,} bytes")
    return out


def finish_packed(run: Any, chosen: Point, train: Any, val: Any, finetune: Any, kd: Any,
                  seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A packed point as the recipe builds it: cut, prune, KD fine-tune, share, KD fine-tune the centroids.

    Returns the model (shared layers baked, masks kept) and its validation metrics, with the
    bytes of its packed file and whether they still meet the size bound (k-means on the
    fine-tuned weights codes them a little differently from the proxy's).
    """
    from torchslim.prune import prune_
    from torchslim.quant.sharing import finalize_sharing_, share_weights_
    from torchslim.search.finalists import finetune_seed, recovery_finetune
    from torchslim.search.finetunes import stored_finetune
    from torchslim.search.recipe import FINETUNE_ID

    codes = {layer: parse_code(c) for layer, c in chosen.extra["packed"].items()}
    finetune = recovery_finetune(finetune)  # written out: the centroids' fine-tune below copies it
    tuned = finetune is not None and finetune.epochs > 0
    p, s = pruning_config(codes), sharing_config(codes)

    def pruned() -> nn.Module:
        model = _base_model(run, chosen.plan, recalibrate=not tuned)
        if p is not None:
            prune_(model, p)
        return model

    # Both fine-tunes go through the run's store (when it has one), keyed by the layers' codes too:
    # a search run again, or another size bound given the same store, loads them.
    key = {"packed": dict(sorted(chosen.extra["packed"].items()))}
    model = (stored_finetune(run, chosen.plan, FINETUNE_ID, train, val, finetune, finetune_seed(seed, FINETUNE_ID),
                             kd, pruned, key) if tuned else pruned())
    if s is not None:
        def shared() -> nn.Module:  # k-means on the fine-tuned weights: the same codebooks every call
            out = copy.deepcopy(model)
            share_weights_(out, s)
            return out

        model = (stored_finetune(run, chosen.plan, SHARE_ID, train, val, share_finetune(finetune),
                                 finetune_seed(seed, SHARE_ID), kd, shared, key) if tuned else shared())
        finalize_sharing_(model)
    if not tuned:
        recalibrate_bn_(model, run.m.train_x, run.space.bn_batches, run.space.bn_batch_size)
    model.eval()
    val_acc = accuracy(model, val.x, val.y)
    with tempfile.TemporaryDirectory(prefix="torchslim-packed-") as tmp:
        size, _ = packed_size(model, run.m.example, Path(tmp))
    bound = run.budget.size_bytes
    return model, {"val_accuracy": val_acc, "val_drop": 100 * (run.dense_acc - val_acc), "bytes": size,
                   "fits": bound is None or size <= bound,
                   "finetune_epochs": finetune.epochs if tuned else 0,
                   "share_finetune_epochs": share_finetune(finetune).epochs if tuned and s is not None else 0}
