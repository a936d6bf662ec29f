"""Drift: training reference statistics at register, and each worker's live inputs and answers scored against them
(population stability index over a sliding window), exported as Prometheus gauges."""

import itertools
import logging
import math
import threading
from bisect import bisect_right
from typing import Any

import numpy as np
from prometheus_client import Gauge

log = logging.getLogger(__name__)

# Quantile bins per feature: 10 is the usual choice for PSI (deciles), coarse enough that a window of a few hundred
# rows fills every bin.
BINS = 10
# An empty bin's fraction, live or reference: ln(0) is undefined, and a single empty bin must not read as infinite
# drift.
EPSILON = 1e-4
# A worker reports a window's PSI only once it holds this many rows (or DRIFT_WINDOW, if smaller): PSI over a
# handful of rows is noise, and a worker that has just started must not fire the alert.
MIN_ROWS = 100
# The gauges are recomputed once this share of the window has arrived, not on every request: for a one-row request,
# PSI and the gauge writes cost about as much as the counting (20 us measured), and a score staler by 1% of the
# window changes no alert.
REPORT_SHARE = 0.01
# Requests of up to this many rows are binned in Python (bisect per value, counts in a list): for one row of 20
# features that is 8 us against 28 us for the numpy calls (a comparison per rank of cut points, bincounts), whose
# fixed cost only pays off on larger batches (even at 8 rows: 46 us each). The compiled backend's near-tie search
# switches to numpy at the same size.
SMALL_BATCH = 8

# The worst worker alerts: each worker has its own window, and a drifted slice of traffic may reach only some.
FEATURE_PSI = Gauge(
    "sibyl_feature_drift_psi",
    "PSI of live inputs against the training reference, over this worker's last DRIFT_WINDOW rows",
    ["model", "version", "feature"],
    multiprocess_mode="max",
)
PREDICTION_PSI = Gauge(
    "sibyl_prediction_drift_psi",
    "PSI of predicted classes (or values, binned by the training predictions' quantiles) against the reference",
    ["model", "version"],
    multiprocess_mode="max",
)


def quantile_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Inner cut points at the values' quantiles, ties merged (a feature with few distinct values gets fewer bins)."""
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def fractions(binned: np.ndarray, n_bins: int) -> list[float]:
    """Each bin's share of the rows."""
    return (np.bincount(binned, minlength=n_bins) / max(len(binned), 1)).tolist()


