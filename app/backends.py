"""(7) Predictors behind one interface: scikit-learn itself, or the same model compiled to ONNX."""

import hashlib
import json
import logging
import math
import os
import pickle
import select
import signal
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from threadpoolctl import threadpool_limits

from app import process
from app.artifacts import ModelError, refuse_world_writable
from app.drift import SMALL_BATCH
from app.registry import Model, final_estimator, without_feature_names, write_atomically

log = logging.getLogger(__name__)

# Compiled and scikit-learn outputs must agree this closely on the sample rows before we switch. A regressor's
# value is the answer itself, so it must match to float64 rounding (the atol only matters for values near 0).
PROBA_ATOL = 1e-5
VALUE_RTOL, VALUE_ATOL = 1e-9, 1e-12
_TREE_MODULES = ("sklearn.ensemble", "sklearn.tree")
# Libraries whose versions decide what a kept compiled graph computes.
_COMPILER_LIBS = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime")
# Workers = cores: a BLAS or OpenMP pool per worker would oversubscribe them. Set once for the process
# (the gunicorn master, whose forked workers inherit it), not per backend object.
threadpool_limits(1)


def _scope(name: str, *parts: str) -> str:
    """A cache-key scope: the backend's name and a short digest of everything else that decides its answers, so
    replicas running other library versions (a rolling upgrade) never share keys."""
    return f"{name}.{hashlib.sha256(' '.join(parts).encode()).hexdigest()[:12]}"


class SklearnBackend:
    """Calls the estimator directly, single-threaded, with scikit-learn's re-validation turned off."""

    name = "sklearn"

    def __init__(self, estimator: Any) -> None:
        # Rows arrive validated and ordered by the model's (checked) feature names, so the estimator's own name
        # check only warns; a copy without names skips it, leaving the warning on for everyone else's calls.
        estimator = self.estimator = without_feature_names(estimator)
        self.scope = _scope(self.name, f"scikit-learn {sklearn.__version__}", f"numpy {np.__version__}")
        for key in estimator.get_params(deep=True):
            if key == "n_jobs" or key.endswith("__n_jobs"):
                estimator.set_params(**{key: 1})

    def warm(self) -> None:
        """Nothing to open per process."""

    def predict(self, X: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (or values) for each row, and class probabilities when asked."""
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            labels = self.estimator.predict(X)
            return labels, (self.estimator.predict_proba(X) if proba else None)


class OnnxBackend:
    """Runs the model converted by skl2onnx in onnxruntime, one thread per worker."""

    name = "onnx"

    def __init__(self, onnx_bytes: bytes, model: Model, dtype: type) -> None:
        self.onnx_bytes = onnx_bytes
        self.dtype = dtype
        # Versions read from package metadata: importing onnxruntime here (the master) would break forked workers.
        libs = (f"{lib} {version(lib)}" for lib in (*_COMPILER_LIBS, "numpy"))
        self.scope = _scope(self.name, np.dtype(dtype).name, *libs)
        self.classes = np.asarray(model.classes) if model.classes is not None else None
        # scikit-learn itself: what verification compares against, and what answers near-tie rows.
        self.reference = SklearnBackend(model.estimator)
        self.check_ties = model.has_proba
        self._pid = None

    def warm(self) -> None:
        """Open this process's onnxruntime session.

        Never in the gunicorn master: a process that has merely imported onnxruntime hands its forked
        workers a runtime that aborts or hangs when they exit, so each worker opens its own after fork.
        """
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(self.onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._pid = process.pid()

    def predict(self, X: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Same contract as SklearnBackend.predict."""
        if self._pid != process.pid():
            self.warm()
        out = self.session.run(self.outputs, {self.input_name: X.astype(self.dtype, copy=False)})
        if self.classes is None:
            y = np.asarray(out[0], dtype=np.float64)
            return (y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y), None
        # Cast labels back to the model's own label type (ONNX turns float labels into int64).
        labels = np.asarray(out[0]).astype(self.classes.dtype, copy=False)
        p = np.asarray(out[1], dtype=np.float64)
        if self.check_ties and p.shape[1] > 1:
            # Near-ties (a forest's 50/50 vote) can break the other way after float32 summation;
            # scikit-learn answers those few rows so labels always match it exactly.
            unsure = _near_ties(p)
            if len(unsure):
                labels[unsure], p[unsure] = self.reference.predict(X[unsure], proba=True)
        if not proba and not np.isfinite(p).all():
            # A label drawn from NaN probabilities is no answer: hand them on, so the pipeline refuses the rows (422
            # non_finite_answer) as it does when they are asked for, and as scikit-learn itself refuses them.
            return labels, p
        return labels, (p if proba else None)


def _near_ties(p: np.ndarray) -> list[int] | np.ndarray:
    """The rows whose two most likely classes are within 2 * PROBA_ATOL of each other (never a row holding NaN)."""
    if len(p) <= SMALL_BATCH:  # drift's threshold, for the same reason: numpy's fixed cost per call
        # A few rows in Python: numpy's five calls cost 5-14 us on one row, most of a compiled model's answer.
        return [i for i, row in enumerate(p.tolist()) if _margin(row) <= 2 * PROBA_ATOL]
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * PROBA_ATOL)


