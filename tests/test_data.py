"""Tabular loading, population filters, splits, sub-sampling and preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tltool.config import DataConfig
from tltool.data.preprocess import TabularPreprocessor
from tltool.data.tabular import load_tabular
from tltool.datasets import TABLES, load_table
from tltool.errors import DataError


def _cfg(**kw) -> DataConfig:
    base = {"kind": "builtin", "name": "credit_data"}
    return DataConfig.model_validate(base | kw)


@pytest.mark.parametrize("name", list(TABLES))
def test_builtin_tables_ship_with_the_package(name):
    frame = load_table(name)
    spec = TABLES[name]
    assert len(frame) == spec.rows
    assert set(frame[spec.label].unique()) == {"good", "bad"}


def test_population_filter_and_positive_class():
    data = load_tabular(_cfg(where={"Job": "partime"}))
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == 452
    assert data.classes == ["good", "bad"]  # the positive class is last: column 1 = P(bad)
    assert "Job" in data.feature_columns


def test_filter_accepts_lists():
    data = load_tabular(_cfg(where={"Job": ["partime", "others"]}))
    assert len(data.train) + len(data.val) + len(data.test) == 452 + 171


def test_split_is_stratified_and_fixed_across_seeds():
    cfg = _cfg(where={"Job": "partime"}, split={"val": 0.2, "test": 0.4}, n_train=50)
    a, b = load_tabular(cfg), load_tabular(cfg)
    assert len(a.test) == 181 and len(a.train) == 50
    # the data section alone fixes the rows (no training seed reaches the loader): the test
    # rows and the labelled ones stay (an ensemble of seeds sees the labels of one run)
    assert list(a.test.ids) == list(b.test.ids)
    assert list(a.train.ids) == list(b.train.ids)
    assert list(a.val.ids) == list(b.val.ids)
    c = load_tabular(cfg.model_copy(update={"sample_seed": 1}))
    assert list(c.test.ids) == list(a.test.ids)
    assert list(a.train.ids) != list(c.train.ids)  # other labelled rows only when asked
    assert not set(a.train.ids) & set(a.test.ids)
    overall = np.mean(np.concatenate([a.train.y, a.val.y, a.test.y]))
    assert abs(a.test.y.mean() - overall) < 0.02


def test_n_train_too_large_says_how_many_exist():
    with pytest.raises(DataError) as exc:
        load_tabular(_cfg(where={"Job": "partime"}, n_train=500))
    assert "n_train = 500 but the training split has only 270 rows" in str(exc.value)


def _frame():
    return pd.DataFrame({
        "income": [10.0, 20.0, np.nan, 40.0],
        "home": ["rent", "own", "rent", np.nan],
        "const": [1, 1, 1, 1],
    })


def test_preprocessor_fits_on_given_rows_only_and_handles_unseen():
    pre = TabularPreprocessor().fit(_frame(), ["income", "home", "const"], [], "t")
    assert pre.dropped == ["const"]
    num = pre.numeric[0]
    assert num["median"] == 20.0 and num["mean"] == pytest.approx(22.5)
    assert pre.feature_names == ["income", "home=(missing)", "home=own", "home=rent"]
    new = pd.DataFrame({"income": [np.nan, 22.5], "home": ["castle", "own"], "const": [5, 5]})
    x = pre.transform(new, "new")
    assert x[0, 1:].tolist() == [0, 0, 0]  # an unseen category: all zeros, no crash
    assert x[1, 0] == pytest.approx(0.0)
    assert x[0, 0] == pytest.approx((20.0 - 22.5) / num["std"])  # imputed with the train median
    assert pre.unseen_counts(new) == {"home": 1}
    again = TabularPreprocessor.from_state(pre.state_dict())
    assert np.array_equal(again.transform(new, "new"), x)


def test_text_in_a_numeric_column_names_the_row():
    frame = pd.DataFrame({"income": [str(v) for v in range(20)] + ["abc"], "y": [0] * 21})
    with pytest.raises(DataError) as exc:
        TabularPreprocessor().fit(frame, ["income"], [], "data.csv")
    assert "column 'income' holds numbers but row 22 has 'abc'" in str(exc.value)


def test_transform_rejects_text_and_missing_columns():
    pre = TabularPreprocessor().fit(_frame(), ["income", "home"], [], "t")
    with pytest.raises(DataError, match="column 'income' must be numeric but row 3 has 'x'"):
        pre.transform(pd.DataFrame({"income": [1, "x"], "home": ["own", "own"]}), "new.csv")
    with pytest.raises(DataError, match="missing column.* income"):
        pre.transform(pd.DataFrame({"home": ["own"]}), "new.csv")


def test_read_csv_takes_semicolons_decimal_commas_latin1_and_text_ids(tmp_path):
    from tltool.data.csv import read_csv

    (tmp_path / "semi.csv").write_text("id;income;city\n00101;1,5;Köln\n00102;2,25;Graz\n",
                                       encoding="latin-1")
    frame = read_csv(tmp_path / "semi.csv", text_columns=["id"])
    assert frame["id"].tolist() == ["00101", "00102"]
    assert frame["income"].tolist() == [1.5, 2.25] and frame["city"][0] == "Köln"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_symbolic_link_loop_as_data_path_is_named_a_loop(pretrained, cli, write_config,
                                                             tmp_path):
    """Not "CSV file not found": the path exists, as a link that leads back to itself."""
    loop = tmp_path / "loop.csv"
    loop.symlink_to(tmp_path / "loop2.csv")
    (tmp_path / "loop2.csv").symlink_to(loop)
    config = write_config("c", {"source": {"kind": "csv", "path": str(loop), "label": "y",
                                           "where": None}})
    before = _files(tmp_path)
    for args in (["pretrain", config], ["predict", str(pretrained), str(loop)],
                 ["evaluate", str(pretrained), "--csv", str(loop)]):
        res = cli(*args)
        assert res.code == 2, res.err
        assert res.err == f"error: {loop}: a symbolic link loop; expected a CSV file\n"
        assert _files(tmp_path) == before


def test_a_row_number_column_is_left_out_with_a_note(tmp_path):
    """R's write.csv adds `rownames`: unique increasing whole numbers, not a feature."""
    frame = load_table("credit_data").iloc[:300]
    frame.insert(0, "rownames", np.arange(1, 301))
    frame.to_csv(tmp_path / "r.csv", index=False)
    data = load_tabular(_cfg(kind="csv", path=str(tmp_path / "r.csv"), name=None,
                             label="Status"))
    assert "rownames" not in data.feature_columns
    assert any("'rownames' left out of the features" in n for n in data.notes)
    kept = load_tabular(_cfg(kind="csv", path=str(tmp_path / "r.csv"), name=None,
                             label="Status", features=["rownames", "Age"]))
    assert kept.feature_columns == ["rownames", "Age"]  # asked for: kept
