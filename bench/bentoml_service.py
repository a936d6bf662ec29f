"""The BentoML peer of bench/peers.py: one joblib model (MODEL_PATH) behind POST /predict, two workers."""

# Runs under `bentoml serve` in BentoML's own virtualenv (bench/.peers/bentoml), never in the project's.

import os

import bentoml
import joblib
import numpy as np


@bentoml.service(workers=2)
class Predictor:
    """What BentoML's docs show for a scikit-learn model: load it once per worker, predict in an API method."""

    def __init__(self) -> None:
        """Load the model this worker serves."""
        self.model = joblib.load(os.environ["MODEL_PATH"])

    @bentoml.api
    def predict(self, features: list[list[float]]) -> list[int]:
        """{"features": [[...], ...]} -> the predicted labels (Sibyl's own request body)."""
        return self.model.predict(np.asarray(features, dtype=np.float64)).tolist()
