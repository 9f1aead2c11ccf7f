"""tools/lesion_sizes.py: detection and missed volume by lesion size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SPEC = importlib.util.spec_from_file_location(
    "lesion_sizes", Path(__file__).resolve().parents[1] / "tools" / "lesion_sizes.py"
)
lesion_sizes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lesion_sizes)


def test_lesions_are_binned_by_volume_with_detection_and_missed_ml_per_study():
    lesions = pd.DataFrame(
        [
            ("a", "S1", 0.5, True), ("a", "S1", 1.5, False), ("a", "S2", 10.0, False),
            ("b", "S1", 0.5, False), ("b", "S1", 1.5, False), ("b", "S2", 10.0, True),
        ],
        columns=["variant", "study", "volume_ml", "detected"],
    )  # fmt: skip
    table = lesion_sizes.by_size(lesions).set_index(["variant", "bin"])
    small, large = pd.Interval(0.0, 2.0, closed="left"), pd.Interval(8.0, float("inf"), "left")
    assert table.loc[("a", small)].tolist() == [2, 0.5, pytest.approx(0.75)]  # 1.5 ml / 2 studies
    assert table.loc[("b", small)].tolist() == [2, 0.0, pytest.approx(1.0)]
    assert table.loc[("a", large)].tolist() == [1, 0.0, pytest.approx(5.0)]
    assert table.loc[("b", large)].tolist() == [1, 1.0, 0.0]
    assert list(table.index.get_level_values("bin").unique()) == [small, large]


def test_presence_maps_are_not_predictions(tmp_path):
    chunk = tmp_path / "predictions" / "stepwise-seed0" / "oof" / "fold0-chunk-0"
    chunk.mkdir(parents=True)
    for name in ("S_1.nii.gz", "S_1.presence.nii.gz"):
        (chunk / name).write_bytes(b"")
    assert lesion_sizes.prediction_paths(tmp_path, "stepwise-seed0") == {
        "S_1": chunk / "S_1.nii.gz"
    }
