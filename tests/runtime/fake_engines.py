"""Engine directories for runtime tests: ONNX graphs that output fixed maps (NOT predictors).

``oracle_engines(dir, maps)`` writes ``normals.onnx`` and ``uv.onnx`` whose outputs are the
given oracle maps for every image of the batch (``Expand`` of a constant to the input's
batch size), plus a manifest like export-engines writes. The runtime then runs the real
ONNX Runtime backend, crop, fit and outputs on maps whose ground truth is known, which
an untrained network cannot give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p3dmm.runtime.manifest import Manifest, ModelEntry, TensorSpec, sha256_file


def _constant_graph(name: str, value: np.ndarray, path: Path, extra: dict[str, np.ndarray] | None = None) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outputs = {name: value, **(extra or {})}
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one")]
    outs = []
    for out_name, v in outputs.items():
        c = v.shape[0]
        inits.append(numpy_helper.from_array(v[None].astype(np.float32), f"{out_name}_value"))
        inits.append(numpy_helper.from_array(np.array([c, 512, 512], np.int64), f"{out_name}_chw"))
        nodes.append(helper.make_node("Concat", ["batch", f"{out_name}_chw"], [f"{out_name}_shape"], axis=0))
        nodes.append(helper.make_node("Expand", [f"{out_name}_value", f"{out_name}_shape"], [out_name]))
        outs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", c, 512, 512]))
    graph = helper.make_graph(nodes, "oracle", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 512, 512])],
                              outs, initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def oracle_engines(directory: Path, maps: Any, layout: str, mask: bool = True, normal_space: str = "camera") -> Path:
    """Write an engine directory whose predictors output ``maps`` (a RenderedMaps at 512 px)."""
    directory.mkdir(parents=True, exist_ok=True)
    normals = np.where(maps.mask[..., None], maps.normals, 0).transpose(2, 0, 1)
    uv = np.where(maps.mask[..., None], maps.uv, 0).transpose(2, 0, 1)
    extra = {"mask": maps.mask[None].astype(np.float32)} if mask else None
    _constant_graph("normals", normals, directory / "normals.onnx", extra)
    _constant_graph("uv", uv, directory / "uv.onnx")
    image = TensorSpec("image", ("batch", 3, 512, 512), "float32")
    entries = []
    for task, outs in (("normals", [("normals", 3)] + ([("mask", 1)] if mask else [])), ("uv", [("uv", 2)])):
        f = directory / f"{task}.onnx"
        entries.append(ModelEntry(
            name=task, file=f.name, task=task, kind="onnx", precision="fp32", inputs=(image,),
            outputs=tuple(TensorSpec(n, ("batch", c, 512, 512), "float32") for n, c in outs), sha256=sha256_file(f),
            normal_space=normal_space if task == "normals" else None, uv_layout=layout if task == "uv" else None,
            opset=17, source={"path": "oracle-maps", "sha256": "", "format": "test"},
        ))  # fmt: skip
    Manifest(models=entries, p3dmm_version="test").write(directory)
    return directory
