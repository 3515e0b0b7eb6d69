"""Model layer: FLAME arrays, parameters, the LBS forward and its derivatives, FLAME file
readers and writers (restricted unpickler), the synthetic FLAME-format head.

Imports :mod:`p3dmm.fitting.base` only. Inside the layer: ``params`` <- ``arrays`` <-
(``lbs``, ``unpickle`` <- ``flame_files``, ``flame_write``, ``synthetic_head``) <-
``flame_model`` (the user-facing :class:`FlameModel`, the only module that knows them all).
"""
