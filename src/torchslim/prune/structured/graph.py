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
"""

from __future__ import annotations

import math
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from torchslim.errors import ModelError
from torchslim.prune.structured.modules import PrunedMultiheadAttention

SlotKey = tuple[str, str]

# ---------------------------------------------------------------------------
# public results
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
        kept = self.kept_fractions(removed)
        terms = self.mac_terms if kind == "macs" else self.param_terms
        base = self.macs if kind == "macs" else self.params
        saved = 0.0
        for value, slots in terms:
            frac = 1.0
            for s in slots:
                frac *= kept.get(s, 1.0)
            saved += value * (1.0 - frac)
        return base - saved

    def kept_fractions(self, removed: dict[int, Iterable[int]]) -> dict[SlotKey, float]:
        """Fraction of every slot's indices left after removing units."""
        gone: dict[SlotKey, int] = {}
        for g, units in removed.items():
            group = self.groups[g]
            for u in units:
                for slot, idx in group.units[u].items():
                    gone[slot] = gone.get(slot, 0) + len(idx)
        return {s: 1.0 - n / self.slot_sizes[s] for s, n in gone.items()}

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
# tracing
# ---------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx tracer that keeps torchslim's own layers and the user's excluded modules opaque."""

    def __init__(self, opaque: Callable[[str], bool]):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, PrunedMultiheadAttention) or (qualname and self.opaque(qualname)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_torchslim_module"):
                exc._torchslim_module = (self.path_of_module(m), type(m).__name__)  # innermost module wins
            raise


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch, where the failing op was written."""
    torch_dir = os.path.dirname(torch.__file__)
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith(torch_dir) and "torchslim/prune/structured" not in frame.filename.replace(os.sep, "/"):
            best = frame
    if best is None:
        return ""
    return f"{os.path.basename(best.filename)}:{best.lineno}: {(best.line or '').strip()}"


def trace(model: nn.Module, opaque: Callable[[str], bool] = lambda name: False) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, treating modules for which ``opaque(name)`` is true as leaves.

    Raises:
        ModelError: the model cannot be traced; the message names the module and
            the line that failed and suggests what to exclude.
    """
    tracer = _Tracer(opaque)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
        where = getattr(exc, "_torchslim_module", None)
        line = _user_frame(exc)
        op = f" at `{line}`" if line else ""
        if where and where[0]:
            hint = (f"exclude that module so it is treated as one opaque layer (its channels are left unpruned): "
                    f"ChannelPruning(..., exclude=[{where[0]!r}])")
            inside = f" inside module {where[0]!r} ({where[1]})"
        else:
            hint = ("move the data-dependent code into a submodule and exclude it "
                    "(ChannelPruning(..., exclude=['that.module'])), or make the forward traceable")
            inside = f" in {type(model).__name__}.forward"
        raise ModelError(
            f"torch.fx cannot trace {type(model).__name__}{inside}{op}: {type(exc).__name__}: {exc}. "
            f"To prune the rest, {hint}."
        ) from exc
    return fx.GraphModule(model, graph)


# ---------------------------------------------------------------------------
# the channel-variable builder
# ---------------------------------------------------------------------------


@dataclass
class _Tracked:
    """A tensor whose dimension ``dim`` carries channel variables ``vars``."""

    dim: int
    vars: list[int]


class _UnionFind:
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


def _shape(arg: Any) -> tuple[int, ...] | None:
    if not isinstance(arg, fx.Node):
        return None
    meta = arg.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}() ({node.name})"
    target = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", "") or ""
    return f"{module + '.' if module and module != '_operator' else 'operator.' if module else ''}{target} ({node.name})"


