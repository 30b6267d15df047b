"""Write QuantizeLinear/DequantizeLinear nodes with given scales into a float ONNX graph.

Quantization-aware training (:mod:`torchslim.quant.qat`) learns its own scales
and zero points; ONNX Runtime's ``quantize_static`` would recalibrate them and
quantize tensors the fake-quant model never quantized. This module writes
exactly the fake-quant model's quantizers instead, per quantized layer:

* its input: ``QuantizeLinear → DequantizeLinear`` (uint8, per tensor), feeding
  only that layer (other consumers of the tensor keep the float value);
* its weight: the int8 integers computed in torch, per output channel, with a
  ``DequantizeLinear`` (zero points 0);
* its bias: int32 integers with scale ``input scale × weight scale`` (what
  ONNX Runtime's fused ``QLinearConv``/``QGemm`` adds to its int32 sums);
* its output (optional): ``QuantizeLinear → DequantizeLinear`` (uint8), after the
  ReLU that follows it when there is one.

ONNX Runtime fuses ``DQ → Conv/Gemm → Q`` into its int8 kernels when it loads
the file. Supported nodes: ``Conv``, ``Gemm`` (either ``transB``), and
``MatMul`` without bias.

:func:`quantizer_sites` decides, on the traced torch model, where a layer's
output quantizer sits (after the ReLU that follows it, which ONNX Runtime folds
into the int8 kernel) and which layer inputs reuse an earlier quantizer's scale
(through MaxPool/Flatten/Reshape), so that no requantization is left between
layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from torchslim.errors import ModelError


#: ops whose output stays on their input's quantization grid (ONNX Runtime runs them in int8 between Q/DQ)
_GRID_MODULES = (nn.MaxPool2d, nn.Identity, nn.Flatten, nn.Dropout)
_GRID_METHODS = ("view", "reshape", "flatten", "contiguous")
_GRID_FUNCTIONS = (torch.flatten, torch.reshape)


def _value_users(node: Any) -> list[Any]:
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim"))]


def quantizer_sites(model: nn.Module, names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Where the quantizers of the layers ``names`` sit, from the model's traced graph.

    Returns:
        ``(after_relu, tied)``: ``after_relu[layer]`` is the ReLU module that directly
        follows ``layer`` (its output is quantized after the ReLU, as ONNX Runtime fuses
        Conv/Gemm + ReLU); ``tied[layer]`` is the earlier layer whose quantized output
        reaches ``layer`` through grid-keeping ops only (MaxPool, Flatten, Reshape,
        Identity, Dropout), so ``layer``'s input reuses that scale. Both empty when the
        model does not trace or calls a layer twice.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - an untraceable model keeps one quantizer per layer input and output
        return {}, {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    layer_nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in names}
    if any(calls[t] != 1 for t in layer_nodes):
        return {}, {}
    after_relu: dict[str, str] = {}
    point: dict[Any, str] = {}  # the node whose value is a layer's quantized output
    for name, node in layer_nodes.items():
        cur = node
        while len(_value_users(cur)) == 1:
            nxt = _value_users(cur)[0]
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(mod, nn.Identity) and calls[nxt.target] == 1:  # a folded BatchNorm
                cur = nxt
                continue
            if type(mod) is nn.ReLU and calls[nxt.target] == 1:
                after_relu[name] = nxt.target
                node = nxt
            break
        point[node] = name
    tied: dict[str, str] = {}
    for name, node in layer_nodes.items():
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node):
            if src in point:
                tied[name] = point[src]
                break
            if len(_value_users(src)) != 1 or not src.args:
                break
            keeps = ((src.op == "call_module" and isinstance(modules.get(src.target), _GRID_MODULES))
                     or (src.op == "call_method" and src.target in _GRID_METHODS)
                     or (src.op == "call_function" and src.target in _GRID_FUNCTIONS))
            if not keeps:
                break
            src = src.args[0]
    return after_relu, tied


def _find_node(proto: Any, name: str) -> tuple[int, Any]:
    for i, node in enumerate(proto.graph.node):
        if node.name == name:
            return i, node
    raise ModelError(f"ONNX node {name!r} not found in the graph")


def weight_axis(node: Any) -> int:
    """The axis of a layer node's weight initializer that holds the output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    if node.op_type == "MatMul":
        return 1
    raise ModelError(f"node {node.name!r} is {node.op_type}: only Conv, Gemm and MatMul get QDQ weights")


