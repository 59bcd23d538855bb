"""Fixtures for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning_modules import trainer_kwargs


@pytest.fixture
def make_trainer(tmp_path):
    def make(**overrides) -> pl.Trainer:
        return pl.Trainer(**trainer_kwargs(tmp_path, **overrides))

    return make
