"""Tracing: capture a model with torch.fx, and read what the trace recorded.

:func:`trace` runs the fx tracer with torchslim's own layers, layers that have a
registered channel rule, and the modules a config excludes kept as leaves; when
the model cannot be traced, the error names the module and the line that failed.
The small helpers below read a traced node (its shape, its arguments, a name
for messages); the channel rules in :mod:`torchslim.prune.structured.rules` use them.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from torchslim.errors import ModelError
from torchslim.prune.structured.modules import PrunedMultiheadAttention


class _Tracer(fx.Tracer):
    """fx tracer that keeps torchslim's own layers and the user's excluded modules opaque."""

    def __init__(self, opaque: Callable[[str], bool], leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.opaque = opaque
        self.leaf_types = (PrunedMultiheadAttention, *leaf_types)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A layer with its own channel rule is handled whole, so fx must not trace into it.
        if isinstance(m, self.leaf_types) or (qualname and self.opaque(qualname)):
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


def trace(model: nn.Module, opaque: Callable[[str], bool] = lambda name: False,
          leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, treating modules for which ``opaque(name)`` is true as leaves.

    Instances of ``leaf_types`` (layers with a registered channel rule) are leaves too.

    Raises:
        ModelError: the model cannot be traced; the message names the module and
            the line that failed and suggests what to exclude.
    """
    tracer = _Tracer(opaque, tuple(leaf_types))
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


def shape_of(arg: Any) -> tuple[int, ...] | None:
    """Shape ``ShapeProp`` recorded for ``arg``; None for a non-tensor or a non-node."""
    if not isinstance(arg, fx.Node):
        return None
    meta = arg.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def describe(node: fx.Node) -> str:
    """A short human name for ``node`` in messages (``module 'fc'``, ``operator.add (add_1)``)."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}() ({node.name})"
    target = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", "") or ""
    return f"{module + '.' if module and module != '_operator' else 'operator.' if module else ''}{target} ({node.name})"


def op_name(node: fx.Node, module: nn.Module | None) -> str:
    """The op's type name for reports: the module class, ``.method()`` or the function name."""
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, or its keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def norm_dim(d: int, ndim: int) -> int:
    """``d`` made non-negative for a tensor of ``ndim`` dimensions."""
    return d + ndim if d < 0 else d


def flat_nodes(*items: Any) -> list[fx.Node]:
    """Every fx node inside ``items`` (nested args and kwargs), in order."""
    out: list[fx.Node] = []
    fx.node.map_arg(items, lambda n: out.append(n))
    return out


def any_tensor_meta(node: fx.Node) -> bool:
    """True when some input of ``node`` is a tensor."""
    return any(a.meta.get("tensor_meta") is not None for a in flat_nodes(node.args, node.kwargs))


def get_attr_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` node with ``target`` reads."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