def write_qdq(proto: Any, params: dict[str, dict[str, Any]]) -> Any:
    """Return a copy of ``proto`` with Q/DQ nodes for the layers in ``params``.

    Args:
        proto: a float ``onnx.ModelProto`` (opset >= 13: per-axis DequantizeLinear).
        params: ``{onnx node name: {...}}`` with numpy values: ``x_scale`` (float32 scalar),
            ``x_zero_point`` (uint8 scalar), ``w_int8`` (int8, the torch layout
            ``(out, in, ...)``), ``w_scale`` (float32, one per output channel), ``b_int32``
            (int32 or None), ``y_scale`` / ``y_zero_point`` (or None: output left float), and
            ``y_after_relu`` (quantize the output of the ReLU that the node feeds instead).

    Raises:
        ModelError: a node is missing, of an unsupported kind, or its weight shape does not
            match the integers.
    """
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    before: dict[str, list[Any]] = {}
    after: dict[str, list[Any]] = {}
    new_inits: list[Any] = []
    replaced: set[str] = set()

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    for node_name, p in params.items():
        _, node = _find_node(out, node_name)
        axis = weight_axis(node)
        if node.input[1] not in inits:
            raise ModelError(f"node {node_name!r} has no constant weight")
        onnx_shape = tuple(inits[node.input[1]].dims)
        w = np.asarray(p["w_int8"], dtype=np.int8)
        if axis == 1:  # (in, out) in the graph; torch holds (out, in)
            w = w.T.copy()
        if tuple(w.shape) != onnx_shape:
            raise ModelError(f"node {node_name!r}: weight shape {onnx_shape} in the graph, {tuple(w.shape)} from torch")
        pre = node_name.replace("/", "_")
        nodes = []
        # input
        x_s = const(f"{pre}_x_scale", np.asarray(p["x_scale"], dtype=np.float32).reshape(()))
        x_z = const(f"{pre}_x_zero_point", np.asarray(p["x_zero_point"], dtype=np.uint8).reshape(()))
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], x_s, x_z], [f"{pre}_x_q"], name=f"{pre}_x_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{pre}_x_q", x_s, x_z], [f"{pre}_x_dq"],
                                      name=f"{pre}_x_DQ"))
        # weight
        channels = len(p["w_scale"])
        w_q = const(f"{pre}_w_q", w)
        w_s = const(f"{pre}_w_scale", np.asarray(p["w_scale"], dtype=np.float32))
        w_z = const(f"{pre}_w_zero_point", np.zeros(channels, dtype=np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [w_q, w_s, w_z], [f"{pre}_w_dq"], name=f"{pre}_w_DQ",
                                      axis=axis))
        replaced.add(node.input[1])
        node.input[0], node.input[1] = f"{pre}_x_dq", f"{pre}_w_dq"
        # bias
        if p.get("b_int32") is not None:
            if node.op_type == "MatMul":
                raise ModelError(f"node {node_name!r} is a MatMul; a biased Linear must export as Gemm")
            b_scale = (np.float32(p["x_scale"]) * np.asarray(p["w_scale"], dtype=np.float32)).astype(np.float32)
            b_q = const(f"{pre}_b_q", np.asarray(p["b_int32"], dtype=np.int32))
            b_s = const(f"{pre}_b_scale", b_scale)
            b_z = const(f"{pre}_b_zero_point", np.zeros(channels, dtype=np.int32))
            nodes.append(helper.make_node("DequantizeLinear", [b_q, b_s, b_z], [f"{pre}_b_dq"], name=f"{pre}_b_DQ",
                                          axis=0))
            if len(node.input) > 2 and node.input[2]:
                replaced.add(node.input[2])
                node.input[2] = f"{pre}_b_dq"
            else:
                node.input.append(f"{pre}_b_dq")
        before[node_name] = nodes
        # output
        if p.get("y_scale") is not None:
            at = node
            if p.get("y_after_relu"):  # quantized after the ReLU: ONNX Runtime folds it into the int8 kernel
                users = [n for n in graph.node if node.output[0] in n.input]
                if len(users) != 1 or users[0].op_type != "Relu":
                    raise ModelError(f"node {node_name!r}: its output quantizer follows a ReLU in torch, but the "
                                     f"graph feeds {[u.op_type for u in users]}")
                at = users[0]
            y = at.output[0]
            at.output[0] = f"{pre}_y"
            y_s = const(f"{pre}_y_scale", np.asarray(p["y_scale"], dtype=np.float32).reshape(()))
            y_z = const(f"{pre}_y_zero_point", np.asarray(p["y_zero_point"], dtype=np.uint8).reshape(()))
            after[at.name] = [
                helper.make_node("QuantizeLinear", [f"{pre}_y", y_s, y_z], [f"{pre}_y_q"], name=f"{pre}_y_Q"),
                helper.make_node("DequantizeLinear", [f"{pre}_y_q", y_s, y_z], [y], name=f"{pre}_y_DQ")]

    ordered = []
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.append(node)
        ordered.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    # Float weights and biases that no node reads any more leave the file (it is int8 now).
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    for vi in list(graph.value_info):  # shapes of renamed tensors are re-inferred by the runtime
        graph.value_info.remove(vi)
    onnx.checker.check_model(out)
    return out
