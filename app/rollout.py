"""(6) Rollout: load MODEL_DIR again and swap the new registry in, whole or not at all; say what changed or why not."""

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from flask import Flask

from app.audit import audit
from app.errors import StartupError
from app.registry import Registry, load_registry, version_key

log = logging.getLogger(__name__)
ACTION = "admin.rollout"


def reload_registry(app: Flask) -> tuple[bool, str]:
    """Load the registry as startup does; swap it in only if it loads completely; (ok, what changed or why not)."""
    # Called by gunicorn's on_reload hook in the master, before it forks the new workers: they inherit the swap.
    old = app.extensions["sibyl.registry"]
    try:
        new = load_registry(app.config, app.extensions["sibyl.cache"].round_trip)
    except Exception as e:
        # Any exception, not just StartupError (ModelError among them): one escaping on_reload would stop
        # gunicorn's master, and every worker with it.
        if not isinstance(e, StartupError):  # a bug, not a refusal: keep its trace
            log.exception("rollout failed unexpectedly")
        reason = public_reason(str(e), app.config)
        log.error("rollout refused, still serving generation %d: %s", old.generation, e)
        audit(ACTION, "refused", reason, step="load", generation=old.generation)
        return False, reason
    new.generation = old.generation + 1
    app.extensions["sibyl.registry"] = new
    app.extensions["sibyl.metrics"].models_served(new, retired=old)
    changed = changes(old, new)
    audit(ACTION, "ok", step="load", generation=new.generation, loaded_at=new.loaded_at, models=changed)
    return True, f"generation {new.generation}: {summary(changed)}"


def check(config: Mapping) -> str | None:
    """Why the models on disk would not load now (a reason without server paths), or None if they would."""
    # The master's own loader, minus compiling (scikit-learn backends): the same verdict on metadata, checksums,
    # manifests, unpickling and estimator checks, so a 409 here is what the master would refuse. Its cost is one
    # unpickle per artifact in this worker, measured: 55 ms (15 MB peak) for a 7.7 MB forest, against 7 ms for
    # manifests and checksums alone. An admin call is rare, and on success the rollout retires the worker that paid.
    try:
        load_registry({**config, "INFERENCE_BACKEND": "sklearn"})
    except StartupError as e:
        return public_reason(str(e), config)
    return None


def changes(old: Registry, new: Registry) -> dict[str, dict]:
    """Per changed model: default, aliases, traffic as [before, after]; versions added, removed, replaced."""
    # "replaced": the same version folder holding another artifact (sha256), which a rollout also serves.
    out = {}
    for name in sorted(old.entries.keys() | new.entries.keys()):
        before, after = old.entries.get(name), new.entries.get(name)
        changed = {}
        for key in ("default", "aliases", "traffic"):
            pair = [getattr(before, key, None), getattr(after, key, None)]
            if pair[0] != pair[1]:
                changed[key] = pair
        was = {v: m.sha256 for v, m in before.versions.items()} if before else {}
        now = {v: m.sha256 for v, m in after.versions.items()} if after else {}
        for key, versions in (
            ("added", now.keys() - was.keys()),
            ("removed", was.keys() - now.keys()),
            ("replaced", {v for v in was.keys() & now.keys() if was[v] != now[v]}),
        ):
            if versions:
                changed[key] = sorted(versions, key=version_key)
        if changed:
            out[name] = changed
    return out


def summary(changed: dict[str, dict]) -> str:
    """changes() in a few words: "tiny default 1 -> 2, added 2"."""
    parts = []
    for name, change in changed.items():
        words = [f"default {change['default'][0]} -> {change['default'][1]}"] if "default" in change else []
        words += [f"{key} changed" for key in ("aliases", "traffic") if key in change]
        words += [f"{key} {', '.join(change[key])}" for key in ("added", "removed", "replaced") if key in change]
        parts.append(f"{name} {', '.join(words)}")
    return "; ".join(parts) or "nothing changed"


def public_reason(message: str, config: Mapping) -> str:
    """A refusal's reason without this server's paths: files named relative to MODEL_DIR (or MODEL_PATH's folder)."""
    root = str(Path(config["MODEL_PATH"]).parent if config["MODEL_PATH"] else Path(config["MODEL_DIR"]))
    if root != ".":
        message = message.replace(root + os.sep, "")
    if os.path.isabs(root):  # a bare relative name ("models") may also be a plain word of the message
        message = re.sub(re.escape(root) + r"(?=[\s;,)]|$)", "MODEL_DIR", message)
    return message
