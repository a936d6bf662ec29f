"""(6) Models on disk: metadata beside each artifact, sha256 verified before the pickle is opened."""

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
    """Write the metadata file (with the artifact's sha256) for an estimator already dumped at path."""
    classes = getattr(estimator, "classes_", None)
    meta = {
        "name": name,
        "version": version,
        "artifact": path.name,
        "sha256": file_sha256(path),
        "sklearn_version": sklearn.__version__,
        "feature_names": list(feature_names) if feature_names is not None else _estimator_feature_names(estimator),
        "classes": np.asarray(classes).tolist() if classes is not None else None,
        "task": "classification" if classes is not None else "regression",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Rows the compiled backend is checked against at load time.
        "sample_rows": np.asarray(sample_rows, dtype=np.float64).tolist() if sample_rows is not None else None,
    }
    metadata_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_model(path: str | Path, expected_sha256: str = "") -> Model:
    """Verify and load one artifact; raise ModelError naming the file on any problem."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist (set MODEL_PATH, or run `make model` for the demo)")
    if not meta_file.is_file():
        raise ModelError(f"model file {path} has no metadata file {meta_file.name} beside it (name, version, sha256)")
    if os.stat(path).st_mode & 0o002:
        raise ModelError(f"model file {path} is world-writable; refusing to unpickle a file anyone could replace")
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
    try:
        estimator = joblib.load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the operator
        raise ModelError(f"model file {path} could not be loaded: {type(e).__name__}: {e}") from None
    if not hasattr(estimator, "predict") or not hasattr(estimator, "n_features_in_"):
        raise ModelError(f"model file {path} does not hold a fitted scikit-learn estimator")
    if meta.get("sklearn_version") not in (None, sklearn.__version__):
        log.warning(
            "model %s was written with scikit-learn %s but %s is installed; retrain if predictions look wrong",
            path,
            meta["sklearn_version"],
            sklearn.__version__,
        )
    names = meta.get("feature_names") or _estimator_feature_names(estimator)
    n_features = int(estimator.n_features_in_)
    if names is not None and len(names) != n_features:
        raise ModelError(f"model metadata {meta_file} lists {len(names)} feature names; the model takes {n_features}")
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
