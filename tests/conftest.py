"""Shared fixtures."""

import logging
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `cuda` run only where torch sees a GPU (torch is imported only for them)."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_synthetic_settings() -> dict:
    """The default synthetic-cohort settings on a coarse, small grid: a study in about a second."""
    settings = yaml.safe_load((ROOT / "config/config.yaml").read_text())["download"]["synthetic"]
    return {
        **settings,
        "n_patients": 4,
        "pet_shape": [48, 40, 40],
        "pet_spacing_mm": [12.0, 13.0, 13.0],
        "ct_shape": [60, 64, 64],
        "ct_spacing_mm": [9.6, 8.0, 8.0],
    }


@pytest.fixture(scope="session")
def micro_synthetic_settings() -> dict:
    """A three-patient synthetic cohort on a very coarse grid, for tests of sources and servers."""
    return {
        "seed": 1,
        "n_patients": 3,
        "repeat_fraction": 0.5,
        "lesion_fraction": 0.5,
        "pet_shape": [24, 20, 20],
        "pet_spacing_mm": [12.0, 13.0, 13.0],
        "ct_shape": [30, 32, 32],
        "ct_spacing_mm": [9.6, 8.0, 8.0],
    }


@pytest.fixture
def restore_logging():
    """Undo what `stepseg.logs.setup` does to the root logger of the test process (handlers on
    files and on the stderr capture of one test)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
