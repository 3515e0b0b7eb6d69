"""Base layer: what every other layer uses and that depends on nothing of p3dmm.

``errors`` (the exception family), ``xp`` (NumPy/CuPy dispatch, device resolution,
one-transfer downloads), ``camera`` (the pinhole camera: the one projection and its
Jacobian), ``rotation``, ``geometry`` (vertex normals, scatter-add), ``mesh_io`` (OBJ with
UVs, PLY/GLB/STL through trimesh), ``atomic_io``, ``cuda`` (loading ``.cu`` sources into
CuPy) and ``cli`` (the command-line runner shared by ``p3dmm`` and the training entry point).
"""