def _binned(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin numbers 0..len(edges): a value equal to a cut point goes to the bin above it."""
    return np.searchsorted(edges, values, side="right")


def reference_stats(
    estimator: Any, X: np.ndarray, y: np.ndarray | None, names: list[str] | None, classes: list | None
) -> dict:
    """The reference a model's metadata keeps: per-feature quantile bins with the training rows' share of each, the
    training predictions' distribution, and (given a target) the classes' frequencies."""
    # Imported here: registry imports this module for its checks.
    from app.registry import without_feature_names

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not len(X) or not np.isfinite(X).all():
        raise ValueError("reference rows must be a non-empty table of finite numbers")
    features = []
    for j in range(X.shape[1]):
        edges = quantile_edges(X[:, j])
        features.append(
            {
                "name": names[j] if names else str(j),
                "edges": edges.tolist(),
                "fractions": fractions(_binned(edges, X[:, j]), len(edges) + 1),
            }
        )
    predicted = np.asarray(without_feature_names(estimator).predict(X))
    ref: dict = {"rows": len(X), "bins": BINS, "features": features}
    if classes is not None:
        keys = [str(c) for c in classes]
        ref["predictions"] = {"classes": _frequencies(predicted, keys)}
        if y is not None:
            unknown = sorted({str(v) for v in y} - set(keys))
            if unknown:
                raise ValueError(f"the target holds {unknown[0]!r}, which is not one of the model's classes")
            ref["classes"] = _frequencies(np.asarray(y), keys)
    else:
        predicted = predicted.astype(np.float64)
        edges = quantile_edges(predicted)
        ref["predictions"] = {
            "edges": edges.tolist(),
            "fractions": fractions(_binned(edges, predicted), len(edges) + 1),
        }
    return ref


def _frequencies(labels: np.ndarray, keys: list[str]) -> dict[str, float]:
    """Each class's share of labels, keyed by the label as text (JSON object keys are text)."""
    spelled = [str(v) for v in labels.tolist()]
    return {key: spelled.count(key) / len(spelled) for key in keys}


def check_reference(ref: object, n_features: int, classes: list | None) -> str | None:
    """What is wrong with a metadata's reference for this model, or None when it is usable."""
    if type(ref) is not dict or type(ref.get("features")) is not list or len(ref["features"]) != n_features:
        return f"'reference' must hold 'features': one entry per feature ({n_features})"
    for feature in ref["features"]:
        if _bad_bins(feature):
            return "each reference feature needs sorted finite 'edges' and one more 'fractions' than edges"
    predictions = ref.get("predictions")
    if classes is not None:
        shares = predictions.get("classes") if type(predictions) is dict else None
        if type(shares) is not dict or set(shares) != {str(c) for c in classes}:
            return "'reference.predictions.classes' must give a share for each of the model's classes"
    elif _bad_bins(predictions):
        return "'reference.predictions' needs sorted finite 'edges' and one more 'fractions' than edges"
    return None


def _bad_bins(bins: object) -> bool:
    """Whether a {edges, fractions} entry is unusable."""
    if type(bins) is not dict:
        return True
    edges, shares = bins.get("edges"), bins.get("fractions")
    if type(edges) is not list or type(shares) is not list or len(shares) != len(edges) + 1:
        return True
    numbers = [*edges, *shares]
    if not all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
        return True
    return any(a >= b for a, b in itertools.pairwise(edges))


class Window:
    """One model version's drift in this worker: the last `size` rows' bin numbers in a ring, their counts per bin,
    and the gauges those counts set. Inputs are columns 0..F-1, the prediction column F."""

    def __init__(self, model: Any, size: int) -> None:
        ref = model.metadata["reference"]
        self.size = size
        self.min_rows = min(size, MIN_ROWS)
        self.edges = [np.asarray(f["edges"], dtype=np.float64) for f in ref["features"]]
        # The same cut points by rank: row c holds each feature's c-th cut point (infinity past a feature's last), so
        # a batch is binned with one comparison of all its values per rank (cut <= X).
        ranks = np.full((max((len(e) for e in self.edges), default=0), len(self.edges)), np.inf)
        for j, e in enumerate(self.edges):
            ranks[: len(e), j] = e
        self._ranks = list(ranks)
        self._count_type = np.int16 if len(ranks) <= np.iinfo(np.int16).max else np.int32
        predictions = ref["predictions"]
        if model.classes is not None:
            self.classes = np.asarray(model.classes)  # scikit-learn keeps classes_ sorted: searchsorted finds each
            shares = [predictions["classes"][str(c)] for c in model.classes]
            self.pred_edges = None
        else:
            self.classes = None
            self.pred_edges = np.asarray(predictions["edges"], dtype=np.float64)
            shares = predictions["fractions"]
        columns = [f["fractions"] for f in ref["features"]] + [shares]
        self.width = max(len(c) for c in columns)  # bins per column, padded: one flat count array for all columns
        expected = np.zeros((len(columns), self.width))
        for i, c in enumerate(columns):
            expected[i, : len(c)] = c
        # Padding bins are never filled; at epsilon on both sides they add nothing to the PSI.
        self.expected = np.maximum(expected, EPSILON)
        self.offsets = np.arange(len(columns)) * self.width
        self.ring = np.zeros((size, len(columns)), dtype=np.int32)
        self._counts = [0] * (len(columns) * self.width)  # a list: the small-batch path adds to single bins
        # The same cut points as lists, for bisect; classes by label, for the small-batch path.
        self._edge_lists = [e.tolist() for e in self.edges]
        self._offset_list = self.offsets.tolist()
        self._class_index = {c: i for i, c in enumerate(self.classes.tolist())} if self.classes is not None else None
        self._pred_edge_list = self.pred_edges.tolist() if self.pred_edges is not None else None
        self.rows = 0  # rows seen, ever: the ring's next slot is rows % size
        self.report_every = max(1, int(size * REPORT_SHARE))
        self.unreported = 0  # rows since the gauges were last set
        self.columns = len(columns)
        self.labels = (model.name, model.version, [f["name"] for f in ref["features"]])
        self.gauges: list = []  # made at the first report: a series exists only once it means something
        self._lock = threading.Lock()  # gthread workers: two requests must not interleave a ring update

    @property
    def counts(self) -> np.ndarray:
        """Rows in the window per bin, all columns' bins in one flat array (column c's start at offsets[c])."""
        return np.asarray(self._counts, dtype=np.int64)

    def observe(self, X: np.ndarray, predictions: list) -> None:
        """Add a batch of rows and their answers to the window, dropping the oldest, and update the gauges."""
        if len(X) <= SMALL_BATCH and (binned := self._bin_small(X, predictions)) is not None:
            with self._lock:
                self._push_small(binned)
            return
        if len(X) > self.size:  # only the newest rows stay in the window
            X, predictions = X[-self.size :], predictions[-self.size :]
        k = len(X)
        # A value's bin is the number of cut points at or below it (searchsorted's side="right"), counted one rank of
        # cut points at a time over all features, into a contiguous array of small counts: 92 us for 1000 rows of 20
        # features, against 171 counted into the table's int32 columns and 325 for a searchsorted per feature.
        counted = np.zeros(X.shape, dtype=self._count_type)
        for cut in self._ranks:
            counted += cut <= X
        binned = np.empty((k, self.columns), dtype=np.int32)
        binned[:, :-1] = counted
        if self.classes is not None:
            binned[:, -1] = np.searchsorted(self.classes, np.asarray(predictions))
        else:
            binned[:, -1] = np.searchsorted(self.pred_edges, np.asarray(predictions, dtype=np.float64), side="right")
        binned += self.offsets
        with self._lock:
            self._push(binned)

    def _bin_small(self, X: np.ndarray, predictions: list) -> list[list[int]] | None:
        """A few rows' bin numbers (offsets added), as observe's numpy path finds them; None when an answer is not one
        of the model's classes (that path then places it as searchsorted does)."""
        if self._class_index is not None:
            try:
                answers = [self._class_index[p] for p in predictions]
            except (KeyError, TypeError):
                return None
        else:
            answers = [bisect_right(self._pred_edge_list, float(p)) for p in predictions]
        last = self._offset_list[-1]
        edges, offsets = self._edge_lists, self._offset_list
        return [
            [*(bisect_right(e, x) + o for e, x, o in zip(edges, row, offsets)), answer + last]
            for row, answer in zip(X.tolist(), answers)
        ]

    def _push_small(self, binned: list[list[int]]) -> None:
        """_push for a few rows binned in Python: the counts change one bin at a time."""
        counts, ring = self._counts, self.ring
        for bins in binned:
            slot = self.rows % self.size
            if self.rows >= self.size:  # the slot's older row leaves the window
                for b in ring[slot].tolist():
                    counts[b] -= 1
            ring[slot] = bins
            for b in bins:
                counts[b] += 1
            self.rows += 1
        self.unreported += len(binned)
        self._report()

    def _push(self, binned: np.ndarray) -> None:
        """Put binned rows in the ring over the oldest, keep the counts its rows' bins, and report when due."""
        k = len(binned)
        place = self.rows + np.arange(k)
        slots = place % self.size
        length = len(self._counts)
        if k == self.size:  # the batch is the whole window (observe keeps only its newest rows): nothing older stays
            counts = np.bincount(binned.ravel(), minlength=length)
        else:
            counts = self.counts
            if place[-1] >= self.size:  # these slots hold older rows, which leave the window
                old = slots[place >= self.size]
                counts -= np.bincount(self.ring[old].ravel(), minlength=length)
            counts += np.bincount(binned.ravel(), minlength=length)
        self.ring[slots] = binned
        self._counts = counts.tolist()
        self.rows += k
        self.unreported += k
        self._report()

    def _report(self) -> None:
        """Set the gauges from the counts, once the window holds enough rows and enough arrived since the last time."""
        if self.held >= self.min_rows and self.unreported >= self.report_every:
            self.unreported = 0
            if not self.gauges:
                name, version, features = self.labels
                self.gauges = [FEATURE_PSI.labels(name, version, f) for f in features]
                self.gauges.append(PREDICTION_PSI.labels(name, version))
            for gauge, value in zip(self.gauges, self.psi().tolist()):
                gauge.set(value)

    @property
    def held(self) -> int:
        """Rows in the window now."""
        return min(self.rows, self.size)

    def psi(self) -> np.ndarray:
        """Each column's PSI: sum over bins of (live - reference) * ln(live / reference), shares floored at epsilon."""
        live = np.maximum(self.counts.reshape(self.columns, self.width) / self.held, EPSILON)
        return ((live - self.expected) * np.log(live / self.expected)).sum(axis=1)


class Drift:
    """Every served version's window in this worker, by the Model object that answered; none for a model without
    reference statistics, or with DRIFT_WINDOW=0."""

    def __init__(self, models: list, size: int) -> None:
        self.windows = {id(m): Window(m, size) for m in models if size and m.metadata.get("reference")}

    def observe(self, model: Any, X: np.ndarray, predictions: list) -> None:
        """Count a request's rows for its model version, if that version has a reference."""
        window = self.windows.get(id(model))
        if window is None:
            return
        try:
            window.observe(X, predictions)
        except Exception:  # monitoring must never fail a predict that has its answer
            log.exception("drift for model %s %s failed; it is off in this worker", model.name, model.version)
            del self.windows[id(model)]
