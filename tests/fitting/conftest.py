"""Fixtures for fitting tests."""

from __future__ import annotations

import pytest

from p3dmm.fitting import FlameModel

from .flame_fixtures import random_flame_model


@pytest.fixture
def small_model() -> FlameModel:
    return random_flame_model()
