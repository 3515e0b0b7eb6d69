"""FLAME file readers/writers: round trips, restricted unpickling, torch-free tensors, errors."""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from p3dmm.fitting import (
    FlameModel,
    FlameUV,
    InputError,
    LandmarkEmbedding,
    ModelFileError,
)
from p3dmm.fitting.base import mesh_io
from p3dmm.fitting.model import flame_files, unpickle
from p3dmm.fitting.model.arrays import FlameUV

V, F, T = 50, 60, 57


def _bary(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    b = rng.random(shape + (3,)) + 0.05
    return (b / b.sum(-1, keepdims=True)).astype(np.float32)


def make_model(seed: int = 0, n_shape: int = 300, n_expr: int = 100) -> FlameModel:
    """A small random model in FLAME's layout with UV, landmarks and masks."""
    rng = np.random.default_rng(seed)
    faces = np.argsort(rng.random((F, V)), axis=1)[:, :3].astype(np.int64)
    Jr = rng.random((5, V)) ** 4
    Jr[Jr < 0.3] = 0.0  # sparse-ish, like FLAME's regressor
    Jr /= Jr.sum(1, keepdims=True)
    w = rng.random((V, 5)) ** 2
    w /= w.sum(1, keepdims=True)
    vt = rng.random((T, 2)).astype(np.float32)
    ft = rng.integers(0, T, size=(F, 3))
    landmarks = LandmarkEmbedding(
        static_faces=rng.integers(0, F, 51),
        static_bary=_bary(rng, (51,)),
        dynamic_faces=rng.integers(0, F, (79, 17)),
        dynamic_bary=_bary(rng, (79, 17)),
        full_faces=rng.integers(0, F, 68),
        full_bary=_bary(rng, (68,)),
        mediapipe_faces=rng.integers(0, F, 105),
        mediapipe_bary=_bary(rng, (105,)),
        mediapipe_indices=rng.choice(478, 105, replace=False).astype(np.int64),
    )
    masks = {name: np.sort(rng.choice(V, k, replace=False)).astype(np.int64) for name, k in
             (("face", 20), ("lips", 6), ("left_eyeball", 4), ("boundary", 9))}
    return FlameModel(
        v_template=rng.normal(scale=0.05, size=(V, 3)).astype(np.float32),
        faces=faces,
        shapedirs=rng.normal(scale=0.01, size=(V, 3, n_shape + n_expr)).astype(np.float32),
        posedirs=rng.normal(scale=0.01, size=(V, 3, 36)).astype(np.float32),
        J_regressor=Jr.astype(np.float32),
        parents=np.array([-1, 0, 1, 1, 1]),
        lbs_weights=w.astype(np.float32),
        n_shape=n_shape,
        n_expr=n_expr,
        uv=FlameUV.from_faces(vt, ft, faces, V),
        landmarks=landmarks,
        masks=masks,
        name=f"io-test(seed={seed})",
    )


@pytest.fixture(scope="module")
def io_model() -> FlameModel:
    return make_model()


def load_all(paths: dict[str, str], **kw) -> FlameModel:
    return FlameModel.load(
        paths["model"],
        uv=paths["uv"],
        landmarks=paths["landmarks"],
        mediapipe_landmarks=paths["mediapipe_landmarks"],
        masks=paths["masks"],
        **kw,
    )


def assert_same_model(a: FlameModel, b: FlameModel) -> None:
    for name in ("v_template", "faces", "shapedirs", "posedirs", "lbs_weights", "parents"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # J_regressor goes through a float64 csc matrix: exact for float32 inputs
    np.testing.assert_array_equal(a.J_regressor, b.J_regressor)
    assert (a.n_shape, a.n_expr) == (b.n_shape, b.n_expr)


def flame_dict(model: FlameModel) -> dict:
    """FLAME's pickle dict for ``model`` (plain arrays), for crafting variants."""
    Jr = np.asarray(model.J_regressor, np.float64)
    sd = np.zeros((V, 3, 300 + model.n_expr))
    sd[:, :, : model.n_shape] = model.shapedirs[:, :, : model.n_shape]
    sd[:, :, 300:] = model.shapedirs[:, :, model.n_shape :]
    return {
        "v_template": np.asarray(model.v_template, np.float64),
        "f": model.faces.astype(np.uint32),
        "shapedirs": sd,
        "posedirs": np.asarray(model.posedirs, np.float64),
        "J_regressor": scipy.sparse.csc_matrix(Jr),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": np.asarray(model.lbs_weights, np.float64),
        "J": Jr @ np.asarray(model.v_template, np.float64),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def write_pickle(path: Path, obj, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def save_dict_npy(path: Path, d: dict) -> Path:
    """What ``np.save(path, d)`` does with a dict: a pickled 0-d object array."""
    arr = np.empty((), dtype=object)
    arr[()] = d
    np.save(path, arr, allow_pickle=True)
    return path


# Python 2 pickles, spelled out opcode by opcode (no Python 2 here to write them): str
# payloads are BINSTRING (read back through encoding='latin1'), modules are numpy.core,
# __builtin__ and copy_reg, as in FLAME 2020's generic_model.pkl.


def _py2_str(b: bytes) -> bytes:
    return b"T" + len(b).to_bytes(4, "little") + b  # BINSTRING


def _py2_int(i: int) -> bytes:
    return b"J" + int(i).to_bytes(4, "little", signed=True)  # BININT


def _py2_array(a: np.ndarray) -> bytes:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') + BUILD (1, shape, dtype, False, data)."""
    a = np.ascontiguousarray(a)
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(a.dtype.str[1:].encode()) + _py2_int(0) + _py2_int(1) + b"\x87R"
        + b"(" + _py2_int(3) + _py2_str(b"<") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
    )
    shape = b"(" + b"".join(_py2_int(n) for n in a.shape) + b"t"
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
        + b"\x87R" + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(a.tobytes()) + b"tb"
    )


def _py2_chumpy(a: np.ndarray, via_copy_reg: bool = False) -> bytes:
    state = b"}(" + _py2_str(b"x") + _py2_array(a) + _py2_str(b"_dirty_vars") + b"c__builtin__\nset\n]\x85R" + b"ub"
    if via_copy_reg:  # protocol 0/1 spelling of a new-style object
        return b"ccopy_reg\n_reconstructor\n(cchumpy.ch\nCh\nc__builtin__\nobject\nNtR" + state
    return b"cchumpy.ch\nCh\n)\x81" + state


def _py2_csc(m: scipy.sparse.csc_matrix) -> bytes:
    items = {b"indices": m.indices, b"indptr": m.indptr, b"data": m.data}
    body = b"".join(_py2_str(k) + _py2_array(v) for k, v in items.items())
    shape = _py2_str(b"_shape") + _py2_int(m.shape[0]) + _py2_int(m.shape[1]) + b"\x86"
    extra = _py2_str(b"format") + _py2_str(b"csc") + _py2_str(b"maxprint") + _py2_int(50)
    return b"cscipy.sparse.csc\ncsc_matrix\n)\x81}(" + body + shape + extra + b"ub"


def py2_flame_pickle(d: dict) -> bytes:
    """FLAME 2020-style pickle of ``flame_dict`` output."""
    parts = []
    for key, value in d.items():
        if key in ("v_template", "shapedirs", "weights", "J"):
            enc = _py2_chumpy(value, via_copy_reg=(key == "J"))
        elif key == "J_regressor":
            enc = _py2_csc(value)
        elif isinstance(value, str):
            enc = _py2_str(value.encode())
        else:
            enc = _py2_array(value)
        parts.append(_py2_str(key.encode()) + enc)
    return b"\x80\x02}(" + b"".join(parts) + b"u."


# --------------------------------------------------------------------- round trips


@pytest.mark.parametrize("chumpy_style", [False, True])
def test_write_load_round_trip(io_model: FlameModel, tmp_path: Path, chumpy_style: bool) -> None:
    paths = io_model.write(tmp_path, chumpy_style=chumpy_style)
    assert set(paths) == {"model", "uv", "landmarks", "static_landmarks", "mediapipe_landmarks", "masks"}
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths.values())

    globals_in_file = {str(a) for op, a, _ in pickletools.genops(Path(paths["model"]).read_bytes()) if op.name == "GLOBAL"}
    assert ("chumpy.ch Ch" in globals_in_file) == chumpy_style
    assert not any("p3dmm" in g for g in globals_in_file)
    assert "scipy.sparse._csc csc_matrix" in globals_in_file

    m = load_all(paths)
    assert_same_model(io_model, m)
    assert m.name == paths["model"]
    for name in ("vt", "ft", "vertex_uv", "seam_vertices"):
        np.testing.assert_array_equal(getattr(io_model.uv, name), getattr(m.uv, name), err_msg=name)
    for field in ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary", "full_faces", "full_bary",
                  "mediapipe_faces", "mediapipe_bary", "mediapipe_indices"):
        np.testing.assert_array_equal(getattr(io_model.landmarks, field), getattr(m.landmarks, field), err_msg=field)
    assert m.masks.keys() == io_model.masks.keys()
    for k in m.masks:
        np.testing.assert_array_equal(m.masks[k], io_model.masks[k])


