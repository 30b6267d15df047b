"""Coupling: which channels of which layers must be removed together.

The model is traced with ``torch.fx`` and run once on the example inputs
(``ShapeProp``) so every tensor has a shape. Then every channel of every
tensor gets a *channel variable*; an op that ties channels together (a
residual add, a depthwise conv, a BatchNorm reading a conv's output) merges
their variables in a union-find. At the end each set of merged variables is
one removable *unit*: removing it deletes one output channel of every layer
that writes it, one input column of every layer that reads it, one BatchNorm
entry, ... all at once.

Where the layers sit is recorded as *slots*: ``(name, role)`` with a channel
variable per index:

* ``(conv, "out")`` / ``(linear, "out")``: output channels (rows of the weight);
* ``(conv, "in")`` / ``(linear, "in")``: input channels (weight columns). After a
  flatten, one channel covers several columns (channel x spatial positions);
* ``(grouped_conv, "groups")``: whole groups of a grouped or depthwise conv (the
  group's input and output channels go together);
* ``(batchnorm | layernorm | prelu, "out")``: per-channel parameters;
* ``(attention, "heads")``: heads of an ``nn.MultiheadAttention``;
* ``(parameter, "dim<k>")``: a parameter used elementwise (``x * self.scale``),
  sliced along dimension k.

Channels that must not change are *frozen*: the model's inputs and outputs (the
classifier's outputs are never pruned), layers excluded by the config, and
everything that flows through an op this module does not understand. Such an
op is named in :attr:`DependencyGraph.unsupported` and left as it is.

A unit is *equivalent to a mask*: the pruned model computes what the original
computes with the unit's input columns (its readers) set to zero, because every
op between a writer and its readers is channel-wise. Ops that mix channels
(softmax or mean over channels, LayerNorm, reshapes that split channels) freeze
them instead; LayerNorm can be opted in with ``allow_layernorm``.

This module holds the union-find, the results (:class:`DependencyGraph`, ...),
the :class:`ChannelBuilder` that walks the traced graph, and the rule tables;
what each op does to channels lives in :mod:`torchslim.prune.structured.rules`,
and a new layer type gets its rule with :func:`register_channel_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from torchslim.errors import ModelError
from torchslim.prune.selection import name_matches
from torchslim.prune.structured.cost import kept_fractions, remaining_cost
from torchslim.prune.structured.registry import CHANNEL_RULES, ELEMENTWISE_TARGETS, FUNCTION_RULES, METHOD_RULES, module_rule
from torchslim.prune.structured.tracing import any_tensor_meta, describe, flat_nodes, op_name, shape_of, trace

SlotKey = tuple[str, str]

# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Unsupported:
    """An op or module the graph cannot see through; the channels around it stay unpruned."""

    name: str
    op: str
    reason: str


@dataclass
class ChannelGroup:
    """Units that touch the same slots (one conv and its readers, or all convs of a residual stage).

    Attributes:
        slots: the ``(name, role)`` slots the units live in, sorted.
        units: one dict per unit: slot -> indices of that slot the unit owns.
    """

    slots: tuple[SlotKey, ...]
    units: list[dict[SlotKey, list[int]]]

    @property
    def names(self) -> list[str]:
        """Names of the layers (and parameters) in the group, sorted."""
        return sorted({name for name, _ in self.slots})

    def __len__(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class FrozenGroup:
    """Channels that cannot be pruned, and why (the first reason found)."""

    slots: tuple[SlotKey, ...]
    size: int
    reason: str


@dataclass
class DependencyGraph:
    """What :func:`build_dependency_graph` found.

    Attributes:
        groups: prunable channel groups, in graph order.
        frozen: channels that must stay, grouped like ``groups``, with the reason.
        unsupported: ops and modules the graph could not see through (their
            channels are frozen); empty when everything was understood.
        slot_sizes: current size of every slot.
        slot_types: class name of the layer behind every slot.
        macs: MACs of one forward pass on the example inputs, counted per layer
            by the graph (convs, linears, attention), before pruning.
        params: parameters of the model.
    """

    groups: list[ChannelGroup]
    frozen: list[FrozenGroup]
    unsupported: list[Unsupported]
    slot_sizes: dict[SlotKey, int]
    slot_types: dict[SlotKey, str]
    macs: float
    params: int
    mac_terms: list[tuple[float, tuple[SlotKey, ...]]] = field(repr=False, default_factory=list)
    param_terms: list[tuple[float, tuple[SlotKey, ...]]] = field(repr=False, default_factory=list)

    def cost(self, removed: dict[int, Iterable[int]], kind: str = "macs") -> float:
        """MACs (``kind="macs"``) or parameters left after removing units.

        Args:
            removed: group index -> indices of its units to remove.
            kind: ``"macs"`` or ``"params"``.
        """
        return remaining_cost(self, removed, kind)

    def kept_fractions(self, removed: dict[int, Iterable[int]]) -> dict[SlotKey, float]:
        """Fraction of every slot's indices left after removing units."""
        return kept_fractions(self, removed)

    def summary(self) -> str:
        """A few lines: groups, their sizes, frozen channels and unsupported ops."""
        lines = [f"{len(self.groups)} prunable groups, {sum(len(g) for g in self.groups)} units; "
                 f"{self.macs:,.0f} MACs, {self.params:,} params"]
        for g in self.groups:
            lines.append(f"  {len(g):5d} units  {', '.join(g.names)}")
        for f in self.frozen:
            lines.append(f"  {f.size:5d} frozen {', '.join(sorted({n for n, _ in f.slots})) or '-'}: {f.reason}")
        for u in self.unsupported:
            lines.append(f"  unsupported {u.op} at {u.name}: {u.reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# channel variables
# ---------------------------------------------------------------------------


@dataclass
class Tracked:
    """A tensor whose dimension ``dim`` carries channel variables ``vars``."""

    dim: int
    vars: list[int]


class UnionFind:
    """Channel variables merged into sets; a set is frozen (with the first reason given) or prunable."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: list[str | None] = []

    def new(self, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.reason.append(frozen)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.reason[ra] is None:
            self.reason[ra] = self.reason[rb]

    def freeze(self, x: int, reason: str) -> None:
        r = self.find(x)
        if self.reason[r] is None:
            self.reason[r] = reason


class ChannelBuilder:
    """Walks the traced graph once, giving every tensor's channels variables and merging them.

    A channel rule (see :func:`register_channel_rule`) receives the builder, the
    fx node and (for a module) the module, and returns what its output carries:
    a :class:`Tracked` (the dimension and variables of the channels), a tuple of
    them for several outputs, or None when the output carries no prunable channels.
    The methods a rule uses:

    * :meth:`tracked` / :meth:`vars_on`: the variables an input carries;
    * :meth:`slot` / :meth:`new_slot`: record where a layer reads or writes channels,
      as ``(name, role)`` slots that surgery later cuts (roles as in
      :mod:`torchslim.prune.structured.surgery`);
    * :meth:`freeze` / :meth:`unknown`: keep channels, with the reason reported;
    * :meth:`cost_macs` / :meth:`cost_params`: what the layer costs, per slot;
    * :meth:`excluded`: whether the config excludes a name.
    """

    def __init__(self, gm: fx.GraphModule, excluded: Callable[[str], bool], allow_layernorm: bool):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.excluded = excluded
        self.allow_layernorm = allow_layernorm
        self.uf = UnionFind()
        self.info: dict[fx.Node, Any] = {}
        self.slots: dict[SlotKey, list[int]] = {}
        self.slot_types: dict[SlotKey, str] = {}
        self.unsupported: dict[tuple[str, str], Unsupported] = {}
        self.mac_terms: list[tuple[float, tuple[SlotKey, ...]]] = []
        self.param_terms: list[tuple[float, tuple[SlotKey, ...]]] = []
        self.costed: set[str] = set()
        self.attr_ok = self._attrs_used_elementwise()

    # -- variables ------------------------------------------------------
    def fresh(self, n: int, reason: str) -> list[int]:
        """``n`` new variables, frozen for ``reason`` (channels that come from nowhere prunable)."""
        return [self.uf.new(reason) for _ in range(n)]

    def freeze(self, info: Any, reason: str) -> None:
        """Keep every channel ``info`` (a :class:`Tracked` or a tuple of them) carries, for ``reason``."""
        if isinstance(info, Tracked):
            for v in info.vars:
                self.uf.freeze(v, reason)
        elif isinstance(info, (tuple, list)):
            for i in info:
                self.freeze(i, reason)

    def freeze_args(self, node: fx.Node, reason: str) -> bool:
        """Freeze every tracked input of ``node``; True when there was any."""
        found = False
        for a in flat_nodes(node.args, node.kwargs):
            info = self.info.get(a)
            if has_vars(info):
                found = True
                self.freeze(info, reason)
        return found

    def tracked(self, arg: Any) -> Tracked | None:
        """What input ``arg`` carries, or None when it has no channels to prune (or is no node)."""
        info = self.info.get(arg) if isinstance(arg, fx.Node) else None
        return info if isinstance(info, Tracked) else None

    def vars_on(self, arg: Any, dim: int, reason: str) -> list[int]:
        """Channel variables of ``arg`` along ``dim``; fresh frozen ones where it is not tracked there."""
        t = self.tracked(arg)
        if t is not None and t.dim == dim:
            return t.vars
        shape = shape_of(arg)
        return self.fresh(shape[dim] if shape is not None else 0, reason)

    def slot(self, key: SlotKey, vars: list[int], type_name: str) -> list[int]:
        """Record (or, for a layer called again, merge) the variables of a slot."""
        if key not in self.slots:
            self.slots[key] = list(vars)
            self.slot_types[key] = type_name
        else:
            old = self.slots[key]
            if len(old) != len(vars):
                for v in old + vars:
                    self.uf.freeze(v, f"{key[0]} is called with inputs of different widths")
            else:
                for a, b in zip(old, vars):
                    self.uf.union(a, b)
        return self.slots[key]

    def new_slot(self, key: SlotKey, n: int, type_name: str, frozen: str | None = None) -> list[int]:
        """Variables of a slot that creates channels (a layer's outputs, heads, groups)."""
        if key not in self.slots:
            self.slots[key] = [self.uf.new(frozen) for _ in range(n)]
            self.slot_types[key] = type_name
        return self.slots[key]

    def report(self, node: fx.Node, module: nn.Module | None, reason: str) -> None:
        """List ``node`` in :attr:`DependencyGraph.unsupported` with ``reason`` (once per node and reason)."""
        name = str(node.target) if node.op == "call_module" else node.name
        key = (name, reason)
        if key not in self.unsupported:
            self.unsupported[key] = Unsupported(name, op_name(node, module), reason)

    def unknown(self, node: fx.Node, module: nn.Module | None = None, reason: str | None = None) -> None:
        """An op the rules cannot see through: freeze its inputs' channels and report it."""
        why = reason or "torchslim does not know how this op treats channels"
        if self.freeze_args(node, f"passes through unsupported {describe(node)}"):
            self.report(node, module, why)

    def cost_macs(self, value: float, slots: tuple[SlotKey, ...]) -> None:
        """``value`` MACs that shrink with the kept fractions of ``slots`` (see :mod:`.cost`)."""
        self.mac_terms.append((float(value), slots))

    def cost_params(self, name: str, terms: list[tuple[float, tuple[SlotKey, ...]]]) -> None:
        """Parameters of layer ``name`` as ``(count, slots)`` terms; a layer called twice counts once."""
        if name not in self.costed:
            self.costed.add(name)
            self.param_terms.extend((float(v), s) for v, s in terms if v)

    def _attrs_used_elementwise(self) -> dict[str, bool]:
        ok: dict[str, bool] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                good = all(u.op in ("call_function", "call_method") and u.target in ELEMENTWISE_TARGETS for u in node.users)
                ok[node.target] = ok.get(node.target, True) and good
        return ok

    # -- main loop --------------------------------------------------------
    def run(self) -> None:
        """Visit every node once, in graph order, giving each the result of its rule."""
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.info[node] = None
            elif node.op == "output":
                self.freeze_args(node, "reaches the model's output")
            elif node.op == "call_module":
                module = self.modules[node.target]
                self.info[node] = self.module_node(node, module)
            else:
                table = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
                handler = table.get(node.target)
                if handler is None:
                    if node.op == "call_function" and shape_of(node) is None and not any_tensor_meta(node):
                        self.info[node] = None  # arithmetic on sizes and other non-tensors
                        continue
                    self.unknown(node)
                    self.info[node] = None
                else:
                    self.info[node] = handler(self, node)

    def module_node(self, node: fx.Node, module: nn.Module) -> Any:
        """Apply the channel rule of ``module``'s type (or treat it as opaque)."""
        name = str(node.target)
        rule, builtin = module_rule(module)
        # torchslim's own rules keep an excluded layer's outputs but still follow its
        # channels; a user's rule is not asked to know about exclusion, so an excluded
        # layer of that type is opaque.
        if self.excluded(name) and not builtin:
            self.freeze_args(node, f"enters {name!r}, excluded by the config")
            return None
        if rule is None:
            self.unknown(node, module, f"no channel rule for {type(module).__name__} "
                                       "(add one with torchslim.prune.structured.register_channel_rule)")
            return None
        return rule(self, node, module)


def has_vars(info: Any) -> bool:
    """True when ``info`` (a rule's result) carries any channel variable."""
    if isinstance(info, Tracked):
        return bool(info.vars)
    if isinstance(info, (tuple, list)):
        return any(has_vars(i) for i in info)
    return False


# ---------------------------------------------------------------------------
# building the graph
# ---------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    patterns = list(patterns)
    return lambda name: any(name_matches(name, p) for p in patterns)


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Iterable[str] = (),
    allow_layernorm: bool = False,
) -> DependencyGraph:
    """Trace ``model`` and find which channels must be removed together.

    Args:
        model: any module torch.fx can trace (with ``exclude``d submodules kept opaque).
        example_inputs: a tensor or a tuple of tensors, batch first, on the model's device.
        exclude: names or ``re:`` regexes (:func:`torchslim.prune.selection.name_matches`)
            of modules never pruned. A layer torchslim knows (conv, linear, ...) keeps
            its outputs; any other module is not traced into and keeps its inputs and outputs.
        allow_layernorm: let channels that a LayerNorm normalizes over be pruned.

    Returns:
        A :class:`DependencyGraph`.

    Raises:
        ModelError: torch.fx cannot trace the model (the message names the module,
            the failing line and what to exclude), or the example inputs fail.

    Example:
        >>> import torch, torchslim as ts
        >>> model = ts.models.create("fmnist_student", width=4, fc=8)
        >>> graph = build_dependency_graph(model, torch.randn(1, 1, 28, 28))
        >>> graph.groups[0].names  # conv 0 writes the channels, BatchNorm 1 scales them, conv 4 reads them
        ['features.0', 'features.1', 'features.4']
    """
    exclude = list(exclude)
    excluded = _matcher(exclude)
    gm = trace(model, excluded, leaf_types=tuple(CHANNEL_RULES))
    inputs = _as_tuple(example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise ModelError(f"the traced {type(model).__name__} fails on the example inputs: {type(exc).__name__}: {exc}") from exc
    finally:
        for m, training in modes:
            m.training = training

    b = ChannelBuilder(gm, excluded, allow_layernorm)
    b.run()

    # Units: sets of merged variables that appear in some slot, grouped by the slots they touch.
    members: dict[int, dict[SlotKey, list[int]]] = {}
    for key, vars in b.slots.items():
        for i, v in enumerate(vars):
            members.setdefault(b.uf.find(v), {}).setdefault(key, []).append(i)
    by_slots: dict[tuple[SlotKey, ...], list[int]] = {}
    frozen_by: dict[tuple[tuple[SlotKey, ...], str], int] = {}
    for root, slots in members.items():
        key = tuple(sorted(slots))
        reason = b.uf.reason[root]
        if reason is None:
            by_slots.setdefault(key, []).append(root)
        else:
            frozen_by[(key, reason)] = frozen_by.get((key, reason), 0) + 1
    order = {key: i for i, key in enumerate(b.slots)}

    def first_index(slots: dict[SlotKey, list[int]]) -> tuple[int, int]:
        key = min(slots, key=lambda k: order[k])
        return order[key], slots[key][0]

    groups = []
    for key, roots in by_slots.items():
        units = sorted((members[r] for r in roots), key=first_index)
        groups.append(ChannelGroup(key, units))
    groups.sort(key=lambda g: first_index(g.units[0]))
    frozen = [FrozenGroup(key, n, reason) for (key, reason), n in frozen_by.items()]

    base_macs = sum(v for v, _ in b.mac_terms)
    params = sum(p.numel() for p in model.parameters())
    return DependencyGraph(
        groups=groups,
        frozen=frozen,
        unsupported=list(b.unsupported.values()),
        slot_sizes={k: len(v) for k, v in b.slots.items()},
        slot_types=dict(b.slot_types),
        macs=float(base_macs),
        params=params,
        mac_terms=b.mac_terms,
        param_terms=b.param_terms,
    )
