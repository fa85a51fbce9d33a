"""Built-in real data sets that ship inside the package (no network needed).

Provenance and licences: docs/DATASETS.md and LICENSES.md beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import pandas as pd

from tltool.errors import DataError


@dataclass(frozen=True)
class BuiltinTable:
    """A tabular data set stored as a gzip CSV in this folder."""

    name: str
    file: str
    label: str
    positive: str
    rows: int
    description: str


TABLES: dict[str, BuiltinTable] = {
    t.name: t
    for t in (
        BuiltinTable(
            name="credit_data",
            file="credit_data.csv.gz",
            label="Status",
            positive="bad",
            rows=4454,
            description="modeldata's credit_data: 4,454 loan applicants, 13 features; "
            "Job (fixed/freelance/others/partime) and Home give natural populations",
        ),
        BuiltinTable(
            name="german_credit",
            file="german_credit.csv.gz",
            label="creditability",
            positive="bad",
            rows=1000,
            description="Statlog German Credit: 1,000 applicants, 20 features, 30% bad",
        ),
    )
}


def load_table(name: str) -> pd.DataFrame:
    """Read a built-in table; an unknown name lists the choices."""
    if name not in TABLES:
        raise DataError(f"unknown built-in data set {name!r}; available: {', '.join(TABLES)}")
    with resources.files(__name__).joinpath(TABLES[name].file).open("rb") as fh:
        return pd.read_csv(fh, compression="gzip")
