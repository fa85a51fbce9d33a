"""Wide tables (thousands of columns) are read, validated and encoded column block by column
block; the result must be exactly what the column-by-column computation gives: the same
numbers to the bit, the same column order, the same notes, and the same error (column and row)
for the first bad cell. The speed itself is measured by benchmarks/wide_tables.py, not here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tltool.config import DataConfig
from tltool.data.preprocess import TabularPreprocessor
from tltool.data.tabular import load_tabular
from tltool.errors import DataError

COLUMNS = 5000
ROWS = 30


def _wide_frame(seed: int = 0) -> pd.DataFrame:
    """5,000 number columns of every kind a CSV gives (floats with empty cells, whole numbers,
    constant and empty columns, numbers stored as text), three categorical ones and a label."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {}
    for i in range(COLUMNS):
        kind = i % 7
        if kind == 0:
            col = rng.integers(-50, 50, ROWS)
        elif kind == 1:
            col = rng.normal(size=ROWS) * 10.0 ** rng.integers(-4, 9)
            col[rng.random(ROWS) < 0.2] = np.nan
        elif kind == 2:
            col = np.full(ROWS, 3.5) if i % 3 else np.full(ROWS, np.nan)  # dropped
        elif kind == 3:
            col = rng.normal(size=ROWS).round(1)
            col[:2] = np.nan
        else:
            col = rng.exponential(size=ROWS) * (i + 1)
        data[f"x{i}"] = col
    for j in range(3):
        data[f"c{j}"] = [f"k{(r * (j + 2)) % (j + 3)}" for r in range(ROWS)]
    data["label"] = ["yes" if r % 2 else "no" for r in range(ROWS)]
    return pd.DataFrame(data).copy()  # one block per dtype, as read_csv gives a wide table


def _reference_fit(frame: pd.DataFrame, numeric: list[str]) -> list[dict]:
    """The statistics of each numeric column computed on its own with pandas."""
    out = []
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce").astype("float64")
        if values.notna().sum() == 0 or values.nunique() <= 1:
            continue
        median = float(values.median())
        filled = values.fillna(median)
        out.append({"name": col, "median": median, "mean": float(filled.mean()),
                    "std": float(filled.std(ddof=0)) or 1.0})
    return out


def _reference_column(entry: dict, raw: pd.Series) -> np.ndarray:
    filled = pd.to_numeric(raw, errors="coerce").astype("float64").fillna(entry["median"])
    return ((filled - entry["mean"]) / entry["std"]).to_numpy()


@pytest.fixture
def wide_csv(tmp_path):
    path = tmp_path / "wide.csv"
    _wide_frame().to_csv(path, index=False)
    return path


def test_a_wide_table_is_encoded_exactly_as_column_by_column(wide_csv):
    cfg = DataConfig(kind="csv", path=str(wide_csv), label="label",
                     split={"val": 0.2, "test": 0.2, "seed": 0})
    data = load_tabular(cfg)
    names = [f"x{i}" for i in range(COLUMNS)]
    assert data.feature_columns == [*names, "c0", "c1", "c2"]
    pre = TabularPreprocessor().fit(data.train.frame, data.feature_columns, [], data.origin)
    assert pre.dropped == [f"x{i}" for i in range(COLUMNS) if i % 7 == 2]  # constant, empty
    inputs = pre.input_columns
    assert inputs == [c for c in data.feature_columns if c not in pre.dropped]
    some = inputs[:-3:11]  # a slice of the columns, against pandas column by column
    expected = _reference_fit(data.train.frame, some)
    # to the bit: repr tells -0.0 from 0.0 (a column of -0.0 and 0.0 cells has either median)
    assert repr([c for c in pre.numeric if c["name"] in set(some)]) == repr(expected)
    medians = [float(data.train.frame[c["name"]].median()) for c in pre.numeric]
    assert repr([c["median"] for c in pre.numeric]) == repr(medians)
    assert [c["name"] for c in pre.categorical] == ["c0", "c1", "c2"]
    for split in (data.train, data.val, data.test):
        x = pre.transform(split.frame, data.origin)
        assert x.shape == (len(split), len(pre.feature_names))
        for entry in expected:
            want = _reference_column(entry, split.frame[entry["name"]])
            assert np.array_equal(x[:, inputs.index(entry["name"])],
                                  want.astype(np.float32))
        # a narrow table of a few of the same columns: the same encoding of them
        few = [inputs[i] for i in (0, 1, 2, 500, len(pre.numeric) - 1)]
        narrow = TabularPreprocessor().fit(data.train.frame, few, [], data.origin)
        at = [inputs.index(c) for c in few]
        assert np.array_equal(narrow.transform(split.frame, data.origin), x[:, at])