def _margin(row: list[float]) -> float:
    """The largest value less the second largest, as np.partition finds them: NaN when the row holds a NaN (numpy
    sorts it last) or both infinities."""
    if len(row) == 2:
        return abs(row[0] - row[1])
    if math.isnan(sum(row)):  # a NaN, or +inf and -inf: sorted() would order a NaN arbitrarily
        return math.nan
    *_, second, first = sorted(row)
    return first - second


def sample_rows(model: Model) -> np.ndarray:
    """Rows to compare backends on: the ones shipped in the metadata, plus seeded random ones."""
    rng = np.random.default_rng(0)
    shipped = model.metadata.get("sample_rows") or []
    if shipped:
        shipped = np.asarray(shipped, dtype=np.float64)
        lo, hi = shipped.min(axis=0), shipped.max(axis=0)
        spread = rng.uniform(lo, hi, size=(64, model.n_features))
        return np.vstack([shipped, spread])
    return rng.normal(size=(64, model.n_features))


def _convert(model: Model, dtype: type) -> bytes:
    """Convert the estimator to ONNX bytes, with class probabilities as a plain tensor."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = DoubleTensorType if dtype is np.float64 else FloatTensorType
    final = final_estimator(model.estimator)
    # ZipMap (a list of dicts per row) is slow and pointless: we build our own maps.
    options = {id(final): {"zipmap": False}} if model.classes is not None else None
    onx = convert_sklearn(model.estimator, initial_types=[("X", tensor([None, model.n_features]))], options=options)
    return onx.SerializeToString()


def _dtypes(model: Model) -> list[type]:
    """Input precisions to try. A regressor's value is the answer, so float64 only (a float32 graph drifts by
    ~1e-7); tree classifiers compare in float32 inside scikit-learn, so match them; other classifiers prefer
    float64 (their labels and probabilities are verified either way)."""
    if model.classes is None:
        return [np.float64]
    if type(final_estimator(model.estimator)).__module__.startswith(_TREE_MODULES):
        return [np.float32, np.float64]
    return [np.float64, np.float32]


def _compiled_path(model: Model, dtype: type) -> Path:
    """Where the converted model is kept: beside the artifact, keyed by its sha256 and precision."""
    return model.path.parent / ".compiled" / f"{model.sha256}.{np.dtype(dtype).name}.onnx"


def disagreement(model: Model, backend: OnnxBackend, rows: np.ndarray) -> str | None:
    """Why a compiled backend disagrees with scikit-learn on these rows, or None if it agrees."""
    ref_labels, ref_p = backend.reference.predict(rows, proba=model.has_proba)
    labels, p = backend.predict(rows, proba=model.has_proba)
    if model.classes is None:
        if not np.allclose(labels, ref_labels, rtol=VALUE_RTOL, atol=VALUE_ATOL):
            rel = np.max(np.abs(labels - ref_labels) / np.maximum(np.abs(ref_labels), VALUE_ATOL))
            return f"predictions differ by up to {rel:.3g} relative (at most {VALUE_RTOL:g} is allowed)"
        return None
    if not np.array_equal(labels, ref_labels):
        return f"labels differ on {int(np.sum(labels != ref_labels))} of {len(rows)} sample rows"
    if ref_p is not None and not np.allclose(p, ref_p, rtol=0, atol=PROBA_ATOL):
        return f"probabilities differ by up to {np.max(np.abs(p - ref_p)):.3g}"
    return None


def _record_path(graph: Path) -> Path:
    """The record beside a kept graph: what it was built from, and its own sha256."""
    return graph.with_suffix(".json")


def _record(model: Model, dtype: type, onnx_bytes: bytes) -> dict:
    """What a kept graph's record must say for the graph to be used: its digest, its source and its compilers."""
    return {
        "graph_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "artifact_sha256": model.sha256,
        "dtype": np.dtype(dtype).name,
        "versions": {lib: version(lib) for lib in _COMPILER_LIBS},  # from package metadata, as in OnnxBackend
    }