def _op_name(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Builder:
    def __init__(self, gm: fx.GraphModule, excluded: Callable[[str], bool], allow_layernorm: bool):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.excluded = excluded
        self.allow_layernorm = allow_layernorm
        self.uf = _UnionFind()
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
        return [self.uf.new(reason) for _ in range(n)]

    def freeze(self, info: Any, reason: str) -> None:
        if isinstance(info, _Tracked):
            for v in info.vars:
                self.uf.freeze(v, reason)
        elif isinstance(info, (tuple, list)):
            for i in info:
                self.freeze(i, reason)

    def freeze_args(self, node: fx.Node, reason: str) -> bool:
        """Freeze every tracked input of ``node``; True when there was any."""
        found = False
        for a in _flat_nodes(node.args, node.kwargs):
            info = self.info.get(a)
            if _has_vars(info):
                found = True
                self.freeze(info, reason)
        return found

    def tracked(self, arg: Any) -> _Tracked | None:
        info = self.info.get(arg) if isinstance(arg, fx.Node) else None
        return info if isinstance(info, _Tracked) else None

    def vars_on(self, arg: Any, dim: int, reason: str) -> list[int]:
        """Channel variables of ``arg`` along ``dim``; fresh frozen ones where it is not tracked there."""
        t = self.tracked(arg)
        if t is not None and t.dim == dim:
            return t.vars
        shape = _shape(arg)
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
        name = str(node.target) if node.op == "call_module" else node.name
        key = (name, reason)
        if key not in self.unsupported:
            self.unsupported[key] = Unsupported(name, _op_name(node, module), reason)

    def unknown(self, node: fx.Node, module: nn.Module | None = None, reason: str | None = None) -> None:
        why = reason or "torchslim does not know how this op treats channels"
        if self.freeze_args(node, f"passes through unsupported {_describe(node)}"):
            self.report(node, module, why)

    def cost_macs(self, value: float, slots: tuple[SlotKey, ...]) -> None:
        self.mac_terms.append((float(value), slots))

    def cost_params(self, name: str, terms: list[tuple[float, tuple[SlotKey, ...]]]) -> None:
        if name not in self.costed:
            self.costed.add(name)
            self.param_terms.extend((float(v), s) for v, s in terms if v)

    def _attrs_used_elementwise(self) -> dict[str, bool]:
        ok: dict[str, bool] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                good = all(u.op in ("call_function", "call_method") and u.target in _BINARY for u in node.users)
                ok[node.target] = ok.get(node.target, True) and good
        return ok

    # -- main loop --------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.info[node] = None
            elif node.op == "output":
                self.freeze_args(node, "reaches the model's output")
            elif node.op == "call_module":
                module = self.modules[node.target]
                self.info[node] = self.module_node(node, module)
            else:
                handler = _FUNCTIONS.get(node.target) if node.op == "call_function" else _METHODS.get(node.target)
                if handler is None:
                    if node.op == "call_function" and _shape(node) is None and not _any_tensor_meta(node):
                        self.info[node] = None  # arithmetic on sizes and other non-tensors
                        continue
                    self.unknown(node)
                    self.info[node] = None
                else:
                    self.info[node] = handler(self, node)

    def module_node(self, node: fx.Node, module: nn.Module) -> Any:
        name = str(node.target)
        if self.excluded(name) and not isinstance(module, _KNOWN_MODULES):
            self.freeze_args(node, f"enters {name!r}, excluded by the config")
            return None
        for types, handler in _MODULES:
            if isinstance(module, types):
                return handler(self, node, module)
        self.unknown(node, module, f"no channel rule for {type(module).__name__}")
        return None


def _flat_nodes(*items: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(items, lambda n: out.append(n))
    return out


def _has_vars(info: Any) -> bool:
    if isinstance(info, _Tracked):
        return bool(info.vars)
    if isinstance(info, (tuple, list)):
        return any(_has_vars(i) for i in info)
    return False


def _any_tensor_meta(node: fx.Node) -> bool:
    return any(a.meta.get("tensor_meta") is not None for a in _flat_nodes(node.args, node.kwargs))


# ---------------------------------------------------------------------------
# module rules
# ---------------------------------------------------------------------------


def _conv(b: _Builder, node: fx.Node, m: nn.modules.conv._ConvNd) -> Any:
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    t = b.tracked(x)
    if t is not None and t.dim != 1:
        b.freeze(t, f"reaches {name!r} on a dimension other than its channels")
    in_vars = b.vars_on(x, 1, "model input or untracked tensor")
    out_shape = _shape(node)
    frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    kernel = math.prod(m.kernel_size)
    macs = math.prod(out_shape) * (m.in_channels // m.groups) * kernel if out_shape else 0.0
    type_name = type(m).__name__
    bias = m.bias.numel() if m.bias is not None else 0
    if m.groups == 1:
        b.slot((name, "in"), in_vars, type_name)
        out_vars = b.new_slot((name, "out"), m.out_channels, type_name, frozen)
        b.cost_macs(macs, ((name, "in"), (name, "out")))
        b.cost_params(name, [(m.weight.numel(), ((name, "in"), (name, "out"))), (bias, ((name, "out"),))])
        return _Tracked(1, out_vars)
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    groups = b.new_slot((name, "groups"), g, type_name, frozen)
    for j in range(g):
        for i in range(ipg):
            if j * ipg + i < len(in_vars):
                b.uf.union(in_vars[j * ipg + i], groups[j])
    b.cost_macs(macs, ((name, "groups"),))
    b.cost_params(name, [(m.weight.numel() + bias, ((name, "groups"),))])
    return _Tracked(1, [groups[j] for j in range(g) for _ in range(opg)])


def _linear(b: _Builder, node: fx.Node, m: nn.Linear) -> Any:
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    shape = _shape(x)
    if shape is None:
        b.unknown(node, m)
        return None
    last = len(shape) - 1
    t = b.tracked(x)
    frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    type_name = type(m).__name__
    if t is not None and t.dim != last:
        # Channels on another dimension pass through untouched, but then the
        # linear's own outputs cannot be followed: keep them.
        b.slot((name, "in"), b.fresh(m.in_features, "untracked"), type_name)
        b.new_slot((name, "out"), m.out_features, type_name, f"outputs of {name!r} cannot be followed")
        b.cost_params(name, [(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0), ())])
        return _Tracked(t.dim, t.vars)
    in_vars = b.vars_on(x, last, "model input or untracked tensor")
    b.slot((name, "in"), in_vars, type_name)
    out_vars = b.new_slot((name, "out"), m.out_features, type_name, frozen)
    tokens = math.prod(shape[:-1])
    b.cost_macs(tokens * m.in_features * m.out_features, ((name, "in"), (name, "out")))
    b.cost_params(name, [(m.weight.numel(), ((name, "in"), (name, "out"))),
                         (m.bias.numel() if m.bias is not None else 0, ((name, "out"),))])
    return _Tracked(last, out_vars)


def _channel_param(b: _Builder, node: fx.Node, m: nn.Module, dim: int, n_params: int) -> Any:
    """A channel-wise layer with per-channel parameters along ``dim`` (BatchNorm, PReLU)."""
    name = str(node.target)
    x = node.args[0]
    shape = _shape(x)
    t = b.tracked(x)
    if shape is None:
        b.unknown(node, m)
        return None
    dim = _norm_dim(dim, len(shape))
    if t is not None and t.dim != dim:
        return t  # channel-wise along another dimension: passes through
    vars = b.vars_on(x, dim, "model input or untracked tensor")
    vars = b.slot((name, "out"), vars, type(m).__name__)
    if b.excluded(name):
        for v in vars:
            b.uf.freeze(v, f"{name!r} is excluded by the config")
    b.cost_params(name, [(n_params, ((name, "out"),))])
    return _Tracked(dim, vars) if t is not None else None


def _batchnorm(b: _Builder, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> Any:
    n = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
    return _channel_param(b, node, m, 1, n)


def _prelu(b: _Builder, node: fx.Node, m: nn.PReLU) -> Any:
    if m.num_parameters == 1:
        return _passthrough(b, node)
    return _channel_param(b, node, m, 1, m.num_parameters)


def _layernorm(b: _Builder, node: fx.Node, m: nn.LayerNorm) -> Any:
    name = str(node.target)
    x = node.args[0]
    shape = _shape(x)
    t = b.tracked(x)
    if t is None or shape is None:
        return None
    nd = len(m.normalized_shape)
    if t.dim < len(shape) - nd:
        return t  # normalizes other dimensions
    if nd != 1:
        b.freeze(t, f"{name!r} normalizes over several dimensions including the channels")
        return t
    vars = b.slot((name, "out"), t.vars, type(m).__name__)
    if not b.allow_layernorm:
        for v in vars:
            b.uf.freeze(v, f"LayerNorm {name!r} normalizes over these channels (allow_layernorm=True prunes them, "
                           "changing its statistics)")
    if b.excluded(name):
        for v in vars:
            b.uf.freeze(v, f"{name!r} is excluded by the config")
    n = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
    b.cost_params(name, [(n, ((name, "out"),))])
    return _Tracked(t.dim, vars)


def _attention(b: _Builder, node: fx.Node, m: nn.Module) -> Any:
    name = str(node.target)
    b.freeze_args(node, f"embed_dim of attention {name!r} is not pruned (its heads are)")
    if isinstance(m, nn.MultiheadAttention) and (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn):
        b.report(node, m, "only attention with one in_proj, no bias_k/bias_v and no add_zero_attn has prunable heads")
        return (None, None)
    heads_frozen = f"{name!r} is excluded by the config" if b.excluded(name) else None
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            heads_frozen = f"attention weights of {name!r} are used, and they depend on every head"
    heads = b.new_slot((name, "heads"), m.num_heads, type(m).__name__, heads_frozen)
    if heads_frozen:
        for v in heads:
            b.uf.freeze(v, heads_frozen)
    q, k = _shape(node.args[0]), _shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("key"))
    inner = m.num_heads * m.head_dim
    if q is not None and k is not None and len(q) == 3:
        seq = 1 if m.batch_first else 0
        batch = q[1 - seq]
        lq, lk = q[seq], k[seq]
        e = m.embed_dim
        macs = batch * (lq * e * inner + 2 * lk * e * inner + 2 * lq * lk * inner + lq * inner * e)
        b.cost_macs(macs, ((name, "heads"),))
    n_bias = m.in_proj_bias.numel() if m.in_proj_bias is not None else 0
    b.cost_params(name, [(m.in_proj_weight.numel() + n_bias + m.out_proj.weight.numel(), ((name, "heads"),))])
    return (None, None)


def _passthrough(b: _Builder, node: fx.Node, *_: Any) -> Any:
    """Shape-preserving, channel-wise op on its first argument (activations, dropout, casts)."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    t = b.tracked(x)
    if t is None:
        return None
    if _shape(node) != _shape(x):
        b.unknown(node)
        return None
    return t


def _spatial(b: _Builder, node: fx.Node, *_: Any) -> Any:
    """Pooling and resizing: channels on dimension 1 pass, the others change."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    t = b.tracked(x)
    if t is None:
        return None
    if t.dim == 1:
        return t
    b.unknown(node, None, "pooling over the channel dimension")
    return None


def _flatten_module(b: _Builder, node: fx.Node, m: nn.Flatten) -> Any:
    return _flatten_dims(b, node, node.args[0], m.start_dim, m.end_dim)


def _softmax_module(b: _Builder, node: fx.Node, m: nn.Module) -> Any:
    return _softmax_dim(b, node, node.args[0], m.dim)


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
                nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)


_MODULES: list[tuple[Any, Callable[..., Any]]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._BatchNorm, _batchnorm),
    (nn.LayerNorm, _layernorm),
    (nn.PReLU, _prelu),
    ((nn.MultiheadAttention, PrunedMultiheadAttention), _attention),
    (_ACTIVATIONS, _passthrough),
    (_POOLS, _spatial),
    (nn.Flatten, _flatten_module),
    ((nn.Softmax, nn.LogSoftmax), _softmax_module),
]
_KNOWN_MODULES = tuple(t for types, _ in _MODULES for t in (types if isinstance(types, tuple) else (types,)))


