"""POST /feedback: true labels or values joined to a request's kept predictions by request id, and accuracy (or
MAE/RMSE) over each model version's last FEEDBACK_WINDOW joined rows, kept in Redis so every worker agrees."""

import hashlib
import math
import re

import orjson
from flask import Blueprint, Response, current_app, g
from prometheus_client import Counter, Gauge

from app import errors
from app.auth import auth, user_roles
from app.cache import PredictionCache
from app.errors import ApiError, StartupError
from app.openapi import json_answer, json_body
from app.protocols import json_response, max_rows, read_json, registry
from app.registry import Model, Registry
from app.request_log import REQUEST_ID

bp = Blueprint("feedback", __name__)
errors.register_handlers(bp)

# Set by whichever worker joined feedback last, from the shared Redis window: every worker's value is the same
# computation of the same list, so the most recent one is the truth ("mostrecent" under gunicorn's multiprocess
# mode).
ACCURACY = Gauge(
    "sibyl_accuracy",
    "Share of correct predictions over the version's last FEEDBACK_WINDOW feedback rows (classifiers)",
    ["model", "version"],
    multiprocess_mode="mostrecent",
)
MAE = Gauge(
    "sibyl_regression_mae",
    "Mean absolute error over the version's last FEEDBACK_WINDOW feedback rows (regressors)",
    ["model", "version"],
    multiprocess_mode="mostrecent",
)
RMSE = Gauge(
    "sibyl_regression_rmse",
    "Root mean squared error over the version's last FEEDBACK_WINDOW feedback rows (regressors)",
    ["model", "version"],
    multiprocess_mode="mostrecent",
)
ROWS = Counter("sibyl_feedback_rows", "Feedback rows joined to kept predictions", ["model", "version"])
REQUESTS = Counter(
    "sibyl_feedback_requests",
    "POST /feedback requests by outcome: joined, unknown, expired, mismatch, invalid",
    ["outcome"],
)

# A request's tombstone outlives its predictions by this long, so late feedback hears "expired" (410), not
# "unknown" (404), for a day after FEEDBACK_TTL.
TOMBSTONE_SECONDS = 86400
_JOINED = b"joined"
# A request id as the documented schema's pattern reads it: JSON Schema searches, and "$" also matches before a
# final newline, so what the schema allows is never a 400 here (such an id was never answered: 404).
_ID = re.compile(f"^{REQUEST_ID.pattern}$")
# The push: KEYS' last is the version's window; ARGV: the window's size, then the outcomes. Returns the window.
_PUSH_SCRIPT = """
for i = 2, #ARGV do redis.call('LPUSH', KEYS[#KEYS], ARGV[i]) end
redis.call('LTRIM', KEYS[#KEYS], 0, tonumber(ARGV[1]) - 1)
return redis.call('LRANGE', KEYS[#KEYS], 0, -1)
"""
# KEYS: the predictions, the tombstone, the version's window; ARGV as the push's. The claim (DEL) and the push are
# one step, so two posts for one request never both count, and a worker dying between them loses nothing. Returns
# the window after the push, or false when another post claimed the request first. (A Redis Cluster runs a script
# only on keys of one slot: there the claim and the push are separate commands, see FeedbackStore.join.)
_JOIN_SCRIPT = (
    """
if redis.call('DEL', KEYS[1]) == 0 then return false end
redis.call('SET', KEYS[2], 'joined', 'KEEPTTL')"""
    + _PUSH_SCRIPT
)


def _digest(user: str | None) -> str:
    """The caller as stored beside their predictions: a digest, so user names stay out of Redis."""
    return hashlib.blake2b((user or "").encode(), digest_size=8).hexdigest()


def store_for(config: dict, redis: PredictionCache | None) -> "FeedbackStore":
    """The store the settings ask for: in `redis` (cache.shared_redis); keeping nothing when FEEDBACK_TTL=0."""
    if not config["FEEDBACK_TTL"]:
        redis = None
    elif redis is None:
        raise StartupError("FEEDBACK_TTL needs REDIS_URL: the predictions kept for feedback live in Redis")
    return FeedbackStore(redis, config["FEEDBACK_TTL"], config["FEEDBACK_WINDOW"], config["CACHE_PREFIX"])


