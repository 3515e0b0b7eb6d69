"""FitConfig: one name per setting (``fast_*`` / ``paper_*``), old spellings deprecated; device names."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from p3dmm.fitting import FitConfig, InputError
from p3dmm.fitting.base.xp import resolve_device


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("gn_iterations", "fast_iterations", 7),
        ("gn_normal_stride", "fast_normal_stride", 3),
        ("gn_tolerance", "fast_tolerance", 1e-2),
        ("gn_irls_floor_start", "fast_irls_floor_start", 2.0),
        ("gn_irls_floor_decay", "fast_irls_floor_decay", 0.5),
    ],
)
def test_old_fast_solver_names_still_work_with_a_warning(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old}=.*deprecated; use {new}="):
        cfg = FitConfig(**{old: value})
    assert getattr(cfg, new) == value
    with pytest.warns(DeprecationWarning, match=f"FitConfig.{old} is deprecated"):
        assert getattr(cfg, old) == value
    with pytest.warns(DeprecationWarning):
        assert getattr(dataclasses.replace(cfg, **{old: value}), new) == value


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = FitConfig(fast_iterations=5, paper_steps=3)
        dataclasses.replace(cfg, fast_tolerance=1e-3)
    assert cfg.fast_iterations == 5 and cfg.solver == "fast"


def test_unknown_solver_and_device_are_input_errors():
    with pytest.raises(InputError, match="solver must be one of"):
        FitConfig(solver="lm")
    with pytest.raises(InputError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") is np and resolve_device(np) is np
