"""(3) Rows from any protocol -> a finite float64 matrix that fits the model, or a 400 saying how to fix it."""

import csv
import io
import math
import re
from itertools import chain

import numpy as np

from app.errors import ApiError
from app.registry import Model

_NUMBERS = frozenset({int, float})
_LIST = {list}
# to_matrix checks and converts requests of more rows than this in bulk.
_BULK_FROM = 8
# A CSV cell is a plain decimal number: float() alone would also take "nan", "inf" and "1_000".
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TYPE_NAMES = {str: "a string", bool: "a boolean", type(None): "null", list: "a list", dict: "an object"}


def invalid(message: str) -> ApiError:
    """A 400 for input that parsed but does not fit the model."""
    return ApiError(400, "invalid_input", message)


def too_many_rows(sent: int, max_rows: int) -> ApiError:
    """The 413 for more rows than MAX_ROWS."""
    return ApiError(413, "too_many_rows", f"{sent} rows sent; at most {max_rows} per request (MAX_ROWS)")


def to_matrix(rows: object, model: Model, max_rows: int, field: str = "features") -> np.ndarray:
    """Check rows (lists of numbers, or objects keyed by feature name) and stack them as float64."""
    if isinstance(rows, list) and rows and type(rows[0]) in _NUMBERS:
        rows = [rows]  # a single flat row is one instance
    if not isinstance(rows, list) or not rows:
        raise invalid(f"{field} must be a non-empty list of rows, e.g. [[{_example(model)}]]")
    if len(rows) > max_rows:
        raise too_many_rows(len(rows), max_rows)
    n = model.n_features
    try:
        if len(rows) > _BULK_FROM and _plain(rows, n):
            # Checked in bulk and converted in one pass over the values: 21% less time than the loop below from 100
            # rows on (np.fromiter, unlike np.array, needs no nested lists' shape); for a few rows the loop is faster.
            X = np.fromiter(chain.from_iterable(rows), np.float64, count=len(rows) * n).reshape(len(rows), n)
        else:
            X = np.array(_checked(rows, model, field), dtype=np.float64)
    except OverflowError:
        raise invalid(f"a value in {field} is too large for a 64-bit float") from None
    if not np.isfinite(X).all():
        i, j = (int(k) for k in np.argwhere(~np.isfinite(X))[0])
        where = f"{field}[{i}]{_feature(model, j)}"
        raise invalid(f"{where} holds a value too large for a 64-bit float; values must be finite")
    return X


def _plain(rows: list, n: int) -> bool:
    """Whether every row is a list of n numbers (ints or floats), in three C-level passes."""
    return (
        set(map(type, rows)) == _LIST
        and set(map(len, rows)) == {n}
        and _NUMBERS.issuperset(map(type, chain.from_iterable(rows)))
    )


def _checked(rows: list, model: Model, field: str) -> list[list]:
    """Rows as lists of numbers in the model's order, checked one by one: a 400 names the first bad row or value."""
    n = model.n_features
    ordered = []
    for i, row in enumerate(rows):
        named = type(row) is dict
        if named:
            row = _named_row(row, model, f"{field}[{i}]")
        elif type(row) is not list:
            raise invalid(f"{field}[{i}] is {_kind(row)}; each row must be a list of {n} numbers or an object")
        elif len(row) != n:
            raise invalid(f"{field}[{i}] has {len(row)} values; the model expects {n}{_names(model)}")
        if not _NUMBERS.issuperset(map(type, row)):
            j = next(j for j, v in enumerate(row) if type(v) not in _NUMBERS)
            where = f"{field}[{i}]{_feature(model, j)}" if named else f"{field}[{i}][{j}]"
            raise invalid(f"{where} is {_kind(row[j])}; every value must be a finite number")
        ordered.append(row)
    return ordered


def check_array(X: np.ndarray, model: Model, max_rows: int, field: str) -> np.ndarray:
    """to_matrix's checks for rows a protocol decoded itself (binary or typed tensors): at least one row, at most
    max_rows (413), n_features values each, every value finite; returned as a contiguous float64 matrix."""
    n = model.n_features
    if X.ndim != 2 or not len(X):
        raise invalid(f"{field} must hold at least one row of {n} values")
    if len(X) > max_rows:
        raise too_many_rows(len(X), max_rows)
    if X.shape[1] != n:
        raise invalid(f"{field} has {X.shape[1]} values per row; the model expects {n}{_names(model)}")
    X = np.ascontiguousarray(X, dtype=np.float64)  # every numeric tensor type fits float64's range
    if not np.isfinite(X).all():
        i = int(np.argwhere(~np.isfinite(X))[0][0])
        raise invalid(f"{field} row {i} holds a value that is not finite (NaN or infinity); values must be finite")
    return X


def column_order(names: object, model: Model, where: str) -> list[int] | None:
    """Where each of the model's features is among the named columns sent (None: already in order), or a 400 naming
    the missing and unknown columns. A model without feature names takes its columns in the order sent."""
    if not isinstance(names, list) or not all(type(n) is str for n in names):
        raise invalid(f"{where} must be a list of column names (strings)")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise invalid(f"{where} names column {field_name(dup)} more than once")
    expected = model.feature_names
    if expected is None:
        if len(names) != model.n_features:
            raise invalid(f"{where} names {len(names)} columns; the model expects {model.n_features}")
        return None
    missing = [n for n in expected if n not in set(names)]
    unknown = sorted(set(names) - set(expected))
    if missing or unknown:
        parts = [f"missing {', '.join(map(field_name, missing))}"] if missing else []
        parts += [f"unknown {', '.join(map(field_name, unknown))}"] if unknown else []
        raise invalid(f"{where}: {'; '.join(parts)}; the model expects {', '.join(expected)}")
    if names == list(expected):
        return None
    position = {n: i for i, n in enumerate(names)}
    return [position[n] for n in expected]