def test_chumpy_objects_carry_their_array(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path, chumpy_style=True)
    d = unpickle.load_pickle(paths["model"])
    for key in ("v_template", "shapedirs", "weights", "J"):
        assert isinstance(d[key], unpickle.ChumpyStub) and d[key].qualified_name == "chumpy.ch.Ch"
        assert isinstance(d[key].x, np.ndarray)
    np.testing.assert_array_equal(d["v_template"].x, io_model.v_template.astype(np.float64))


def test_numpy_1_and_2_module_names_both_load(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path, chumpy_style=True)
    data = Path(paths["model"]).read_bytes()
    assert b"cnumpy._core." in data  # written on numpy 2 at protocol 2: GLOBAL 'c' + module
    old = tmp_path / "generic_model_numpy1.pkl"
    old.write_bytes(data.replace(b"cnumpy._core.", b"cnumpy.core."))
    assert b"numpy._core" not in old.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from touching numpy.core
        m_old = FlameModel.load(old)
        m_new = FlameModel.load(paths["model"])
    assert_same_model(m_old, m_new)
    assert_same_model(io_model, m_new)


def test_flame2020_style_python2_pickle_loads(io_model: FlameModel, tmp_path: Path) -> None:
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(py2_flame_pickle(flame_dict(io_model)))
    ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert "BINSTRING" in ops and "BINUNICODE" not in ops  # really Python 2 shaped
    d = unpickle.load_pickle(path)
    assert d["J"].qualified_name == "chumpy.ch.Ch" and d["v_template"].state["_dirty_vars"] == set()
    assert_same_model(io_model, FlameModel.load(path))


