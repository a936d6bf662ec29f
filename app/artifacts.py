"""(6) Opening an artifact: joblib (a pickle, which runs code when loaded) or skops (only trusted types)."""

import logging
import os
from pathlib import Path
from typing import Any

import joblib
import sklearn

from app.errors import StartupError

log = logging.getLogger(__name__)

# Untrusted type names shown in a refusal: enough to act on, short enough for one log line.
SHOWN_TYPES = 5
SHOWN_NAME_CHARS = 120


class ModelError(StartupError):
    """The model cannot be served; startup stops with this one-line message."""


def parse_trusted_types(setting: str) -> list[str]:
    """SKOPS_TRUSTED_TYPES as a list: comma-separated type names, blanks and surrounding spaces dropped."""
    return [name.strip() for name in setting.split(",") if name.strip()]


def refuse_world_writable(path: Path, what: str = "model file") -> None:
    """Raise ModelError if anyone could replace the file at path."""
    if os.stat(path).st_mode & 0o002:
        raise ModelError(f"{what} {path} is world-writable; refusing to use a file anyone could replace")


def artifact_kind(path: Path) -> str:
    """An artifact's format from its name, ".joblib" or ".skops"; ModelError for anything else (only those open)."""
    kind = path.suffix.lower()
    if kind not in (".joblib", ".skops"):
        raise ModelError(
            f"model file {path} is neither .skops nor .joblib; Sibyl opens only those (skops is the safer format)"
        )
    return kind


def save_artifact(estimator: Any, path: Path) -> None:
    """Write an estimator in the format its file name says: .skops or .joblib."""
    if artifact_kind(path) == ".skops":
        import skops.io  # imported here, as in open_artifact

        skops.io.dump(estimator, path)
    else:
        joblib.dump(estimator, path)


def open_artifact(path: Path, trusted_types: list[str]) -> Any:
    """Load a .joblib or .skops artifact (never a world-writable one); raise ModelError naming the file if it
    can't be read, or if a .skops file holds a type that is neither skops's default nor in trusted_types."""
    kind = artifact_kind(path)
    refuse_world_writable(path)
    try:
        if kind == ".joblib":
            return joblib.load(path)
        # Imported here: skops imports every scikit-learn estimator to list its trusted types (2 s, 30 MB measured),
        # a cost a .joblib model or a `curl` command should not pay.
        import skops.io

        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as e:  # noqa: BLE001 - any unpickling or unzipping failure means the same thing to the operator
        raise ModelError(f"model file {path} could not be loaded: {_one_line(e)}") from None
    refused = sorted(set(untrusted) - set(trusted_types))
    if refused:
        raise ModelError(_refusal(path, refused, trusted_types))
    try:
        # Only the configured names, never get_untrusted_types' own answer: that would trust whatever the file holds.
        return skops.io.load(path, trusted=list(trusted_types))
    except Exception as e:  # noqa: BLE001 - as above
        raise ModelError(f"model file {path} could not be loaded: {_one_line(e)}") from None


def check_sklearn_version(meta_version: str | None, path: Path, strict: bool) -> None:
    """Warn (or, when strict, raise ModelError) if the metadata's scikit-learn version is not the installed one."""
    installed = sklearn.__version__
    if meta_version in (None, installed):  # metadata from before the version was recorded has nothing to compare
        return
    if strict:
        raise ModelError(
            f"model file {path} was written with scikit-learn {meta_version} but {installed} is installed; "
            f"STRICT_SKLEARN_VERSION=true refuses it (retrain and register it with {installed}, or unset the setting)"
        )
    log.warning(
        "model %s was written with scikit-learn %s but %s is installed; retrain if predictions look wrong",
        path,
        meta_version,
        installed,
    )


def _refusal(path: Path, refused: list[str], trusted_types: list[str]) -> str:
    """One line naming the refused types (a crafted file may hold long or unprintable names) and the setting."""
    shown = [_printable(name) for name in refused[:SHOWN_TYPES]]
    more = f" and {len(refused) - SHOWN_TYPES} more" if len(refused) > SHOWN_TYPES else ""
    if more:  # the full list would not fit a line; skops lists it for whoever reviews the file
        how = "list the ones you trust in SKOPS_TRUSTED_TYPES (skops.io.get_untrusted_types(file=...) lists all)"
    else:
        how = f"set SKOPS_TRUSTED_TYPES={','.join([*map(_printable, trusted_types), *shown])}"
    return (
        f"model file {path} holds types skops does not trust by default: {', '.join(shown)}{more}; "
        f"loading an unreviewed type can run code or crash the worker, so if you trust this file's source, {how}"
    )


def _printable(name: str) -> str:
    """A type name safe for one log line: unprintable characters replaced, cut to SHOWN_NAME_CHARS."""
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= SHOWN_NAME_CHARS else name[: SHOWN_NAME_CHARS - 3] + "..."


def _one_line(e: Exception) -> str:
    """An exception as 'Type: message' on one line (skops's messages span paragraphs)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