def from_columns(columns: dict, model: Model, max_rows: int, field: str) -> np.ndarray:
    """An object of named columns ({"a": [1, 2], "b": [3, 4]}, a scalar for one row) as the model's matrix."""
    if not columns:
        raise invalid(f"{field} must be an object of columns, one list of values per feature name")
    names = list(columns)
    order = column_order(names, model, field)
    values = [v if type(v) is list else [v] for v in columns.values()]
    lengths = {len(v) for v in values}
    if len(lengths) != 1:
        # 422, not 400: a JSON schema can say what each column holds but not that all have one length.
        raise ApiError(
            422,
            "invalid_input",
            f"the columns of {field} have different lengths ({', '.join(map(str, sorted(lengths)))}); send one "
            "value per row in each",
        )
    if order is not None:
        values = [values[j] for j in order]
    return to_matrix([list(row) for row in zip(*values)], model, max_rows, field)


def from_csv(data: bytes, model: Model, max_rows: int) -> np.ndarray:
    """A CSV body (what pandas' to_csv(index=False) writes): a header row of column names (any order), then rows of
    numbers; blank lines skipped."""
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first column's name
    except UnicodeDecodeError:
        raise invalid("The CSV body is not valid UTF-8.") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        # Blank lines are skipped, as pandas' read_csv (MLflow's parser) skips them.
        lines = (row for row in reader if row)
        header = [name.strip() for name in next(lines, [])]
        if not header:
            raise invalid("The CSV body is empty; send a header row of column names, then one row per line.")
        if model.feature_names and all(_NUMBER.fullmatch(name) for name in header):
            # Said before naming the header's "columns": they are values, and messages never quote values.
            raise invalid(f"The CSV body's first line must be a header row naming the columns: {_expected(model)}")
        rows = [_csv_row(row, header, reader.line_num) for row in lines]
    except csv.Error:
        raise invalid(f"The CSV body could not be parsed at line {reader.line_num} (check its quoting).") from None
    if not rows:
        raise invalid("The CSV body has a header row but no data rows; send one row of numbers per line after it.")
    order = column_order(header, model, "the CSV header")
    return to_matrix(reorder(rows, order, len(header), "text/csv"), model, max_rows, "text/csv")


def _csv_row(row: list[str], header: list[str], line: int) -> list[float]:
    """One CSV line's cells as finite numbers, or a 400 naming its line and column (never the cell)."""
    if len(row) != len(header):
        raise invalid(f"CSV line {line} has {len(row)} cells; the header names {len(header)} columns")
    values = []
    for name, cell in zip(header, row):
        cell = cell.strip()
        value = float(cell) if _NUMBER.fullmatch(cell) else math.nan
        if not math.isfinite(value):
            raise invalid(f"CSV line {line}, column {field_name(name)}: not a finite number")
        values.append(value)
    return values


def _expected(model: Model) -> str:
    """The model's feature names, comma-separated."""
    return ",".join(model.feature_names or ())


def reorder(rows: object, order: list[int] | None, width: int, field: str) -> object:
    """Rows whose values follow the columns sent, put in the model's order (checked for width first)."""
    if order is None or not isinstance(rows, list):
        return rows
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != width:
            raise invalid(f"{field}[{i}] must be a list of {width} values, one per column")
    return [[row[j] for j in order] for row in rows]


def _named_row(row: dict, model: Model, where: str) -> list:
    """Order an object's values by the model's feature names, or say which names are wrong."""
    names = model.feature_names
    if names is None:
        raise invalid(f"{where} is an object, but this model has no feature names; send each row as a list")
    try:
        values = [row[name] for name in names]
    except KeyError as e:
        raise invalid(f"{where} is missing {e.args[0]!r}; the model expects {', '.join(names)}") from None
    if len(row) != len(names):
        extra = sorted(set(row) - set(names))
        raise invalid(f"{where} has unknown field {field_name(extra[0])}; the model expects {', '.join(names)}")
    return values


def field_name(name: str) -> str:
    """A caller's field name for an error message, quoted and cut short (messages never carry the body)."""
    return repr(name if len(name) <= 40 else name[:40] + "...")


def _kind(value: object) -> str:
    """Name a JSON value's type without echoing the value itself."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _feature(model: Model, j: int) -> str:
    """ "['name']" for feature j when the model has names, so a form can show the message beside that input."""
    return f"[{model.feature_names[j]!r}]" if model.feature_names else ""


def _names(model: Model) -> str:
    """': a, b, c' when the model has feature names."""
    return f": {', '.join(model.feature_names)}" if model.feature_names else ""


def _example(model: Model) -> str:
    """A placeholder row of the right width for error messages."""
    return ", ".join(["0.0"] * min(model.n_features, 4)) + (", ..." if model.n_features > 4 else "")