class FeedbackStore:
    """Predictions kept per request id for FEEDBACK_TTL seconds, and each version's window of feedback outcomes, in
    the cache's Redis, through its breakers: a Redis problem costs a predict nothing but the feedback."""

    def __init__(self, redis: PredictionCache | None, ttl: int, window: int, prefix: str) -> None:
        self.redis = redis
        self.ttl = ttl if redis is not None else 0
        self.window = window
        self.prefix = f"{prefix}feedback:"

    @property
    def enabled(self) -> bool:
        """Whether answers are kept for feedback (FEEDBACK_TTL > 0, with Redis configured)."""
        return bool(self.ttl)

    def keys(self, request_id: str) -> tuple[str, str]:
        """A request's predictions key and its tombstone key."""
        return f"{self.prefix}p:{request_id}", f"{self.prefix}t:{request_id}"

    def remember(self, request_id: str, model: Model, predictions: list, user: str | None) -> None:
        """Keep a request's answers for FEEDBACK_TTL, and its tombstone a day longer: one round trip, fail-open."""
        if not self.ttl or not self.redis.usable():
            return  # checked before encoding: a dead Redis costs no work per request
        kept = {"model": model.name, "version": model.version, "task": model.task, "user": _digest(user)}
        record = orjson.dumps(kept | {"p": predictions})
        data, tombstone = self.keys(request_id)

        def write(client) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(data, record, ex=self.ttl)
            pipe.set(tombstone, b"kept", ex=self.ttl + TOMBSTONE_SECONDS)
            pipe.execute()

        self.redis.attempt(write)

    def fetch(self, request_id: str) -> tuple[dict | None, bytes | None]:
        """A request's kept record (None once expired or joined) and its tombstone (None: never kept, or long gone);
        503 when Redis can't be asked."""
        keys = self.keys(request_id)
        # On a cluster the two keys' slots differ: one MGET per slot.
        ok, found = self.redis.attempt(lambda c: c.mget_nonatomic(keys) if self.redis.cluster else c.mget(keys))
        if not ok:
            raise _unavailable()
        raw, tombstone = found
        return (orjson.loads(raw) if raw is not None else None), tombstone

    def join(self, request_id: str, model: str, version: str, outcomes: list[str]) -> list[bytes] | None:
        """Claim a request's predictions and push its outcomes to the version's window: the window after the push,
        or None when another post claimed them first; 503 when Redis can't be asked."""
        keys = [*self.keys(request_id), f"{self.prefix}w:{model}:{version}"]

        def claim_then_push(client) -> list[bytes] | None:
            # On a cluster the three keys are in three slots. DEL still lets exactly one post claim the predictions;
            # a worker dying before the push loses that post's outcomes (never counts them twice).
            if not client.delete(keys[0]):
                return None
            client.set(keys[1], _JOINED, keepttl=True)
            return client.eval(_PUSH_SCRIPT, 1, keys[2], self.window, *outcomes)

        if self.redis.cluster:
            ok, window = self.redis.attempt(claim_then_push)
        else:
            ok, window = self.redis.attempt(lambda client: client.eval(_JOIN_SCRIPT, 3, *keys, self.window, *outcomes))
        if not ok:
            raise _unavailable()
        return window


def _unavailable() -> ApiError:
    """Redis is down or refusing: the request's predictions can't be read, which is no answer about them."""
    return ApiError(503, "feedback_unavailable", "Feedback storage (Redis) is unavailable; send it again later.")


def _refuse(status: int, code: str, message: str, outcome: str) -> ApiError:
    """An ApiError for a refused post, counted by its outcome."""
    REQUESTS.labels(outcome).inc()
    return ApiError(status, code, message)


