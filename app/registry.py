"""(6) Models on disk: MODEL_DIR's <name>/<version>/ folders (or one MODEL_PATH), each artifact verified and loaded."""

import copy
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from app.artifacts import ModelError, check_sklearn_version, open_artifact, parse_trusted_types, save_artifact
from app.drift import check_reference, reference_stats
from app.errors import ApiError, StartupError

log = logging.getLogger(__name__)


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
    aliases: list[str] = field(default_factory=list)
    # Seconds to verify, unpickle and choose the backend (compiling included): what a restart costs for this model.
    load_seconds: float = 0.0
    # on | off | auto, from the manifest or CACHE_POLICY; decide_cache turns it into cache_tiers, which
    # pipeline.predict is the one place to read.
    cache_policy: str = "on"
    # "redis" (the worker's memory, then Redis), "local" (the worker's memory only) or "off".
    cache_tiers: str = "redis"
    # What CACHE_POLICY=auto weighed, in microseconds: one row's predict cost and one Redis round trip.
    cache_figures: dict = field(default_factory=dict)

    @cached_property
    def has_proba(self) -> bool:
        """Whether callers may ask for class probabilities."""
        return self.classes is not None and hasattr(self.estimator, "predict_proba")

    @cached_property
    def class_keys(self) -> list[str]:
        """Class labels as JSON object keys, for the {class: probability} maps."""
        return [str(c) for c in self.classes or ()]

    @cached_property
    def sample_row(self) -> list[float]:
        """The row /ready sends through the backend: the metadata's first sample row, or zeros."""
        shipped = self.metadata.get("sample_rows")
        return list(shipped[0]) if shipped else [0.0] * self.n_features

    def describe(self) -> dict:
        """The public description shown by GET /models (no filesystem paths: those are for admins)."""
        keys = ("sha256", "sklearn_version", "feature_names", "classes", "task", "created_at")
        return {
            "name": self.name,
            "version": self.version,
            "aliases": self.aliases,
            **{k: self.metadata.get(k) for k in keys},
            "n_features": self.n_features,
            "backend": self.backend.name if self.backend else None,
            "cache_policy": self.cache_policy,
            "cache": {"tiers": self.cache_tiers, **self.cache_figures},
            "load_seconds": round(self.load_seconds, 3),
            "sample_row": self.sample_row,
            # Whether "probabilities": true works (a classifier with predict_proba): the web page asks only then.
            "probabilities": self.has_proba,
            # Whether the metadata holds training reference statistics: without them, no drift metrics.
            "reference": bool(self.metadata.get("reference")),
        }


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
    reference: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> dict:
    """Dump an estimator and write its metadata beside it; return the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(estimator, path)
    return write_metadata(estimator, path, name, version, feature_names, sample_rows, reference)


def write_metadata(
    estimator: Any,
    path: Path,
    name: str,
    version: str,
    feature_names: list[str] | None = None,
    sample_rows: np.ndarray | None = None,
    reference: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> dict:
    """Check an estimator already dumped at path as startup would, then write its metadata (with the artifact's
    sha256) atomically, so a refused model never replaces a good metadata file. reference, (training rows, their
    targets or None), adds the statistics drift is measured against."""
    names, n_features = check_estimator(estimator, path, feature_names)
    classes, task = _classes_and_task(estimator)
    ref = None
    if reference is not None:
        rows, target = reference
        if np.ndim(rows) != 2 or np.shape(rows)[1] != n_features:
            raise ModelError(f"reference data must have {n_features} feature columns, as model file {path} takes")
        if target is not None and len(target) != len(rows):
            raise ModelError("reference data: the target column must have one value per row")
        try:
            ref = reference_stats(estimator, rows, target, names, classes)
        except ValueError as e:
            raise ModelError(f"reference data: {e}") from None
    meta = {
        "name": name,
        "version": version,
        "artifact": path.name,
        "sha256": file_sha256(path),
        "sklearn_version": sklearn.__version__,
        "feature_names": names,
        # Read without unpickling (the curl `make run` prints for a model with no names or sample rows).
        "n_features": n_features,
        "classes": classes,
        "task": task,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Rows the compiled backend is checked against at load time.
        "sample_rows": np.asarray(sample_rows, dtype=np.float64).tolist() if sample_rows is not None else None,
    }
    if ref is not None:
        # Per-feature quantile bins and the training predictions' distribution (app/drift.py measures PSI by them).
        meta["reference"] = ref
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


def read_object(path: Path, what: str, error: type[Exception], shape: str = "") -> dict:
    """A JSON file holding an object, or error naming what and the file: unreadable, not JSON, not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{what} {path} is unreadable: {e}") from None
    if type(value) is not dict:
        raise error(f"{what} {path} {shape or 'is not a JSON object'}")
    return value


