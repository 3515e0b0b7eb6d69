"""Fit layer: FLAME and a camera from predicted normal and UV maps.

Imports :mod:`p3dmm.fitting.base`, :mod:`p3dmm.fitting.model` and
:mod:`p3dmm.fitting.render`. Inside the layer: ``state`` <- ``energy`` (the one
definition of the residuals, the energy and its gradient) <- ``config``, ``init`` <-
``validation`` <- ``problem`` (:class:`FitProblem`, ``prepare``) <- the two solvers
``paper`` (Adam) and ``fast`` (Levenberg-Marquardt), peers over one problem <- ``fit``.
``uv_nn`` (+ ``uv_nn.cu``) is the UV nearest-neighbour search with its CPU twins.
The public entry points are :func:`p3dmm.fitting.fit` and :func:`p3dmm.fitting.fit_batch`.
"""