def _invalid(message: str) -> ApiError:
    """A 400 for a body that is not a feedback body."""
    return _refuse(400, "invalid_feedback", message, "invalid")


def store() -> FeedbackStore:
    """The FeedbackStore create_app made."""
    return current_app.extensions["sibyl.feedback"]


@bp.post("/feedback")
@auth.login_required
def feedback() -> Response:
    """Send the true labels (classifiers) or values (regressors) for a request's predictions, joined by its request
    id; null where a row's truth is unknown. Only the user who made the request, or an admin, may."""
    request_id, truth = _read_body()
    kept = store()
    unknown = "No predictions are kept for that request id (it was never answered here, or by another user)."
    if not kept.enabled:
        raise _refuse(404, "feedback_off", "This server keeps no predictions for feedback (FEEDBACK_TTL=0).", "unknown")
    record, tombstone = kept.fetch(request_id)
    if record is None:
        if tombstone is None:
            raise _refuse(404, "request_not_found", unknown, "unknown")
        if tombstone == _JOINED:
            raise _invalid_409()
        raise _refuse(
            410,
            "feedback_expired",
            "That request's predictions were kept for FEEDBACK_TTL seconds and have expired; send feedback sooner.",
            "expired",
        )
    user = auth.current_user()
    # Another user's request reads as unknown: a 403 would confirm that a guessed (or caller-chosen) id exists.
    if record["user"] != _digest(user) and "admin" not in user_roles(user):
        raise _refuse(404, "request_not_found", unknown, "unknown")
    predictions = record["p"]
    if len(truth) != len(predictions):
        raise _refuse(
            400,
            "row_count_mismatch",
            f"That request answered {len(predictions)} row(s); send exactly that many truths (null for unknown ones).",
            "mismatch",
        )
    model = _served(registry(), record["model"], record["version"])
    classifier = record["task"] == "classification"
    outcomes = _outcomes(predictions, truth, model, classifier)
    window = kept.join(request_id, record["model"], record["version"], outcomes)
    if window is None:
        raise _invalid_409()
    REQUESTS.labels("joined").inc()
    ROWS.labels(record["model"], record["version"]).inc(len(outcomes))
    summary = _export(record["model"], record["version"], window, classifier)
    g.log.update(model=record["model"], version=record["version"], rows=len(outcomes))
    answered = {"name": record["model"], "version": record["version"]}
    return json_response({"request_id": request_id, "model": answered, "rows": len(outcomes), "window": summary})


def _invalid_409() -> ApiError:
    """Feedback for this request was joined already: counting it twice would skew the window."""
    return _refuse(
        409, "feedback_already_joined", "Feedback for that request id was already received; it counts once.", "invalid"
    )


def _read_body() -> tuple[str, list]:
    """The body's request id and truths, or a 400 saying what a feedback body holds."""
    body = read_json()
    example = 'send {"request_id": "<X-Request-ID of the answer>", "truth": [...]}'
    if set(body) != {"request_id", "truth"}:
        raise _invalid(f"The body takes exactly 'request_id' and 'truth'; {example}.")
    request_id, truth = body["request_id"], body["truth"]
    if type(request_id) is not str or not _ID.search(request_id):
        raise _invalid("'request_id' must be the X-Request-ID an answer carried (1-128 of A-Z a-z 0-9 . _ : -).")
    if type(truth) is not list or not 1 <= len(truth) <= max_rows():
        raise _invalid(f"'truth' must be a list of 1 to {max_rows()} values, one per row the request sent.")
    if any(type(t) not in (str, int, float, bool) and t is not None for t in truth):
        raise _invalid("Each truth must be a label or a number (or null when unknown), not a list or an object.")
    if all(t is None for t in truth):
        raise _invalid("'truth' holds only nulls; send at least one row's true label or value.")
    return request_id, truth


def _served(served: Registry, name: str, version: str) -> Model | None:
    """The version that answered, if this server still serves it (a rollout may have retired it since)."""
    entry = served.entries.get(name)
    return entry.versions.get(version) if entry else None


