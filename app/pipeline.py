"""(4) The one path every protocol calls: cache lookup -> predict the misses -> cache store. No Flask in here."""

from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from app.cache import PredictionCache
from app.errors import ApiError
from app.registry import Model


@dataclass
class Prediction:
    """What happened, for the caller to render and log: per-row answers, the cache outcome, timings, the model."""

    predictions: list
    probabilities: list[dict] | None
    cache: str  # HIT, MISS, PARTIAL, BYPASS or OFF
    hits: int
    timings: dict[str, float]  # seconds spent in each step: cache_get, predict, cache_set
    model: Model  # the version that answered (under a traffic split, the one drawn)
    redis_failed: bool = False  # Redis was asked and could not answer (down, or its breaker open)


def predict(
    model: Model,
    X: np.ndarray,
    proba: bool,
    cache: PredictionCache,
    *,
    lookup: bool = True,
    store: bool = True,
    user: str | None = None,
) -> Prediction:
    """Answer every row of X in order, asking the model only for rows the cache doesn't hold.

    lookup=False (Cache-Control: no-cache) predicts every row; store=False (no-store) keeps nothing, in Redis or in
    this worker; user, the caller, scopes the keys when CACHE_SCOPE=user.
    """
    t0 = perf_counter()
    # The model's cache tiers are read here and nowhere else: off, local (this worker's memory), redis (then Redis).
    tiers = model.cache_tiers
    shared = tiers == "redis"
    keys, stored, failed = None, None, False
    if tiers != "off" and cache.enabled:
        # Answers depend on the artifact, the backend that computed them (its precision and library versions) and
        # what was asked.
        scope = f"{model.sha256[:16]}:{model.backend.scope}:{'p' if proba else 'l'}"
        # This worker's tier, for small requests while it pays (cache.worker_tier); without it, a model on local
        # tiers has no cache for this request.
        tier = cache.worker_tier(scope, len(X), shared)
        if shared or tier is not None:
            keys = cache.keys(scope, X, user)
            valid = _valid_proba if proba else _valid_label
            # A bypass predicts every row, as a cache that holds nothing would (its outcome is BYPASS regardless).
            if lookup:
                stored, answered = cache.lookup(keys, valid, store, shared, tier)
                failed = not answered  # only Redis can fail to answer
    t1 = perf_counter()

    if stored is None:
        missing = range(len(X))
        rows = _compute(model, X, proba, missing)
    else:
        rows = stored
        missing = [i for i, v in enumerate(rows) if v is None]
        # X itself when no row was found: indexing copies (2.5 us for one row).
        rest = X if len(missing) == len(X) else X[missing]
        for i, value in zip(missing, _compute(model, rest, proba, missing) if missing else ()):
            rows[i] = value
    hits = len(X) - len(missing)
    t2 = perf_counter()

    if keys and missing and store:
        cache.store([(keys[i], rows[i]) for i in missing], shared, tier)
    t3 = perf_counter()

    if not lookup and keys:
        outcome = "BYPASS"
    elif keys and not missing:
        outcome = "HIT"
    elif not hits and (keys is None or failed):
        outcome = "OFF"  # not configured, off for this model, or Redis is unavailable and this worker held none
    else:
        outcome = "PARTIAL" if hits else "MISS"
    timings = {"cache_get": t1 - t0, "predict": t2 - t1, "cache_set": t3 - t2}

    if not proba:
        return Prediction(rows, None, outcome, hits, timings, model, failed)
    classes = model.class_keys
    probabilities = [dict(zip(classes, r[1])) for r in rows]
    return Prediction([r[0] for r in rows], probabilities, outcome, hits, timings, model, failed)


def _compute(model: Model, X: np.ndarray, proba: bool, where: Sequence[int]) -> list:
    """Per-row answers from the backend as plain JSON values: a label, or [label, [p, ...]]; where[i] is row i's
    place in the request, for the message when a model's answer is not a number."""
    labels, p = model.backend.predict(X, proba)
    # Finite inputs can still overflow inside a model (a scaler dividing 1e308, exp() of a huge score): the answer
    # is NaN or infinity, which JSON cannot carry (it would reach the caller as null) and no cache should keep.
    # 422, not 400: the rows are well-formed and fit the model's schema; only computing them failed.
    for answer in (labels, p):
        if answer is not None and answer.dtype.kind == "f" and not np.isfinite(answer).all():
            row = where[int(np.argwhere(~np.isfinite(answer))[0][0])]
            raise ApiError(
                422,
                "non_finite_answer",
                f"row {row}: the model's answer is not a finite number; its values are too far outside the range "
                "the model was trained on",
            )
    labels = labels.tolist()
    return labels if p is None else [list(pair) for pair in zip(labels, p.tolist())]


def _valid_label(value: object) -> bool:
    """A stored label: any JSON scalar."""
    return not isinstance(value, list | dict)


def _valid_proba(value: object) -> bool:
    """A stored [label, [p, ...]] pair."""
    return type(value) is list and len(value) == 2 and type(value[1]) is list
