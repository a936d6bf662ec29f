"""(6) Models on disk: metadata beside each artifact, sha256 verified before the pickle is opened."""

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

from app.errors import StartupError

log = logging.getLogger(__name__)


class ModelError(StartupError):
    """The model cannot be served; startup stops with this one-line message."""


@dataclass
class Model:
    """A loaded estimator with the metadata the request path needs."""

    name: str
    version: str
    sha256: str
    path: Path
    estimator: Any
    n_features: int
    feature_names: list[str] | None
    classes: list | None
    task: str
    metadata: dict = field(default_factory=dict)
    backend: Any = None

    @cached_property
    def has_proba(self) -> bool:
        """Whether callers may ask for class probabilities."""
        return self.classes is not None and hasattr(self.estimator, "predict_proba")

    @cached_property
    def class_keys(self) -> list[str]:
        """Class labels as JSON object keys, for the {class: probability} maps."""
        return [str(c) for c in self.classes or ()]

    def describe(self) -> dict:
        """The public description shown by GET /models (no paths, nothing secret)."""
        keys = ("name", "version", "sha256", "sklearn_version", "feature_names", "classes", "task", "created_at")
        info = {k: self.metadata.get(k) for k in keys}
        info["n_features"] = self.n_features
        info["backend"] = self.backend.name if self.backend else None
        return info


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large forests don't double in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path(artifact: Path) -> Path:
    """Where an artifact's metadata lives: same name, .json."""
    return artifact.with_suffix(".json")


def save_model(
    estimator: Any,
    path: str | Path,
    name: str,
    version: str,
    feature_names: list[str] | None = None,
    sample_rows: np.ndarray | None = None,
) -> dict:
    """Dump an estimator and write its metadata beside it; return the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, path)
    return write_metadata(estimator, path, name, version, feature_names, sample_rows)


def write_metadata(
    estimator: Any,
    path: Path,
    name: str,
    version: str,
    feature_names: list[str] | None = None,
    sample_rows: np.ndarray | None = None,
) -> dict:
    """Check an estimator already dumped at path as startup would, then write its metadata (with the artifact's
    sha256) atomically, so a refused model never replaces a good metadata file."""
    names, _ = check_estimator(estimator, path, feature_names)
    classes = getattr(estimator, "classes_", None)
    meta = {
        "name": name,
        "version": version,
        "artifact": path.name,
        "sha256": file_sha256(path),
        "sklearn_version": sklearn.__version__,
        "feature_names": names,
        # Read without unpickling (the curl `make run` prints for a model with no names or sample rows).
        "n_features": int(estimator.n_features_in_),
        "classes": np.asarray(classes).tolist() if classes is not None else None,
        "task": "classification" if classes is not None else "regression",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Rows the compiled backend is checked against at load time.
        "sample_rows": np.asarray(sample_rows, dtype=np.float64).tolist() if sample_rows is not None else None,
    }
    write_atomically(metadata_path(path), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a temp file and os.replace, so a reader never sees half a file and a failure leaves the old one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_world_writable(path: Path, what: str = "model file") -> None:
    """Raise ModelError if anyone could replace the file at path."""
    if os.stat(path).st_mode & 0o002:
        raise ModelError(f"{what} {path} is world-writable; refusing to use a file anyone could replace")


def open_artifact(path: Path) -> Any:
    """Unpickle an artifact (never a world-writable one); raise ModelError naming the file if it can't be read."""
    refuse_world_writable(path)
    try:
        return joblib.load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the operator
        raise ModelError(f"model file {path} could not be loaded: {type(e).__name__}: {e}") from None