def _is_number(value: object) -> bool:
    """A finite JSON number (true and false are not numbers here)."""
    return type(value) in (int, float) and math.isfinite(value)


def _outcomes(predictions: list, truth: list, model: Model | None, classifier: bool) -> list[str]:
    """Per row given a truth: "1" or "0" (the prediction was right or not) for a classifier, the error (prediction
    minus truth) for a regressor; 400 for a truth the model could never have answered."""
    if classifier:
        labels = set(model.class_keys) if model else None
        given = [(p, t) for p, t in zip(predictions, truth) if t is not None]
        # Labels compare as text: JSON keeps 1 and "1" apart, class labels read from a CSV do not.
        if labels is not None and (bad := next((t for _, t in given if str(t) not in labels), None)) is not None:
            raise _invalid(f"{str(bad)[:64]!r} is not one of the model's classes ({', '.join(sorted(labels))}).")
        return ["1" if str(p) == str(t) else "0" for p, t in given]
    if not all(_is_number(t) for t in truth if t is not None):
        raise _invalid("A regressor's truths must be finite numbers (or null when unknown).")
    return [repr(float(p) - float(t)) for p, t in zip(predictions, truth) if t is not None]


def _export(name: str, version: str, window: list[bytes], classifier: bool) -> dict:
    """Set the version's accuracy or MAE/RMSE gauges from its window; the same figures for the reply."""
    values = [float(v) for v in window]
    if classifier:
        accuracy = sum(values) / len(values)
        ACCURACY.labels(name, version).set(accuracy)
        return {"rows": len(values), "accuracy": accuracy}
    mae = sum(abs(v) for v in values) / len(values)
    rmse = math.sqrt(sum(v * v for v in values) / len(values))
    MAE.labels(name, version).set(mae)
    RMSE.labels(name, version).set(rmse)
    return {"rows": len(values), "mae": mae, "rmse": rmse}


def openapi_operation(endpoint: str, method: str, registry: Registry, config) -> dict | None:
    """POST /feedback's body and answer in GET /openapi.json."""
    if endpoint != "feedback.feedback":
        return None
    schema = {
        "type": "object",
        "required": ["request_id", "truth"],
        "properties": {
            "request_id": {
                "type": "string",
                "pattern": _ID.pattern,
                "description": "The X-Request-ID header of the predict answer.",
            },
            "truth": {
                "type": "array",
                "minItems": 1,
                "maxItems": config["MAX_ROWS"],
                "items": {"type": ["string", "number", "boolean", "null"]},
                "contains": {"type": ["string", "number", "boolean"]},
                "description": "One true label or value per row the request sent, null where unknown (not all).",
            },
        },
        "additionalProperties": False,
    }
    # The example names no real request, so it documents (and the Postman collection checks) the 404.
    labels = [m.class_keys[0] for m in registry.loaded() if m.classes]
    example = {
        "summary": "unknown request id (send a predict answer's X-Request-ID)",
        "value": {"request_id": "0123456789abcdef0123456789abcdef", "truth": labels[:1] or [0.0]},
        "x-status": 404,
    }
    ok = json_answer("The truths were joined; the version's window after them.", _RESPONSE)
    body = json_body(schema, {}, single=False)
    body["content"]["application/json"]["examples"] = {"unknown": example}
    return {"requestBody": body, "ok": ok, "statuses": (400, 404, 409, 410, 413, 415, 503)}


_RESPONSE = {
    "type": "object",
    "required": ["request_id", "model", "rows", "window"],
    "properties": {
        "request_id": {"type": "string"},
        "model": {"$ref": "#/components/schemas/ModelRef"},
        "rows": {"type": "integer", "description": "Rows joined (those given a truth)."},
        "window": {
            "type": "object",
            "required": ["rows"],
            "properties": {
                "rows": {"type": "integer", "description": "Feedback rows in the version's window now."},
                "accuracy": {"type": "number"},
                "mae": {"type": "number"},
                "rmse": {"type": "number"},
            },
        },
    },
}