def _kept_graph(model: Model, dtype: type) -> tuple[bytes | None, str, bool]:
    """The kept compiled graph if its record vouches for it; else (None, why it was not used ("" if never kept),
    whether its bytes were changed after it was recorded)."""
    path = _compiled_path(model, dtype)
    if not path.is_file():
        return None, "", False
    onnx_bytes = path.read_bytes()
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None, f"kept compiled model {path} has no readable record {_record_path(path).name}", False
    record, expected = record if isinstance(record, dict) else {}, _record(model, dtype, onnx_bytes)
    if differ := [key for key in expected if key != "graph_sha256" and record.get(key) != expected[key]]:
        # Stale (another artifact, precision or library version), not tampered: converting again is the fix.
        return None, f"kept compiled model {path} was built from something else (different {', '.join(differ)})", False
    if record.get("graph_sha256") != expected["graph_sha256"]:
        return None, f"kept compiled model {path} does not match its record (different graph_sha256)", True
    return onnx_bytes, "", False


def row_seconds(backend: Any, rows: np.ndarray) -> float:
    """What answering one row costs this backend: the best of 20 one-row calls after 3 warm-ups (CACHE_POLICY=auto
    weighs it against a Redis round trip)."""
    row, costs = rows[:1], []
    for i in range(23):
        start = time.perf_counter()
        backend.predict(row, proba=False)
        if i >= 3:
            costs.append(time.perf_counter() - start)
    return min(costs)


def _compile(model: Model, strict: bool) -> tuple[bytes | None, type | None, str, list[str], float]:
    """Reuse a kept conversion its record vouches for, or convert; verify against scikit-learn. Return (onnx
    bytes, input dtype, why not, notes for the log, one row's cost in seconds). strict (INFERENCE_BACKEND=onnx):
    a kept graph whose bytes changed after it was recorded stops here rather than being rebuilt; a stale or
    unrecorded one is rebuilt."""
    rows = sample_rows(model)
    reasons, notes = [], []
    for dtype in _dtypes(model):
        path = _compiled_path(model, dtype)
        try:
            onnx_bytes, stale, tampered = _kept_graph(model, dtype)
            if tampered and strict:
                return None, None, stale, notes, 0.0
            if stale:
                notes.append(f"{stale}; converting again")
            kept = onnx_bytes is not None
            onnx_bytes = onnx_bytes if kept else _convert(model, dtype)
            candidate = OnnxBackend(onnx_bytes, model, dtype)
            why = disagreement(model, candidate, rows)
        except Exception as e:  # noqa: BLE001 - skl2onnx/onnxruntime raise many kinds for unsupported models
            why = f"{type(e).__name__}: {_first_line(e)}"
        if why is None:
            if not kept:
                _keep(path, onnx_bytes)
                _keep(_record_path(path), json.dumps(_record(model, dtype, onnx_bytes), indent=2).encode())
            # Timed here: onnxruntime runs only in this child, never in the gunicorn master.
            return onnx_bytes, dtype, "", notes, row_seconds(candidate, rows)
        reasons.append(f"{np.dtype(dtype).name}: {why}")
    return None, None, "; ".join(reasons), notes, 0.0


