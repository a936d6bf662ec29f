"""make bench: what recording one request's metrics costs, in process, in gunicorn's multiprocess mode."""

import json
import os
import statistics
import sys
import tempfile
from time import perf_counter

ROUNDS, CALLS = 5, 5000


def main(model_path: str, backend: str) -> None:
    """Print, as JSON, the median µs per request of the request and prediction recording calls."""
    # Set before prometheus_client is imported (by the app), as gunicorn.conf.py does for the workers.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sibyl-bench-metrics-")
    import numpy as np
    from flask import g

    from app import create_app, pipeline

    users = "bench:sha256:" + "0" * 64
    settings = {"MODEL_PATH": model_path, "SIBYL_USERS": users, "SIBYL_USERS_FILE": "", "REDIS_URL": ""}
    app = create_app(settings | {"INFERENCE_BACKEND": backend, "LOG_LEVEL": "WARNING"})
    registry, cache = app.extensions["sibyl.registry"], app.extensions["sibyl.cache"]
    metrics, drift = app.extensions["sibyl.metrics"], app.extensions["sibyl.drift"]
    model = registry.resolve(registry.default_model)
    X = np.zeros((1, model.n_features))
    result = pipeline.predict(model, X, False, cache)

    def per_call(record) -> float:
        """Median µs of one call over ROUNDS rounds of CALLS."""
        rounds = []
        for _ in range(ROUNDS):
            t0 = perf_counter()
            for _ in range(CALLS):
                record()
            rounds.append((perf_counter() - t0) / CALLS * 1e6)
        return round(statistics.median(rounds), 2)

    with app.test_request_context("/predict", method="POST"):
        g.log = {"model": model.name, "version": model.version}  # what request_log and log_model leave for a predict
        now = perf_counter()
        request_us = per_call(lambda: metrics.request_done(200, 0.001, now, cache))
        prediction_us = per_call(lambda: metrics.prediction(result, 1, cache))
        drift_us = per_call(lambda: drift.observe(model, X, result.predictions))
    print(json.dumps({"request_us": request_us, "prediction_us": prediction_us, "drift_1_row_us": drift_us}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
