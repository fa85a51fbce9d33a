"""The one CSV reader: tables (training, evaluate --csv, predict) and lists of image paths.

`read_csv` finds the separator from the header line (comma, else semicolon / tab / pipe), reads
UTF-8 (with or without BOM), else Latin-1 with a warning, and says which file is wrong and how.
What differs between kinds of CSV file (all columns as text, how strictly the layout is
checked, the words of some messages) is a `CsvRules`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tltool.errors import DataError

log = logging.getLogger("tltool")


@dataclass(frozen=True)
class CsvRules:
    """How one kind of CSV file is read, and the words its messages use where kinds differ."""

    # said after "is a folder; " and "is not a regular file; "
    expects: str = "expected a CSV file"
    # the start of a parse error, before pandas' own first line; {sep} is the separator
    unreadable: str = "not a readable CSV file (separator {sep!r})"
    # every column kept as text (image paths, label names), empty cells still missing
    all_text: bool = False
    # refuse rows with more fields than the header and a column name given twice (a table's
    # checks); False leaves such files to pandas (an extra first field becomes the index)
    strict: bool = True


# A table (training data, evaluate --csv, predict): the defaults.
TABLE = CsvRules()
# pandas' name for the second "a" of a header ("a.1"), the third ("a.2"), ...
RENAMED = re.compile(r".*\.\d+", re.DOTALL)
# Tables of more columns than this are consolidated after reading (one block per dtype),
# unless they have more cells than WIDE_CELLS: then the rows, not the columns, cost the time,
# and a copy would only hold the memory twice
WIDE = 100
WIDE_CELLS = 1 << 25


def _separator(path: Path, encoding: str) -> str:
    """Comma, or the semicolon / tab / pipe that the header line uses instead (a semicolon
    is the usual separator where the decimal mark is a comma)."""
    with open(path, encoding=encoding, errors="replace") as fh:
        header = fh.readline()
    if "," in header:
        return ","
    counts = {sep: header.count(sep) for sep in (";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _check_file(path: Path, rules: CsvRules) -> None:
    try:
        os.stat(path)
    except OSError as exc:  # Path.exists() says False for a loop: it is no missing file
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: a symbolic link loop; {rules.expects}") from None
    if not path.exists():
        raise DataError(f"{path}: CSV file not found (relative paths are taken from the "
                        f"current folder {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; {rules.expects}")
    if not path.is_file():  # a FIFO, device or socket would block or never end
        raise DataError(f"{path}: is not a regular file; {rules.expects}")


def _parse(path: Path, text_columns: list[str],
           rules: CsvRules) -> tuple[pd.DataFrame, str, str]:
    """The frame, the encoding it was read with and its separator."""
    dtype = str if rules.all_text else ({c: str for c in text_columns} or None)
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            sep = _separator(path, encoding)
            # ';'-separated files come from locales whose decimal mark is a comma
            with warnings.catch_warnings():
                # rows with more fields than the header: pandas would drop them (ParserWarning)
                if rules.strict:
                    warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, sep=sep, encoding=encoding, dtype=dtype,
                                    decimal="," if sep == ";" else ".",
                                    index_col=False if rules.strict else None)
            return frame, encoding, sep
        except pd.errors.ParserWarning:
            raise DataError(f"{path}: some rows have more fields than the header (separator "
                            f"{sep!r}); every row needs one value per column") from None
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the CSV file is empty") from None
        except UnicodeDecodeError:
            continue
        except pd.errors.ParserError as exc:
            raise DataError(f"{path}: {rules.unreadable.format(sep=sep)}: "
                            f"{str(exc).splitlines()[0]}") from None
    raise AssertionError("Latin-1 decodes any bytes")


def _maybe_renamed(name: object) -> bool:
    """A name pandas may have given: a repeated column's ("a.1") or an empty one's
    ("Unnamed: 3"). Only then can the header hold a name twice."""
    return isinstance(name, str) and (RENAMED.fullmatch(name) is not None or
                                      name.startswith("Unnamed: "))


def _check_header(path: Path, sep: str, encoding: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the second)."""
    header = pd.read_csv(path, sep=sep, encoding=encoding, header=None, nrows=1,
                         dtype=str).iloc[0].tolist()
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header; give "
                            f"each column its own name")
        seen.add(name)


def read_csv(path: Path, text_columns: list[str] | None = None,
             rules: CsvRules = TABLE) -> pd.DataFrame:
    """A CSV file as written: comma, semicolon, tab or pipe separated; UTF-8 (with or
    without BOM), else Latin-1 with a warning. `text_columns` (ids) are kept as text, so
    00101 stays 00101; `rules` says what kind of CSV file is expected (default: a table)."""
    _check_file(path, rules)
    frame, encoding, sep = _parse(path, text_columns or [], rules)
    if rules.strict and any(_maybe_renamed(name) for name in frame.columns):
        _check_header(path, sep, encoding)
    if len(frame.columns) > WIDE and frame.size <= WIDE_CELLS:
        # pandas' reader gives every column a block of its own, and each later row selection
        # (splits, filters) then walks them one by one; a copy holds one block per dtype
        frame = frame.copy()
    if encoding != "utf-8-sig":
        log.warning("%s: not UTF-8; read as Latin-1 (save it as UTF-8 if accents look wrong)",
                    path)
    if sep != ",":
        log.info("%s: %r-separated", path, sep)
    if frame.empty:
        raise DataError(f"{path}: the CSV file has a header but no rows")
    return frame
