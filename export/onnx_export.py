"""PyTorch -> ONNX (fp32) and the mixed-precision fp16 graph.

fp32: ``torch.onnx.export`` with the dynamo exporter (torch 2.14's default; it needs
``onnxscript``), opset 20, a dynamic batch axis named ``batch`` and static 512 x 512
(DESIGN.md "Export and runtime"). Fused attention is off in the module (see
:mod:`p3dmm.export.sources`), so attention is MatMul/Softmax, and at opset >= 17 every
LayerNorm is one ``LayerNormalization`` node. The input is ``image`` and the outputs are
named after the task (plus ``mask``).

fp16: onnxconverter-common's ``convert_float_to_float16`` (float16 weights and activations,
Casts at the boundaries, ``keep_io_types`` so the io stays float32), with a block list that
keeps in float32 (a) every ``LayerNormalization`` and ``Softmax`` plus its default list
(passing ``op_block_list`` replaces the default, so it is extended, not replaced), (b) the
attention scores: the ``MatMul`` that feeds each Softmax and the elementwise nodes between
them, and (c) the output tail: every node between the last heavy op (Conv, ConvTranspose,
MatMul, Gemm) and an output, i.e. the unpatchify, the flip averaging and the normal
normalisation / sigmoid.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from p3dmm.fitting.base.errors import EngineError
from p3dmm.runtime.manifest import IMAGE_INPUT, TensorSpec

from .sources import IMAGE_SIZE, ExportSource

__all__ = [
    "DEFAULT_OPSET",
    "IMAGE_SIZE",
    "MAX_PROTO_BYTES",
    "convert_fp16",
    "export_onnx",
    "fp32_islands",
    "onnx_io",
]

log = logging.getLogger("p3dmm.export")

DEFAULT_OPSET = 20
#: A single ONNX protobuf file cannot exceed 2 GiB (ViT-g in fp32 would need external data).
MAX_PROTO_BYTES = 2**31 - 2**24
_HEAVY = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
_SCORE_PATH = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose"}
_CHANNELS = {"normals": 3, "uv": 2, "mask": 1}


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the dev and onnx extras
        raise EngineError("export needs the onnx package: pip install 'p3dmm[onnx]'") from e
    return onnx


def export_onnx(source: ExportSource, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Export ``source.module`` to ``path`` (fp32, dynamic batch) and check the graph.

    Raises:
        EngineError: the exporter failed, the model is too large for one file, or the
            written graph does not have the expected io.
    """
    onnx = _require_onnx()
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter imports it lazily)
    except ImportError as e:
        raise EngineError("torch.onnx's dynamo exporter needs onnxscript: pip install onnxscript") from e
    n_bytes = sum(p.numel() * p.element_size() for p in source.module.parameters())
    if n_bytes > MAX_PROTO_BYTES:
        raise EngineError(
            f"{source.path}: {n_bytes / 2**30:.1f} GiB of weights do not fit in one ONNX file (2 GiB); "
            "external-data export is not supported yet"
        )
    example = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]  # one INFO line per optimiser pass
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                source.module, (example,), input_names=[IMAGE_INPUT], output_names=list(source.outputs),
                dynamic_shapes={"image": {0: "batch"}}, opset_version=opset, dynamo=True, external_data=False,
                verbose=False,
            )  # fmt: skip
            assert program is not None
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises many kinds
        raise EngineError(f"{source.path}: ONNX export failed ({type(e).__name__}: {str(e)[:2000]})") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise EngineError(f"{path}: the exported graph does not pass onnx.checker ({e})") from e
    inputs, outputs = onnx_io(model)
    want_out = [TensorSpec(n, ("batch", _CHANNELS[n], IMAGE_SIZE, IMAGE_SIZE), "float32") for n in source.outputs]
    want_in = [TensorSpec(IMAGE_INPUT, ("batch", 3, IMAGE_SIZE, IMAGE_SIZE), "float32")]
    if list(inputs) != want_in or list(outputs) != want_out:
        raise EngineError(f"{path}: exported io {inputs} -> {outputs}, expected {want_in} -> {want_out}")


def onnx_io(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs as :class:`TensorSpec` (a symbolic dim is ``"batch"``)."""
    onnx = _require_onnx()

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else "batch" for d in t.shape.dim)
        return TensorSpec(v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    inits = {i.name for i in model.graph.initializer}
    return (
        tuple(spec(v) for v in model.graph.input if v.name not in inits),
        tuple(spec(v) for v in model.graph.output),
    )


def fp32_islands(model: Any) -> list[str]:
    """Names of the nodes :func:`convert_fp16` keeps in float32 beyond the op block list:
    the attention-score path into each Softmax and the output tail (module docstring)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    keep: set[str] = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        stack = list(node.input[:1])
        while stack:
            prev = producer.get(stack.pop())
            if prev is None or prev.name in keep:
                continue
            if prev.op_type == "MatMul":
                keep.add(prev.name)
            elif prev.op_type in _SCORE_PATH:
                keep.add(prev.name)
                stack.extend(prev.input)
    stack = [o.name for o in graph.output]
    while stack:
        prev = producer.get(stack.pop())
        if prev is None or prev.name in keep or prev.op_type in _HEAVY:
            continue
        keep.add(prev.name)
        stack.extend(prev.input)
    return sorted(keep)


def _restore_float32_outputs(model: Any) -> None:
    """Make every graph output float32 again.

    onnxconverter-common 1.16 with ``keep_io_types=True`` still casts an output to float16
    when the node producing it is on the block list (it casts a blocked node's outputs
    to the float16 it assumes downstream). That trailing Cast now casts to float32 (a
    no-op on the blocked node's float32); any other float16 output gets a Cast to float32.
    """
    onnx = _require_onnx()
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    producer = {out: node for node in model.graph.node for out in node.output}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type != f16:
            continue
        node = producer.get(out.name)
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node is not None else None
        if node is not None and node.op_type == "Cast" and to == f16:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = f32
        else:
            inner = out.name + "_fp16"
            for n in model.graph.node:
                n.output[:] = [inner if o == out.name else o for o in n.output]
            model.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=f32, name=out.name + "_to_fp32"))
        tt.elem_type = f32


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Write the mixed-precision graph of ``src`` to ``dst`` (io stays float32).

    Returns:
        ``{"fp32_ops": [...], "fp32_nodes": n, "fp16_nodes": n}`` for the manifest.

    Raises:
        EngineError: onnxconverter-common is missing or the conversion failed.
    """
    onnx = _require_onnx()
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise EngineError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from e
    model = onnx.load(str(src))
    block_ops = list(float16.DEFAULT_OP_BLOCK_LIST) + ["LayerNormalization", "Softmax"]
    nodes = fp32_islands(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the float32 number ... will be truncated" per tiny weight
            half = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=block_ops, node_block_list=nodes
            )
        _restore_float32_outputs(half)
        onnx.checker.check_model(half)
    except Exception as e:
        raise EngineError(f"{src}: fp16 conversion failed ({type(e).__name__}: {e})") from e
    onnx.save(half, str(dst))
    kept = sum(1 for n in model.graph.node if n.name in set(nodes) or n.op_type in block_ops)
    return {"fp32_ops": sorted({"LayerNormalization", "Softmax"}), "fp32_nodes": kept,
            "fp16_nodes": len(model.graph.node) - kept}  # fmt: skip
