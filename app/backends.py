"""(7) Predictors behind one interface: scikit-learn itself, or the same model compiled to ONNX."""

import hashlib
import logging
import os
import pickle
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from threadpoolctl import threadpool_limits

from app.registry import Model, ModelError

log = logging.getLogger(__name__)

# Compiled and scikit-learn outputs must agree this closely on the sample rows before we switch.
PROBA_ATOL = 1e-5
_TREE_MODULES = ("sklearn.ensemble", "sklearn.tree")

# Validation already guarantees finite float64 rows; a DataFrame-fitted model would warn on every call.
warnings.filterwarnings("ignore", message="X does not have valid feature names")
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
        self.estimator = estimator
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
        libs = (f"{lib} {version(lib)}" for lib in ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy"))
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
        self._pid = os.getpid()

    def predict(self, X: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Same contract as SklearnBackend.predict."""
        if self._pid != os.getpid():
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
            top2 = np.partition(p, -2, axis=1)[:, -2:]
            unsure = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * PROBA_ATOL)
            if unsure.size:
                labels[unsure], p[unsure] = self.reference.predict(X[unsure], proba=True)
        return labels, (p if proba else None)


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
    final = _final_estimator(model.estimator)
    # ZipMap (a list of dicts per row) is slow and pointless: we build our own maps.
    options = {id(final): {"zipmap": False}} if model.classes is not None else None
    onx = convert_sklearn(model.estimator, initial_types=[("X", tensor([None, model.n_features]))], options=options)
    return onx.SerializeToString()


def _final_estimator(est: Any) -> Any:
    """The last step of (possibly nested) pipelines."""
    while hasattr(est, "steps"):
        est = est.steps[-1][1]
    return est


def _dtypes(model: Model) -> list[type]:
    """Input precisions to try: tree classifiers compare in float32 inside scikit-learn, so match them;
    everything else keeps float64 so values come back as scikit-learn computes them."""
    module = type(_final_estimator(model.estimator)).__module__
    if model.classes is not None and module.startswith(_TREE_MODULES):
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
        if not np.allclose(labels, ref_labels, rtol=1e-5, atol=PROBA_ATOL):
            return f"predictions differ by up to {np.max(np.abs(labels - ref_labels)):.3g}"
        return None
    if not np.array_equal(labels, ref_labels):
        return f"labels differ on {int(np.sum(labels != ref_labels))} of {len(rows)} sample rows"
    if ref_p is not None and not np.allclose(p, ref_p, rtol=0, atol=PROBA_ATOL):
        return f"probabilities differ by up to {np.max(np.abs(p - ref_p)):.3g}"
    return None


def _compile(model: Model) -> tuple[bytes | None, type | None, str]:
    """Convert (or reuse a kept conversion) and verify; return (onnx bytes, input dtype, why not)."""
    rows = sample_rows(model)
    reasons = []
    for dtype in _dtypes(model):
        cached = _compiled_path(model, dtype)
        try:
            onnx_bytes = cached.read_bytes() if cached.is_file() else _convert(model, dtype)
            why = disagreement(model, OnnxBackend(onnx_bytes, model, dtype), rows)
        except Exception as e:  # noqa: BLE001 - skl2onnx/onnxruntime raise many kinds for unsupported models
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why is None:
            if not cached.is_file():
                _write_atomically(cached, onnx_bytes)
            return onnx_bytes, dtype, ""
        reasons.append(f"{np.dtype(dtype).name}: {why}")
    return None, None, "; ".join(reasons)


def _in_child(fn: Any) -> Any:
    """Run fn in a forked child and return its result, so onnxruntime never loads in this process (see warm)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compute, send, and leave without running onnxruntime's exit-time destructors
        os.close(read_end)
        try:
            with os.fdopen(write_end, "wb") as out:
                out.write(pickle.dumps(fn()))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    # Our own child's pickle, read from a private pipe: no untrusted input is unpickled here.
    return pickle.loads(data) if data else (None, None, "conversion process died")  # noqa: S301


def _write_atomically(path: Path, data: bytes) -> None:
    """Write so that a concurrent reader never sees half a file; a read-only model dir is not an error."""
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        log.info("could not keep the compiled model at %s (%s); it will be converted again next start", path, e)


def choose_backend(model: Model, mode: str) -> Any:
    """Pick the predictor for a model per INFERENCE_BACKEND (auto | sklearn | onnx)."""
    if mode not in {"auto", "sklearn", "onnx"}:
        raise ModelError(f"INFERENCE_BACKEND must be auto, sklearn or onnx, not {mode!r}")
    if mode == "sklearn":
        return SklearnBackend(model.estimator)
    onnx_bytes, dtype, why = _in_child(lambda: _compile(model))
    if onnx_bytes is not None:
        log.info("model %s %s: serving the compiled ONNX backend", model.name, model.version)
        return OnnxBackend(onnx_bytes, model, dtype)
    if mode == "onnx":
        raise ModelError(f"model file {model.path} cannot be served by INFERENCE_BACKEND=onnx: {why}")
    log.warning("model %s %s: ONNX not used (%s); serving with scikit-learn", model.name, model.version, why)
    return SklearnBackend(model.estimator)