def test_flame2023_style_python3_pickle_loads(io_model: FlameModel, tmp_path: Path) -> None:
    # FLAME 2023 (incl. _no_jaw) has FLAME 2020's layout; here as a protocol-4 Python 3 pickle
    # with STACK_GLOBAL opcodes, frames, a uint32 kintree table and an extra key.
    d = flame_dict(io_model)
    d["kintree_table"] = d["kintree_table"].astype(np.uint32)
    d["extra_note"] = "flame2023 no jaw"
    path = write_pickle(tmp_path / "flame2023_no_jaw.pkl", d, protocol=4)
    assert_same_model(io_model, FlameModel.load(path))


def test_npz_model_loads(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    d["J_regressor"] = d["J_regressor"].toarray()
    path = tmp_path / "flame.npz"
    np.savez(path, **d)
    assert_same_model(io_model, FlameModel.load(path, dtype=np.float32))
    m64 = FlameModel.load(path, dtype=np.float64)
    assert m64.dtype == np.float64


def test_shape_expr_truncation_and_limits(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path)
    m = FlameModel.load(paths["model"], n_shape=10, n_expr=5)
    np.testing.assert_array_equal(m.shapedirs, io_model.truncated(10, 5).shapedirs)
    assert (m.n_shape, m.n_expr) == (10, 5)
    with pytest.raises(ModelFileError, match=r"shapedirs.*\(50, 3, 400\).*n_shape=301"):
        FlameModel.load(paths["model"], n_shape=301)
    with pytest.raises(ModelFileError, match=r"100 expression.*n_expr=101"):
        FlameModel.load(paths["model"], n_expr=101)


def test_small_model_is_padded_to_flame_layout(tmp_path: Path) -> None:
    small = make_model(seed=3, n_shape=12, n_expr=20)
    paths = small.write(tmp_path)
    arrays = flame_files.read_flame_arrays(paths["model"])
    assert arrays["shapedirs"].shape == (V, 3, 320)  # identity padded to 300, then 20 expression
    assert not arrays["shapedirs"][:, :, 12:300].any()
    assert_same_model(small, FlameModel.load(paths["model"], n_shape=12, n_expr=20))
    with pytest.raises(ModelFileError, match="n_expr=21"):
        FlameModel.load(paths["model"], n_shape=12, n_expr=21)


def test_kintree_sentinel_gives_flame_parents(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    for root in (4294967295, -1):
        d["kintree_table"] = np.array([[root, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
        arrays = flame_files.read_flame_arrays(write_pickle(tmp_path / "k.pkl", d))
        np.testing.assert_array_equal(arrays["parents"], [-1, 0, 1, 1, 1])
    d["kintree_table"] = np.array([[4294967295, 0, 3, 1, 1], [0, 1, 2, 3, 4]])
    with pytest.raises(ModelFileError, match=r"kintree_table.*joint 2 parent 3"):
        flame_files.read_flame_arrays(write_pickle(tmp_path / "k.pkl", d))


# ------------------------------------------------------------ torch-free tensors


def test_torch_tensor_landmark_embedding_reads_without_torch(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    dyn_faces = rng.integers(0, F, (79, 17))
    big = torch.from_numpy(rng.random((79, 17, 5)).astype(np.float32))
    dyn_bary = big[:, :, 1:4]  # a strided view: storage offset 1, strides (85, 5, 1)
    full_faces = torch.from_numpy(rng.integers(0, F, (1, 68)))
    full_bary = torch.from_numpy(_bary(rng, (1, 68)))
    static_faces = rng.integers(0, F, 51)
    static_bary = _bary(rng, (51,))
    deca = {
        "static_lmk_faces_idx": static_faces,
        "static_lmk_bary_coords": static_bary,
        "dynamic_lmk_faces_idx": torch.from_numpy(dyn_faces).long(),
        "dynamic_lmk_bary_coords": dyn_bary,
        "full_lmk_faces_idx": full_faces,
        "full_lmk_bary_coords": full_bary,
    }
    path = tmp_path / "landmark_embedding.npy"
    save_dict_npy(path, deca)  # as DECA's file: np.save of a dict holding torch tensors
    expected_bary = dyn_bary.numpy().copy()
    expected_full = full_bary.numpy()[0].copy()
    raw = path.read_bytes()
    assert b"_rebuild_tensor_v2" in raw and b"_load_from_bytes" in raw  # really pickled tensors

    monkeypatch.setitem(sys.modules, "torch", None)  # any 'import torch' now fails
    with pytest.raises(ImportError):
        np.load(path, allow_pickle=True)
    lm = flame_files.load_landmark_embedding(path, F)
    np.testing.assert_array_equal(lm.static_faces, static_faces)
    np.testing.assert_array_equal(lm.static_bary, static_bary)
    np.testing.assert_array_equal(lm.dynamic_faces, dyn_faces)
    assert lm.dynamic_faces.dtype == np.int64
    np.testing.assert_array_equal(lm.dynamic_bary, expected_bary)
    np.testing.assert_array_equal(lm.full_faces, full_faces.numpy()[0])
    np.testing.assert_array_equal(lm.full_bary, expected_full)


class _Reduce:
    """Pickles as ``func(*args)`` (to craft tensor pickles referencing torch functions)."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_torch_zip_storage_payload_reads_without_torch(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        storage = torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
        torch.save(storage, buf)  # zip layout: archive/data.pkl + archive/data/0
    zipped = buf.getvalue()
    assert zipped[:4] == b"PK\x03\x04"
    # column 2..4 of rows 1..3: offset 8, size (3, 3), stride (6, 1)
    tensor = _Reduce(
        torch._utils._rebuild_tensor_v2,
        (_Reduce(torch.storage._load_from_bytes, (zipped,)), 8, (3, 3), (6, 1), False, collections.OrderedDict()),
    )
    data = pickle.dumps({"lmk": tensor}, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pickle.loads(data)["lmk"].numpy()  # the crafted pickle is a valid torch pickle
    np.testing.assert_array_equal(reference, t[1:4, 2:5].numpy())
    path = tmp_path / "tensor.pkl"
    path.write_bytes(data)

    monkeypatch.setitem(sys.modules, "torch", None)
    out = unpickle.load_pickle(path)["lmk"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, reference)


# ------------------------------------------------------------ restricted unpickling


class _Evil:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["model", "masks", "npy"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"v_template": _Evil(os.system, f"touch {marker}")}
    if kind == "npy":
        path = tmp_path / "landmark_embedding.npy"
        save_dict_npy(path, payload)
        call = lambda: flame_files.load_landmark_embedding(path, F)  # noqa: E731
    else:
        path = write_pickle(tmp_path / f"{kind}.pkl", payload)
        call = (lambda: FlameModel.load(path)) if kind == "model" else (lambda: flame_files.load_flame_masks(path, V))
    with pytest.raises(ModelFileError, match=r"refused to unpickle (posix|os|nt)\.system") as err:
        call()
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "m.pkl", {"f": _Evil(eval, "1 + 1")})
    with pytest.raises(ModelFileError, match=r"builtins\.eval|__builtin__\.eval"):
        unpickle.load_pickle(path)


# ------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found") as err:
        FlameModel.load(tmp_path / "nope.pkl")
    assert "nope.pkl" in str(err.value)


@pytest.mark.parametrize("which", ["model", "landmarks", "masks"])
def test_truncated_file(io_model: FlameModel, tmp_path: Path, which: str) -> None:
    paths = io_model.write(tmp_path)
    path = Path(paths[which])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated") as err:
        load_all(paths)
    assert str(path) in str(err.value)


def test_not_a_dict(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "m.pkl", [1, 2, 3])
    with pytest.raises(ModelFileError, match="holds list, expected a dict"):
        FlameModel.load(path)


def test_missing_key_names_file_key_and_shape(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    del d["posedirs"]
    path = write_pickle(tmp_path / "m.pkl", d)
    with pytest.raises(ModelFileError) as err:
        FlameModel.load(path)
    msg = str(err.value)
    assert str(path) in msg and "'posedirs'" in msg and "missing" in msg and "(50, 3, 36)" in msg


def test_wrong_shape_names_file_key_and_shapes(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    d["weights"] = d["weights"][:, :4]
    path = write_pickle(tmp_path / "m.pkl", d)
    with pytest.raises(ModelFileError) as err:
        FlameModel.load(path)
    msg = str(err.value)
    assert str(path) in msg and "'weights'" in msg and "(50, 4)" in msg and "expected (50, 5)" in msg


def test_skinning_weights_must_sum_to_one(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    w = np.array(d["weights"], dtype=np.float64)
    w[7] *= 0.5
    d["weights"] = w
    path = write_pickle(tmp_path / "m.pkl", d)
    with pytest.raises(ModelFileError, match=r"'weights' \(skinning weights\) must .* sum to 1 .*vertex 7 sums to 0\.5"):
        FlameModel.load(path)


def test_face_index_out_of_range(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    d["f"] = d["f"].copy()
    d["f"][3, 1] = V
    with pytest.raises(ModelFileError, match=r"'f'.*< 50"):
        FlameModel.load(write_pickle(tmp_path / "m.pkl", d))


def test_inconsistent_sparse_regressor(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    d["J_regressor"].indices[0] = 7  # row 7 of a 5-row matrix
    with pytest.raises(ModelFileError, match="J_regressor.*inconsistent"):
        FlameModel.load(write_pickle(tmp_path / "m.pkl", d))


def test_unsupported_blend_style(io_model: FlameModel, tmp_path: Path) -> None:
    d = flame_dict(io_model)
    d["bs_type"] = "lrotquat"
    with pytest.raises(ModelFileError, match="bs_type.*'lrotmin'"):
        FlameModel.load(write_pickle(tmp_path / "m.pkl", d))


# ----------------------------------------------------------------------------- UV


def test_obj_faces_must_match_model(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path)
    bad_faces = io_model.faces.copy()
    bad_faces[7] = bad_faces[7][::-1]
    obj = mesh_io.write_obj_with_uv(tmp_path / "bad.obj", io_model.v_template, io_model.uv.vt, bad_faces, io_model.uv.ft)
    with pytest.raises(ModelFileError) as err:
        FlameModel.load(paths["model"], uv=obj)
    msg = str(err.value)
    assert str(obj) in msg and "'f'" in msg and "(60, 3)" in msg and "face 7" in msg


def test_read_obj_with_uv_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "t.obj"
    path.write_text(
        "# comment\nmtllib x.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\n"
        "vt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nvt 0.5 0.5\nvn 0 0 1\n"
        "f 1/1/1 2/2/1 3/3/1\nf -3/-1 -1/-2 -2/-4\n"
    )
    v, vt, f, ft = mesh_io.read_obj_with_uv(path)
    assert v.shape == (4, 3) and vt.shape == (5, 2)
    np.testing.assert_array_equal(f, [[0, 1, 2], [1, 3, 2]])
    np.testing.assert_array_equal(ft, [[0, 1, 2], [4, 3, 1]])
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ModelFileError, match="line 4.*no texture index"):
        mesh_io.read_obj_with_uv(path)


def test_uv_from_per_vertex_array(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path)
    uv = np.random.default_rng(2).random((V, 2)).astype(np.float32)
    m = FlameModel.load(paths["model"], uv=uv)
    np.testing.assert_array_equal(m.uv.vertex_uv, uv)
    np.testing.assert_array_equal(m.uv.ft, m.faces)
    assert len(m.uv.seam_vertices) == 0
    with pytest.raises(InputError, match=r"expected \(50, 2\)"):
        FlameModel.load(paths["model"], uv=uv[:-1])


# ---------------------------------------------------------------- landmarks, masks


def test_flame_static_and_dynamic_embeddings(io_model: FlameModel, tmp_path: Path) -> None:
    paths = io_model.write(tmp_path)
    lm = io_model.landmarks
    dynamic = tmp_path / "flame_dynamic_embedding.npy"
    save_dict_npy(dynamic, {"lmk_face_idx": lm.dynamic_faces.astype(np.uint32), "lmk_b_coords": lm.dynamic_bary})
    static_only = flame_files.load_landmark_embedding(paths["static_landmarks"], F)
    np.testing.assert_array_equal(static_only.static_faces, lm.static_faces)
    assert static_only.dynamic_faces is None
    both = FlameModel.load(paths["model"], landmarks=[paths["static_landmarks"], dynamic]).landmarks
    np.testing.assert_array_equal(both.static_bary, lm.static_bary)
    np.testing.assert_array_equal(both.dynamic_faces, lm.dynamic_faces)
    np.testing.assert_array_equal(both.dynamic_bary, lm.dynamic_bary)
    with pytest.raises(ModelFileError, match="mediapipe_landmarks="):
        flame_files.load_landmark_embedding(paths["mediapipe_landmarks"], F)


def test_landmark_face_ids_and_bary_shapes_are_checked(io_model: FlameModel, tmp_path: Path) -> None:
    lm = io_model.landmarks
    path = write_pickle(tmp_path / "flame_static_embedding.pkl",
                        {"lmk_face_idx": np.r_[lm.static_faces[:-1], F], "lmk_b_coords": lm.static_bary})
    with pytest.raises(ModelFileError, match=r"'lmk_face_idx'.*< 60 \(F=60 faces\)"):
        flame_files.load_landmark_embedding(path, F)
    write_pickle(path, {"lmk_face_idx": lm.static_faces, "lmk_b_coords": lm.static_bary[:, :2]})
    with pytest.raises(ModelFileError, match=r"'lmk_b_coords' has shape \(51, 2\), expected \(51, 3\)"):
        flame_files.load_landmark_embedding(path, F)
    mp = tmp_path / "mp.npz"
    np.savez(mp, lmk_face_idx=lm.mediapipe_faces, lmk_b_coords=lm.mediapipe_bary)
    with pytest.raises(ModelFileError, match=r"'landmark_indices' is missing.*\(105,\)"):
        flame_files.load_mediapipe_embedding(mp, F)


def test_mask_ids_are_checked(io_model: FlameModel, tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "FLAME_masks.pkl", {"face": np.arange(10), "neck": np.array([3, V + 2])})
    with pytest.raises(ModelFileError, match=r"'neck'.*\[3, 52\].*< 50"):
        flame_files.load_flame_masks(path, V)


# ------------------------------------------------------------------ synthetic head


def test_synthetic_head_round_trip(tmp_path: Path) -> None:
    try:
        synthetic = FlameModel.synthetic(seed=0)
    except (NotImplementedError, ImportError) as e:
        pytest.skip(f"synthetic head not available: {type(e).__name__}: {e}")
    paths = synthetic.write(tmp_path, chumpy_style=True)
    m = FlameModel.load(
        paths["model"],
        uv=paths.get("uv"),
        masks=paths.get("masks"),
        n_shape=synthetic.n_shape,
        n_expr=synthetic.n_expr,
    )
    for name in ("v_template", "faces", "shapedirs", "posedirs", "J_regressor", "lbs_weights", "parents"):
        np.testing.assert_allclose(getattr(m, name), getattr(synthetic, name), rtol=0, atol=1e-7, err_msg=name)
    if synthetic.uv is not None:
        np.testing.assert_array_equal(m.uv.vertex_uv, synthetic.uv.vertex_uv)


def test_uv_atlas_coverage_of_a_known_layout() -> None:
    """One triangle over the lower-left half of UV space (v up): its texels, in image order."""
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    ft = faces = np.array([[0, 1, 2]])
    uv = FlameUV.from_faces(vt, ft, faces, 3)
    cov = uv.coverage(64, margin=0)
    assert cov.shape == (64, 64) and abs(cov.mean() - 0.5) < 0.03
    assert cov[-1, 0] and not cov[0, -1]  # u=0, v=0 is the bottom-left texel; u=1, v=1 the top-right
    assert uv.coverage(64, margin=0) is cov  # memoised
    assert uv.coverage(64, margin=2).sum() > cov.sum()