# ---------------------------------------------------------------------------
# function and method rules
# ---------------------------------------------------------------------------


def _elementwise(b: _Builder, node: fx.Node) -> Any:
    """Broadcasting n-ary ops: the channels of every operand on the same dimension are tied."""
    out_shape = _shape(node)
    tensors = [a for a in _flat_nodes(node.args, node.kwargs) if _shape(a) is not None]
    if out_shape is None:
        b.unknown(node)
        return None
    d_out = None
    for a in tensors:
        t = b.tracked(a)
        if t is not None:
            d_out = t.dim + len(out_shape) - len(_shape(a))
            break
    if d_out is None:
        return None
    out_vars: list[int] | None = None
    for a in tensors:
        shape = _shape(a)
        d = d_out - (len(out_shape) - len(shape))
        t = b.tracked(a)
        if t is not None and t.dim != d:
            b.freeze(t, f"combined on another dimension in {_describe(node)}")
        if d < 0 or shape[d] == 1:
            continue
        if t is not None and t.dim == d:
            vars = t.vars
        elif a.op == "get_attr" and b.attr_ok.get(a.target, False):
            key = (str(a.target), f"dim{d}")
            tensor = _get_attr(b.gm, a.target)
            vars = b.new_slot(key, shape[d], "Parameter" if isinstance(tensor, nn.Parameter) else "Tensor",
                              f"{a.target!r} is excluded by the config" if b.excluded(str(a.target)) else None)
            b.cost_params(str(a.target), [(tensor.numel(), (key,))] if isinstance(tensor, nn.Parameter) else [])
        else:
            vars = b.fresh(shape[d], f"combined in {_describe(node)} with a tensor whose channels cannot be pruned")
        if out_vars is None:
            out_vars = list(vars)
        else:
            for x, y in zip(out_vars, vars):
                b.uf.union(x, y)
    return _Tracked(d_out, out_vars) if out_vars is not None else None


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _expand(vars: list[int], sizes: tuple[int, ...], pos: int) -> list[int]:
    """Variables of a flattened dimension made of ``sizes`` where ``sizes[pos]`` carries ``vars``."""
    outer, inner = math.prod(sizes[:pos]), math.prod(sizes[pos + 1:])
    return [v for _ in range(outer) for v in vars for _ in range(inner)]