def _first_line(e: BaseException) -> str:
    """An exception's message, cut to one line for a log or startup line."""
    return str(e).splitlines()[0] if str(e) else ""


class ChildFailed(Exception):
    """The conversion child timed out, crashed or raised; the message says which."""


def _in_child(fn: Any, timeout: float) -> Any:
    """Run fn in a forked child and return its result, so onnxruntime never loads in this process (see warm);
    raise ChildFailed if it takes longer than timeout seconds (the child is killed), raises or dies."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, send, and leave without running onnxruntime's exit-time destructors
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps((True, fn()))
            except BaseException as e:  # noqa: BLE001 - whatever went wrong, the parent must hear what it was
                payload = pickle.dumps((False, f"{type(e).__name__}: {_first_line(e)}"))
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while chunk := _read_before(read_end, deadline):
            chunks.append(chunk)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise ChildFailed(f"ONNX conversion took longer than COMPILE_TIMEOUT_SECONDS={timeout:g} s") from None
    finally:
        os.close(read_end)
        status = os.waitpid(pid, 0)[1]
    if not chunks:
        if os.WIFSIGNALED(status):
            raise ChildFailed(f"ONNX conversion process was killed by {signal.Signals(os.WTERMSIG(status)).name}")
        raise ChildFailed(f"ONNX conversion process exited with status {os.waitstatus_to_exitcode(status)}")
    # Our own child's pickle, read from a private pipe: no untrusted input is unpickled here.
    ok, value = pickle.loads(b"".join(chunks))  # noqa: S301
    if not ok:
        raise ChildFailed(f"ONNX conversion failed: {value}")
    return value


def _read_before(fd: int, deadline: float) -> bytes:
    """The next chunk from a pipe (b"" at its end), or TimeoutError once the deadline has passed."""
    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise TimeoutError
    return os.read(fd, 1 << 20)


def _keep(path: Path, data: bytes) -> None:
    """Keep a compiled file for the next start; a read-only model dir is not an error."""
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomically(path, data)
    except OSError as e:
        log.info("could not keep the compiled model at %s (%s); it will be converted again next start", path, e)


def choose_backend(model: Model, mode: str, timeout: float = 300.0) -> Any:
    """Pick the predictor for a model per INFERENCE_BACKEND (auto | sklearn | onnx); compiling gets timeout s. The
    backend's row_seconds says what one row costs it."""
    if mode == "sklearn":
        return _timed(SklearnBackend(model.estimator), model)
    for dtype in _dtypes(model):
        graph = _compiled_path(model, dtype)
        for path in (graph, _record_path(graph)):
            if path.is_file():  # checked here, before the child trusts it, as the artifact is
                refuse_world_writable(path, "compiled model file")
    try:
        onnx_bytes, dtype, why, notes, cost = _in_child(lambda: _compile(model, strict=mode == "onnx"), timeout)
    except ChildFailed as e:
        onnx_bytes, dtype, why, notes, cost = None, None, str(e), [], 0.0
    for note in notes:
        log.warning("model %s %s: %s", model.name, model.version, note)
    if onnx_bytes is not None:
        log.info("model %s %s: serving the compiled ONNX backend", model.name, model.version)
        backend = OnnxBackend(onnx_bytes, model, dtype)
        backend.row_seconds = cost
        return backend
    if mode == "onnx":
        raise ModelError(f"model file {model.path} cannot be served by INFERENCE_BACKEND=onnx: {why}")
    log.warning("model %s %s: ONNX not used (%s); serving with scikit-learn", model.name, model.version, why)
    return _timed(SklearnBackend(model.estimator), model)


def _timed(backend: SklearnBackend, model: Model) -> SklearnBackend:
    """The backend with its row_seconds measured on the model's sample row (scikit-learn runs in the master)."""
    backend.row_seconds = row_seconds(backend, np.asarray([model.sample_row], dtype=np.float64))
    return backend
