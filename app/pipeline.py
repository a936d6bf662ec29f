"""(4) The one path every protocol calls: cache lookup -> predict the misses -> cache store."""

from dataclasses import dataclass
from time import perf_counter

import numpy as np
import orjson
from flask import current_app, g

from app.registry import Model


@dataclass
class Prediction:
    """What a protocol turns into its own response: per-row answers plus the cache outcome."""

    predictions: list
    probabilities: list[dict] | None
    cache: str  # HIT, MISS, PARTIAL, BYPASS or OFF
    hits: int


def predict(model: Model, X: np.ndarray, proba: bool, bypass_cache: bool = False) -> Prediction:
    """Answer every row of X in order, asking the model only for rows the cache doesn't hold."""
    cache = current_app.extensions["sibyl.cache"]
    t0 = perf_counter()
    # Answers depend on the artifact, the backend that computed them and what was asked.
    keys = (
        cache.keys(f"{model.sha256[:16]}:{model.backend.name}:{'p' if proba else 'l'}", X) if cache.usable() else None
    )
    stored = cache.get_many(keys) if keys and not bypass_cache else None
    t1 = perf_counter()

    if stored is None:
        rows = _compute(model, X, proba)
        missing = range(len(X))
        hits = 0
    else:
        rows = [_decode(v, proba) for v in stored]
        missing = [i for i, v in enumerate(rows) if v is None]
        for i, value in zip(missing, _compute(model, X[missing], proba) if missing else ()):
            rows[i] = value
        hits = len(X) - len(missing)
    t2 = perf_counter()

    if keys and missing:
        cache.set_many([(keys[i], orjson.dumps(rows[i])) for i in missing])
    t3 = perf_counter()

    if keys is None or (stored is None and not bypass_cache):
        outcome = "OFF"  # not configured, or Redis is down: served uncached
    elif bypass_cache:
        outcome = "BYPASS"
    else:
        outcome = "HIT" if not missing else "MISS" if not hits else "PARTIAL"
    g.log.update(rows=len(X), cache=outcome, cache_hits=hits, model=model.name, version=model.version)
    g.timings = {"cache_get": t1 - t0, "predict": t2 - t1, "cache_set": t3 - t2}

    if not proba:
        return Prediction(rows, None, outcome, hits)
    classes = model.class_keys
    return Prediction([r[0] for r in rows], [dict(zip(classes, r[1])) for r in rows], outcome, hits)


def _compute(model: Model, X: np.ndarray, proba: bool) -> list:
    """Per-row answers from the backend as plain JSON values: a label, or [label, [p, ...]]."""
    labels, p = model.backend.predict(X, proba)
    labels = labels.tolist()
    return labels if p is None else [list(pair) for pair in zip(labels, p.tolist())]


def _decode(raw: bytes | None, proba: bool) -> object:
    """A stored answer, or None (a miss) when absent or not in our format (e.g. another version's)."""
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if proba and not (type(value) is list and len(value) == 2 and type(value[1]) is list):
        return None
    return value