def _flatten_dims(b: _Builder, node: fx.Node, x: Any, start: int, end: int) -> Any:
    t = b.tracked(x)
    shape = _shape(x)
    if t is None or shape is None:
        return None
    n = len(shape)
    start, end = _norm_dim(start, n), _norm_dim(end, n)
    if t.dim < start:
        return t
    if t.dim > end:
        return _Tracked(t.dim - (end - start), t.vars)
    return _Tracked(start, _expand(t.vars, shape[start:end + 1], t.dim - start))


def _flatten(b: _Builder, node: fx.Node) -> Any:
    return _flatten_dims(b, node, node.args[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def _dim_groups(a: tuple[int, ...], c: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the dimensions of shape ``a`` to those of ``c`` as runs with equal products."""
    i = j = 0
    groups = []
    while i < len(a) or j < len(c):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i); pa = a[i]; i += 1  # noqa: E702
        if j < len(c):
            gj.append(j); pb = c[j]; j += 1  # noqa: E702
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i); pa *= a[i]; i += 1  # noqa: E702
            elif pb < pa and j < len(c):
                gj.append(j); pb *= c[j]; j += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshape(b: _Builder, node: fx.Node) -> Any:
    x = node.args[0]
    t = b.tracked(x)
    in_shape, out_shape = _shape(x), _shape(node)
    if t is None:
        return None
    if in_shape is None or out_shape is None:
        b.unknown(node)
        return None
    groups = _dim_groups(in_shape, out_shape)
    group = next((g for g in groups or [] if t.dim in g[0]), None)
    reason = None
    if group is None or len(group[1]) != 1:
        reason = "reshape that splits the channel dimension"
    else:
        d_out = group[1][0]
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if d_out < len(sizes) and isinstance(sizes[d_out], int) and sizes[d_out] != -1:
            reason = (f"reshape to the fixed size {sizes[d_out]} on the channel dimension "
                      "(write -1 or x.size(...) there to let it shrink)")
    if reason is not None:
        b.freeze(t, f"{_describe(node)}: {reason}")
        b.report(node, None, reason)
        return None
    gi = group[0]
    sizes_in = tuple(in_shape[k] for k in gi)
    return _Tracked(d_out, _expand(t.vars, sizes_in, gi.index(t.dim)))


def _transpose(b: _Builder, node: fx.Node) -> Any:
    t = b.tracked(node.args[0])
    if t is None:
        return None
    n = len(_shape(node.args[0]))
    d0, d1 = _norm_dim(_arg(node, 1, "dim0"), n), _norm_dim(_arg(node, 2, "dim1"), n)
    d = d1 if t.dim == d0 else d0 if t.dim == d1 else t.dim
    return _Tracked(d, t.vars)


def _permute(b: _Builder, node: fx.Node) -> Any:
    t = b.tracked(node.args[0])
    if t is None:
        return None
    n = len(_shape(node.args[0]))
    dims = node.args[1:] if node.op == "call_method" else (node.args[1],) if len(node.args) > 1 else (node.kwargs["dims"],)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    dims = [_norm_dim(d, n) for d in dims]
    return _Tracked(dims.index(t.dim), t.vars)


def _squeeze_like(b: _Builder, node: fx.Node) -> Any:
    """unsqueeze / squeeze: find where the channel dimension went from the shapes."""
    t = b.tracked(node.args[0])
    if t is None:
        return None
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    c = in_shape[t.dim]
    before = sum(1 for s in in_shape[:t.dim] if s != 1)
    seen = 0
    for i, s in enumerate(out_shape):
        if s != 1:
            if seen == before and s == c:
                return _Tracked(i, t.vars)
            seen += 1
    b.unknown(node)
    return None


def _reduce(b: _Builder, node: fx.Node) -> Any:
    x = node.args[0]
    t = b.tracked(x)
    if t is None:
        return None
    n = len(_shape(x))
    dims = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dims is None:
        dims = list(range(n))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [_norm_dim(d, n) for d in dims]
    if t.dim in dims:
        b.freeze(t, f"{_describe(node)} reduces over the channels")
        b.report(node, None, "reduction over the channel dimension")
        return None
    return _Tracked(t.dim if keepdim else t.dim - sum(d < t.dim for d in dims), t.vars)


def _softmax_dim(b: _Builder, node: fx.Node, x: Any, dim: int | None) -> Any:
    t = b.tracked(x)
    if t is None:
        return None
    if dim is None or _norm_dim(dim, len(_shape(x))) == t.dim:
        b.freeze(t, f"{_describe(node)} normalizes over the channels")
        b.report(node, None, "softmax over the channel dimension")
        return None
    return t


def _softmax(b: _Builder, node: fx.Node) -> Any:
    return _softmax_dim(b, node, node.args[0], _arg(node, 1, "dim"))


def _cat(b: _Builder, node: fx.Node) -> Any:
    tensors = list(_arg(node, 0, "tensors"))
    out_shape = _shape(node)
    if out_shape is None:
        return None
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out_shape))
    tracked = [b.tracked(a) for a in tensors]
    first = next((t for t in tracked if t is not None), None)
    if first is None:
        return None
    if first.dim != dim:
        return _elementwise_on(b, node, tensors, first.dim)
    vars: list[int] = []
    for a, t in zip(tensors, tracked):
        if t is not None and t.dim != dim:
            b.freeze(t, f"concatenated on another dimension in {_describe(node)}")
        vars += b.vars_on(a, dim, "concatenated with an untracked tensor")
    return _Tracked(dim, vars)


def _elementwise_on(b: _Builder, node: fx.Node, tensors: list[Any], d: int) -> Any:
    """Tie the channels of same-rank ``tensors`` on dimension ``d`` (cat/stack along other dimensions)."""
    out: list[int] | None = None
    for a in tensors:
        t = b.tracked(a)
        if t is not None and t.dim != d:
            b.freeze(t, f"combined on another dimension in {_describe(node)}")
        vars = b.vars_on(a, d, f"combined in {_describe(node)} with an untracked tensor")
        if out is None:
            out = list(vars)
        else:
            for x, y in zip(out, vars):
                b.uf.union(x, y)
    return _Tracked(d, out) if out else None


def _stack(b: _Builder, node: fx.Node) -> Any:
    tensors = list(_arg(node, 0, "tensors"))
    first = next((b.tracked(a) for a in tensors if b.tracked(a) is not None), None)
    if first is None:
        return None
    k = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    t = _elementwise_on(b, node, tensors, first.dim)
    return _Tracked(t.dim + (1 if k <= t.dim else 0), t.vars) if t else None


def _split(b: _Builder, node: fx.Node) -> Any:
    """chunk / split / unbind: fine along other dimensions, unsupported along the channels."""
    x = node.args[0]
    t = b.tracked(x)
    if t is None:
        return None
    n = len(_shape(x))
    unbind = node.target in (torch.unbind, "unbind")
    dim = _norm_dim(_arg(node, 1 if unbind else 2, "dim", 0), n)
    if dim == t.dim:
        b.freeze(t, f"{_describe(node)} splits the channels")
        b.report(node, None, "split of the channel dimension")
        return None
    meta = node.meta.get("tensor_meta")
    count = len(meta) if isinstance(meta, (tuple, list)) else 1
    d = t.dim - (1 if unbind and dim < t.dim else 0)
    return tuple(_Tracked(d, t.vars) for _ in range(count))


def _getitem(b: _Builder, node: fx.Node) -> Any:
    src, idx = node.args[0], node.args[1]
    info = b.info.get(src) if isinstance(src, fx.Node) else None
    if isinstance(info, (tuple, list)):
        return info[idx] if isinstance(idx, int) and -len(info) <= idx < len(info) else None
    if not isinstance(info, _Tracked):
        return None
    shape = _shape(src)
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        b.freeze(info, f"indexed with a tensor in {_describe(node)}")
        b.report(node, None, "advanced indexing of a tensor with channels")
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(shape) - consumed)
        else:
            expanded.append(i)
    p = q = 0
    d_out = None
    for i in expanded:
        if i is None:
            q += 1
            continue
        if p == info.dim:
            if not (isinstance(i, slice) and i == slice(None)):
                b.freeze(info, f"{_describe(node)} selects some channels")
                b.report(node, None, "slicing of the channel dimension")
                return None
            d_out = q
        if isinstance(i, slice):
            q += 1
        p += 1
    if d_out is None:
        d_out = q + (info.dim - p)
    return _Tracked(d_out, info.vars)


def _meta(b: _Builder, node: fx.Node) -> Any:
    return None


_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
           torch.minimum, torch.where, "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
           "maximum", "minimum"}
_UNARY_FUNCTIONS = [F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.leaky_relu, F.hardswish,
                    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
                    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp,
                    torch.square, torch.sqrt, torch.rsqrt, operator.neg, torch.nn.functional.relu_]
_UNARY_METHODS = ["relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_", "clamp_min",
                  "clamp_max", "square", "sqrt", "rsqrt", "contiguous", "float", "double", "half", "bfloat16",
                  "to", "type_as", "clone", "detach", "pow"]
_SPATIAL_FUNCTIONS = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate]

_FUNCTIONS: dict[Any, Callable[[_Builder, fx.Node], Any]] = {
    **{f: _elementwise for f in _BINARY if not isinstance(f, str)},
    **{f: _passthrough for f in _UNARY_FUNCTIONS},
    **{f: _spatial for f in _SPATIAL_FUNCTIONS},
    torch.pow: _passthrough,
    operator.pow: _passthrough,
    torch.flatten: _flatten,
    torch.reshape: _reshape,
    torch.transpose: _transpose,
    torch.permute: _permute,
    torch.unsqueeze: _squeeze_like,
    torch.squeeze: _squeeze_like,
    torch.mean: _reduce,
    torch.sum: _reduce,
    torch.amax: _reduce,
    torch.amin: _reduce,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.stack: _stack,
    torch.chunk: _split,
    torch.split: _split,
    torch.unbind: _split,
    F.softmax: _softmax,
    F.log_softmax: _softmax,
    torch.softmax: _softmax,
    operator.getitem: _getitem,
    getattr: _meta,
}
_METHODS: dict[str, Callable[[_Builder, fx.Node], Any]] = {
    **{m: _elementwise for m in _BINARY if isinstance(m, str)},
    **{m: _passthrough for m in _UNARY_METHODS},
    "flatten": _flatten,
    "view": _reshape,
    "reshape": _reshape,
    "transpose": _transpose,
    "permute": _permute,
    "unsqueeze": _squeeze_like,
    "squeeze": _squeeze_like,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "amin": _reduce,
    "chunk": _split,
    "split": _split,
    "unbind": _split,
    "softmax": _softmax,
    "log_softmax": _softmax,
    "size": _meta,
    "dim": _meta,
    "numel": _meta,
}


# ---------------------------------------------------------------------------
# building the graph
# ---------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    from torchslim.prune.selection import name_matches

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
    gm = trace(model, excluded)
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

    b = _Builder(gm, excluded, allow_layernorm)
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