def read_metadata(meta_file: Path) -> dict:
    """A version's model.json as a dict, or ModelError naming the file (unreadable, not JSON, not an object)."""
    return read_object(meta_file, "model metadata", ModelError)


def load_model(
    path: str | Path, expected_sha256: str = "", trusted_types: list[str] | None = None, strict_sklearn: bool = False
) -> Model:
    """Verify and load one artifact (.joblib, or .skops holding only trusted types); raise ModelError naming the
    file on any problem."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise ModelError(
            f"model file {path} does not exist (set MODEL_DIR or MODEL_PATH; `make model` builds the demo)"
        )
    if not meta_file.is_file():
        raise ModelError(f"model file {path} has no metadata file {meta_file.name} beside it (name, version, sha256)")
    meta = read_metadata(meta_file)
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
    # Before opening: a strict refusal needs only the metadata, and opening a pickle runs its code.
    check_sklearn_version(meta.get("sklearn_version"), path, strict_sklearn)
    estimator = open_artifact(path, trusted_types or [])
    names, n_features = check_estimator(estimator, path, meta.get("feature_names"))
    classes, task = _classes_and_task(estimator)
    if meta.get("reference") is not None and (why := check_reference(meta["reference"], n_features, classes)):
        raise ModelError(f"model metadata {meta_file}: {why} (register --reference rewrites it)")
    return Model(
        name=meta["name"],
        version=str(meta["version"]),
        sha256=actual,
        path=path,
        estimator=estimator,
        n_features=n_features,
        feature_names=names,
        classes=classes,
        task=task,
        metadata=meta,
    )


def _classes_and_task(estimator: Any) -> tuple[list | None, str]:
    """A fitted estimator's class labels as plain values (None for a regressor), and its task."""
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        return None, "regression"
    return np.asarray(classes).tolist(), "classification"


