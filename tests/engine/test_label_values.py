"""Label files as people and tools write them: yes/no as text, booleans or numbers, blank cells, ids of the wrong type."""

import pyarrow as pa
import pytest

from sam3_engine.app.calibration import normalised_labels


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["yes", "No", " 1 ", "0", "", None], [True, False, True, False, None, None]),
        ([1.0, 0.0, float("nan")], [True, False, None]),  # pandas: a 1/0 column with blank cells
        ([1, 0, None], [True, False, None]),
        ([True, False, None], [True, False, None]),
    ],
)
def test_yes_no_cells_in_any_spelling_become_booleans(values, expected):
    labels = normalised_labels(pa.table({"pair_id": [f"p{i}" for i in range(len(values))], "present": values}))
    assert labels["present"].to_pylist() == expected


@pytest.mark.parametrize("value", [2, 0.5, -1.0, "maybe"])
def test_a_value_that_is_not_yes_or_no_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"label value {value!r} is not a yes/no"):
        normalised_labels(pa.table({"pair_id": ["p"], "present": [value]}))


def test_an_id_that_is_not_text_is_a_one_line_error():
    labels = pa.table({"pair_id": [{"x": 1}], "present": [True]})
    with pytest.raises(ValueError, match=r"labels column pair_id holds struct<x: int64>, not string"):
        normalised_labels(labels)