def check_estimator(estimator: Any, path: Path, feature_names: list[str] | None) -> tuple[list[str] | None, int]:
    """The checks `register` and startup share; return the feature names to serve and the feature count."""
    if not hasattr(estimator, "predict") or not hasattr(estimator, "n_features_in_"):
        raise ModelError(f"model file {path} does not hold a fitted scikit-learn estimator")
    n_features = int(estimator.n_features_in_)
    fitted = _estimator_feature_names(estimator)
    # Named rows are ordered by these names, so names the estimator wasn't fitted with would permute columns.
    if feature_names is not None and fitted is not None and list(feature_names) != fitted:
        raise ModelError(
            f"model file {path} was fitted on features [{', '.join(fitted)}] but is described as "
            f"[{', '.join(feature_names)}]; names and order must match (omit --features to use the fitted ones)"
        )
    names = list(feature_names) if feature_names is not None else fitted
    if names is not None and len(names) != n_features:
        raise ModelError(f"model file {path} takes {n_features} features, but {len(names)} feature names are given")
    outputs = _outputs_per_row(estimator, n_features)
    if outputs != 1:
        raise ModelError(
            f"model file {path} predicts {outputs} outputs per row; Sibyl serves single-output estimators only"
        )
    return names, n_features


def without_feature_names(estimator: Any) -> Any:
    """A shallow copy that skips scikit-learn's per-call feature-name check: rows reaching it are already ordered
    by the validated names, and the check would warn "X does not have valid feature names" on every call."""
    if not hasattr(estimator, "__dict__"):  # "passthrough" and other placeholders in pipelines
        return estimator
    estimator = copy.copy(estimator)
    estimator.__dict__.pop("feature_names_in_", None)
    if hasattr(estimator, "steps"):
        estimator.steps = [(name, without_feature_names(step)) for name, step in estimator.steps]
    return estimator


def final_estimator(estimator: Any) -> Any:
    """The last step of (possibly nested) pipelines."""
    while hasattr(estimator, "steps"):
        estimator = estimator.steps[-1][1]
    return estimator


def _outputs_per_row(estimator: Any, n_features: int) -> int:
    """How many values the estimator answers per row: what it declares, or what it answers for a row of zeros."""
    declared = getattr(final_estimator(estimator), "n_outputs_", 1)
    try:
        with sklearn.config_context(assume_finite=True):
            y = np.asarray(without_feature_names(estimator).predict(np.zeros((1, n_features))))
    except Exception:  # noqa: BLE001 - a model that can't answer zeros is judged by what it declares
        return declared
    return max(declared, y.shape[1] if y.ndim == 2 else 1)


def load_model(path: str | Path, expected_sha256: str = "") -> Model:
    """Verify and load one artifact; raise ModelError naming the file on any problem."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist (set MODEL_PATH, or run `make model` for the demo)")
    if not meta_file.is_file():
        raise ModelError(f"model file {path} has no metadata file {meta_file.name} beside it (name, version, sha256)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model metadata {meta_file} is unreadable: {e}") from None
    for key in ("name", "version", "sha256"):
        if not meta.get(key):
            raise ModelError(f"model metadata {meta_file} has no {key!r}")
    actual = file_sha256(path)
    if actual != meta["sha256"]:
        raise ModelError(
            f"model file {path} has sha256 {actual}, but its metadata says {meta['sha256']}; not loading it"
        )
    if expected_sha256 and actual != expected_sha256.lower():
        raise ModelError(f"model file {path} has sha256 {actual}, but MODEL_SHA256 pins {expected_sha256}")
    estimator = open_artifact(path)
    if meta.get("sklearn_version") not in (None, sklearn.__version__):
        log.warning(
            "model %s was written with scikit-learn %s but %s is installed; retrain if predictions look wrong",
            path,
            meta["sklearn_version"],
            sklearn.__version__,
        )
    names, n_features = check_estimator(estimator, path, meta.get("feature_names"))
    classes = getattr(estimator, "classes_", None)
    return Model(
        name=meta["name"],
        version=str(meta["version"]),
        sha256=actual,
        path=path,
        estimator=estimator,
        n_features=n_features,
        feature_names=names,
        classes=np.asarray(classes).tolist() if classes is not None else None,
        task="classification" if classes is not None else "regression",
        metadata=meta,
    )


def _estimator_feature_names(estimator: Any) -> list[str] | None:
    """Feature names an estimator remembers from a DataFrame fit, if any."""
    names = getattr(estimator, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else None
