"""Render layer: the rasterizer (numba CPU twin + ``rasterize.cu``), supervision maps
(normals, UV, masks) and the photo-like image (albedo, lighting, background, sensor).

Imports :mod:`p3dmm.fitting.base` and :mod:`p3dmm.fitting.model` only. Inside the layer:
``raster`` <- ``maps``; the photo's stages ``sh`` <- ``appearance`` <- (``albedo``,
``lighting``, ``background``) <- ``photo`` <- ``maps``, handing over a
:class:`~p3dmm.fitting.render.surface.Surface`; ``sensor`` is shared with the training
augmentation.
"""