def _estimator_feature_names(estimator: Any) -> list[str] | None:
    """Feature names an estimator remembers from a DataFrame fit, if any."""
    names = getattr(estimator, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else None


# Name, version and alias names: one plain URL path segment, never "." or "..", so a name from a URL can only be
# looked up, and a folder name can always be shown and routed.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ARTIFACT = "model.joblib"
# A version folder holds one of these: a pickle, or a skops file that can hold only trusted types.
ARTIFACTS = (ARTIFACT, "model.skops")


def artifact_in(folder: Path) -> Path:
    """A version folder's artifact: model.skops if it holds one, else model.joblib (which may be missing)."""
    skops = folder / ARTIFACTS[1]
    return skops if skops.exists() or skops.is_symlink() else folder / ARTIFACT


MANIFEST = "manifest.json"
_MANIFEST_KEYS = ("default", "aliases", "traffic", "cache")
CACHE_POLICIES = ("on", "off", "auto")


def version_key(version: str) -> list[tuple[int, int | str]]:
    """Sort key that orders runs of digits as numbers: 10 after 9, 1.10 after 1.9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part]


@dataclass
class Entry:
    """One model name: its loaded versions, the version its default route answers, aliases and a canary split."""

    name: str
    versions: dict[str, Model]
    default: str
    aliases: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # version -> why it could not be loaded

    def describe(self) -> dict:
        """The public description shown by GET /models/<name>."""
        return {
            "name": self.name,
            "default_version": self.default,
            "aliases": self.aliases,
            "traffic": self.traffic,
            "versions": [self.versions[v].describe() for v in sorted(self.versions, key=version_key)],
            "unavailable": [
                {"version": v, "reason": self.unavailable[v]} for v in sorted(self.unavailable, key=version_key)
            ],
        }


@dataclass
class Registry:
    """Every model served, by name, all loaded at startup; resolve() picks the Model that answers a request."""

    entries: dict[str, Entry]
    default_model: str | None  # what POST /predict serves; None when several models and no DEFAULT_MODEL
    # Which load this is (1 at startup, +1 per rollout) and when it happened: GET /models shows both, so a caller
    # can tell whether a rollout took.
    generation: int = 1
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def entry(self, name: str) -> Entry:
        """A model by name, or a 404 listing the models served (the caller's name is never echoed)."""
        entry = self.entries.get(name)
        if entry is None:
            served = ", ".join(sorted(self.entries))
            raise ApiError(404, "model_not_found", f"No model of that name; this server serves: {served}.")
        return entry

    def resolve(self, name: str, version: str | None = None) -> Model:
        """The Model for a name and a version or alias; with neither, the default version or a traffic-split pick."""
        entry = self.entry(name)
        if version is None and entry.traffic:
            # A canary: each request to the default route draws a version by the manifest's weights (not a secret).
            version = random.choices(list(entry.traffic), list(entry.traffic.values()))[0]  # noqa: S311
        elif version is None:
            version = entry.default
        else:
            version = entry.aliases.get(version, version)
        if version in entry.versions:
            return entry.versions[version]
        if version in entry.unavailable:
            raise ApiError(
                503, "model_unavailable", f"Model {name} version {version} could not be loaded; GET /models says why."
            )
        versions = ", ".join(sorted([*entry.versions, *entry.unavailable], key=version_key))
        aliases = f"; aliases: {', '.join(sorted(entry.aliases))}" if entry.aliases else ""
        raise ApiError(404, "version_not_found", f"Model {name} has no such version; versions: {versions}{aliases}.")

    def loaded(self) -> list[Model]:
        """Every loaded Model, each version once (to warm backends after fork and to check readiness)."""
        return [model for entry in self.entries.values() for model in entry.versions.values()]

    def describe(self) -> list[dict]:
        """Every model's public description, for GET /models."""
        return [self.entries[name].describe() for name in sorted(self.entries)]


# A miss through Redis makes this many round trips (the lookup, then the store), a hit one: a row that costs more
# than a miss's round trips is worth asking Redis for once two thirds of rows hit, at the costs auto measures.
MISS_ROUND_TRIPS = 2


def decide_cache(models: list[Model], round_trip: Callable[[], float | None] | None) -> None:
    """Turn each model's cache policy into the tiers it uses. auto keeps Redis only where predicting a row costs
    more than a miss's round trips (MISS_ROUND_TRIPS): a compiled model that answers a row in about one round trip
    loses throughput to Redis on every miss and gains little on a hit (docs/benchmark.md, sixth pass); the worker's
    own memory is used for every policy but off. round_trip measures Redis once, and only if some model's policy
    is auto."""
    auto = [model for model in models if model.cache_policy == "auto"]
    trip = round_trip() if auto and round_trip else None
    for model in models:
        if model.cache_policy != "auto":
            model.cache_tiers = "off" if model.cache_policy == "off" else "redis"
            continue
        row = getattr(model.backend, "row_seconds", None)
        model.cache_figures = {"row_us": round(row * 1e6, 1) if row is not None else None}
        if trip is None or row is None:
            # Redis unreachable (or off) at startup: nothing to weigh; use it as `on` would, failing open.
            model.cache_tiers, why = "redis", "Redis round trip not measured (cache off or down)"
        else:
            model.cache_figures["redis_round_trip_us"] = round(trip * 1e6, 1)
            model.cache_tiers = "redis" if row > MISS_ROUND_TRIPS * trip else "local"
            trips = f"{MISS_ROUND_TRIPS} Redis round trips of {trip * 1e6:.0f} us each"
            why = f"one row costs {row * 1e6:.0f} us, a miss {trips}"
        log.info("model %s %s: CACHE_POLICY auto: %s: tiers %s", model.name, model.version, why, model.cache_tiers)


def load_registry(config: Mapping, round_trip: Callable[[], float | None] | None = None) -> Registry:
    """Load every model at startup: MODEL_PATH as a one-model registry when set, else MODEL_DIR's folders.

    Reads MODEL_PATH, MODEL_SHA256, MODEL_DIR, DEFAULT_MODEL, SKIP_BAD_MODELS, CACHE_POLICY, INFERENCE_BACKEND and
    COMPILE_TIMEOUT_SECONDS; raises StartupError (ModelError for an artifact) with one line on any problem."""
    # Imported here: backends builds on this module's Model.
    from app.backends import choose_backend

    trusted = parse_trusted_types(config["SKOPS_TRUSTED_TYPES"])

    def load(path: Path, folder: tuple[str, str] | None, cache_policy: str, sha256: str = "") -> Model:
        start = time.perf_counter()
        model = load_model(path, sha256, trusted, config["STRICT_SKLEARN_VERSION"])
        if folder and (model.name, model.version) != folder:
            raise ModelError(
                f"model file {path} is {model.name} version {model.version} by its metadata, but sits in folder "
                f"{folder[0]}/{folder[1]}; names must agree"
            )
        model.backend = choose_backend(model, config["INFERENCE_BACKEND"], config["COMPILE_TIMEOUT_SECONDS"])
        model.cache_policy = cache_policy
        model.load_seconds = time.perf_counter() - start
        return model

    wanted = config["DEFAULT_MODEL"]
    if config["MODEL_PATH"]:
        model = load(Path(config["MODEL_PATH"]), None, config["CACHE_POLICY"], config["MODEL_SHA256"])
        if wanted and wanted != model.name:
            raise StartupError(f"DEFAULT_MODEL={wanted!r} is not the model MODEL_PATH serves ({model.name})")
        decide_cache([model], round_trip)
        return Registry({model.name: Entry(model.name, {model.version: model}, model.version)}, model.name)
    if config["MODEL_SHA256"]:
        # A pin that silently pinned nothing would be worse than none.
        raise StartupError("MODEL_SHA256 pins the one artifact MODEL_PATH names; unset it to serve MODEL_DIR")
    root = Path(config["MODEL_DIR"])
    plans = scan_dir(root, config["CACHE_POLICY"])
    if wanted and wanted not in plans:
        raise StartupError(f"DEFAULT_MODEL={wanted!r} names no model in MODEL_DIR {root} ({', '.join(sorted(plans))})")
    default_model = wanted or (next(iter(plans)) if len(plans) == 1 else None)
    entries = {}
    for name, plan in plans.items():
        entry = entries[name] = Entry(name, {}, plan["default"], plan["aliases"], plan["traffic"])
        for version, folder in plan["versions"].items():
            try:
                artifact = artifact_in(folder)
                _refuse_outside(root, folder, artifact, metadata_path(artifact))
                model = entry.versions[version] = load(artifact, (name, version), plan["cache"])
            except ModelError as e:
                if not config["SKIP_BAD_MODELS"] or (name, version) == (default_model, plan["default"]):
                    raise
                log.error("model %s version %s is unavailable (SKIP_BAD_MODELS is set): %s", name, version, e)
                # Shown by GET /models: the folder as name/version, never where MODEL_DIR is on this server.
                entry.unavailable[version] = str(e).replace(str(folder), f"{name}/{version}")
                continue
            model.aliases = sorted(alias for alias, target in plan["aliases"].items() if target == version)
    registry = Registry(entries, default_model)
    decide_cache(registry.loaded(), round_trip)
    return registry


def scan_dir(root: Path, cache_default: str = "on") -> dict[str, dict]:
    """MODEL_DIR's models without opening an artifact: name -> {versions: {version: folder}, default, aliases,
    traffic, cache}, each manifest checked; StartupError with one line on a missing folder or a bad manifest."""
    if not root.is_dir():
        raise StartupError(
            f"model folder {root} does not exist (set MODEL_DIR or MODEL_PATH; `make model` builds the demo)"
        )
    plans = {}
    for folder in model_folders(root):
        versions = version_folders(folder)
        if not versions:
            raise StartupError(
                f"model folder {folder} has no version folders (<name>/<version>/model.joblib or model.skops)"
            )
        manifest = folder / MANIFEST
        _refuse_outside(root, manifest)
        plans[folder.name] = read_manifest(manifest, list(versions), cache_default) | {"versions": versions}
    if not plans:
        raise StartupError(
            f"model folder {root} holds no models (<name>/<version>/model.joblib or model.skops with its metadata; "
            "`make model` builds the demo)"
        )
    return plans


def model_folders(root: Path) -> list[Path]:
    """MODEL_DIR's model folders by name (bad names warned about)."""
    folders = []
    for folder in sorted(root.iterdir()):
        # Dot names are ours (.compiled, register's staging) or hidden; loose files (train_demo.py) and the bytecode
        # Python keeps beside them are not models.
        if folder.name.startswith(".") or folder.name == "__pycache__" or not folder.is_dir():
            continue
        if not NAME.fullmatch(folder.name):
            log.warning("skipping model folder %s: a name must match %s", folder, NAME.pattern)
            continue
        folders.append(folder)
    return folders


def version_folders(folder: Path) -> dict[str, Path]:
    """A model folder's version folders by name, in version order (dot names skipped, bad names warned about)."""
    versions = {}
    for sub in sorted(folder.iterdir(), key=lambda p: version_key(p.name)):
        if sub.name.startswith(".") or not sub.is_dir():
            continue
        if not NAME.fullmatch(sub.name):
            log.warning("skipping version folder %s: a version must match %s", sub, NAME.pattern)
            continue
        versions[sub.name] = sub
    return versions


def raw_manifest(path: Path) -> dict:
    """A model's manifest as written (absent: {}), or StartupError if it is not a readable JSON object."""
    if not path.exists():
        return {}
    shape = f"must be a JSON object with keys {', '.join(_MANIFEST_KEYS)}"
    return read_object(path, "manifest", StartupError, shape)


def read_manifest(path: Path, versions: list[str], cache_default: str = CACHE_POLICIES[0]) -> dict:
    """A model's manifest (absent: the defaults) checked against its version folders: {default, aliases, traffic,
    cache}; StartupError naming the file and the key."""
    return check_manifest(raw_manifest(path), path, versions, cache_default)


def write_manifest(path: Path, manifest: dict, versions: list[str]) -> dict:
    """Write a manifest atomically, after the checks startup makes, so the CLI never writes one startup refuses;
    return what the checks made of it."""
    checked = check_manifest(manifest, path, versions)
    write_atomically(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return checked


def check_manifest(manifest: dict, path: Path, versions: list[str], cache_default: str = CACHE_POLICIES[0]) -> dict:
    """A manifest's keys checked against the version folders: {default, aliases, traffic, cache}; StartupError
    naming the file and the key."""

    def bad(key: str, why: str) -> StartupError:
        return StartupError(f"manifest {path}: {key!r} {why} (versions: {', '.join(versions)})")

    if unknown := sorted(set(manifest) - set(_MANIFEST_KEYS)):
        raise bad(unknown[0], f"is not a manifest key; the keys are {', '.join(_MANIFEST_KEYS)}")
    default = manifest.get("default", max(versions, key=version_key))
    if default not in versions:
        raise bad("default", "must name a version folder")
    aliases = manifest.get("aliases", {})
    if type(aliases) is not dict:
        raise bad("aliases", 'must be an object of alias -> version, e.g. {"production": "2"}')
    for alias, target in aliases.items():
        if not NAME.fullmatch(alias) or alias in versions:
            raise bad("aliases", f"has alias {alias[:64]!r}, which is not a valid name or is also a version's name")
        if target not in versions:
            raise bad("aliases", f"maps {alias!r} to something that is not a version folder")
    traffic = manifest.get("traffic", {})
    if type(traffic) is not dict or any(type(w) is not int or w < 0 for w in traffic.values()):
        raise bad("traffic", 'must be an object of version -> whole-number weight >= 0, e.g. {"2": 90, "3": 10}')
    if any(v not in versions for v in traffic):
        raise bad("traffic", "must name only version folders")
    if traffic and not sum(traffic.values()):
        raise bad("traffic", "weights must sum to more than 0")
    cache = manifest.get("cache", cache_default)
    if cache not in CACHE_POLICIES:
        raise bad("cache", f"must be one of {', '.join(CACHE_POLICIES)}")
    return {"default": default, "aliases": aliases, "traffic": traffic, "cache": cache}


def _refuse_outside(root: Path, *paths: Path) -> None:
    """ModelError if any path that exists resolves outside root (a symlink out of MODEL_DIR)."""
    top = root.resolve()
    for path in paths:
        if path.exists() and not path.resolve().is_relative_to(top):
            raise ModelError(f"{path} is a link that leads outside MODEL_DIR {root}; refusing to load it")