def test_numbers_stored_as_text_encode_like_numbers_in_a_wide_table():
    frame = _wide_frame().iloc[:, list(range(300)) + [COLUMNS, COLUMNS + 3]]
    text = frame.astype({"x5": object, "x8": object})
    text["x5"] = [None if pd.isna(v) else str(v) for v in frame["x5"]]
    pre = TabularPreprocessor().fit(frame, list(frame.columns[:-1]), [], "t")
    again = TabularPreprocessor().fit(text, list(frame.columns[:-1]), [], "t")
    assert again.state_dict() == pre.state_dict()
    assert np.array_equal(again.transform(text, "t"), pre.transform(frame, "t"))


def test_the_first_bad_column_of_a_wide_table_is_the_one_named():
    """Text in a number column, inf, or a value too far from the mean: the error is the one
    the leftmost such column gives on its own, with its row."""
    frame = _wide_frame().drop(columns=["label"])
    pre = TabularPreprocessor().fit(frame, list(frame.columns), [], "t")
    cases = [("x4000", "abc", "x4001", float("inf"), "column 'x4000' must be numeric but "
              "row 5 has 'abc'"),
             ("x3000", float("inf"), "x4000", "abc", "column 'x3000': row 5 holds inf, not a "
              "finite number (1 such rows)"),
             ("x1000", 1e300, "x3000", float("inf"), "column 'x1000': row 5 holds 1e+300, ")]
    for first, value, later, other, message in cases:
        bad = frame.copy()
        for col, row, cell in ((first, 3, value), (later, 7, other)):
            # text makes a column text (encoded on its own); a number keeps it in the block
            bad[col] = bad[col].astype(object if isinstance(cell, str) else float)
            bad.loc[row, col] = cell
        with pytest.raises(DataError) as wide:
            pre.transform(bad, "new.csv")
        assert message in str(wide.value)
        with pytest.raises(DataError) as alone:
            pre.transform(bad.loc[:, pre.input_columns], "new.csv")
        assert str(alone.value) == str(wide.value)
    train = frame.copy()
    train["x4501"] = train["x4501"].astype(float)
    train.loc[9, "x4501"], train.loc[4, "x2500"] = float("-inf"), float("inf")
    with pytest.raises(DataError, match="column 'x2500': row 6 holds inf"):
        TabularPreprocessor().fit(train, list(frame.columns), [], "train.csv")


def test_a_row_number_column_among_thousands_is_left_out_with_its_note(tmp_path):
    frame = _wide_frame()
    frame.insert(2500, "rownames", np.arange(1, ROWS + 1))
    frame.insert(4000, "rank", np.arange(ROWS, dtype=np.float64) * 2)
    frame.to_csv(tmp_path / "r.csv", index=False)
    data = load_tabular(DataConfig(kind="csv", path=str(tmp_path / "r.csv"), label="label"))
    assert "rownames" not in data.feature_columns and "rank" not in data.feature_columns
    assert len(data.feature_columns) == COLUMNS + 3
    assert any("column(s) 'rownames', 'rank' left out of the features" in n for n in data.notes)


@pytest.mark.parametrize("header, name", [("a,a", "'a'"), (",", "nan")])
def test_a_header_naming_a_column_twice_is_refused_in_a_wide_table(tmp_path, header, name):
    from tltool.data.csv import read_csv

    names = ",".join(f"v{i}" for i in range(300))
    path = tmp_path / "dup.csv"
    path.write_text(f"{names},{header},y\n" + ",".join(["1"] * 303) + "\n")
    with pytest.raises(DataError, match=f"column {name} appears twice in the header"):
        read_csv(path)
    path.write_text(f"{names},a.1,b,y\n" + ",".join(["1"] * 303) + "\n")
    assert list(read_csv(path).columns[-3:]) == ["a.1", "b", "y"]
