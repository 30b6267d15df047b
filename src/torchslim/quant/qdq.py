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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torchslim.errors import ModelError


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
