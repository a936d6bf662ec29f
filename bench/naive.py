"""The tutorial baseline: load the joblib at import, predict with scikit-learn, jsonify the labels."""

import os

import joblib
import numpy as np
from flask import Flask, jsonify, request

from bench.ceilings import NO_MODEL

app = Flask(__name__)
app.extensions.update(NO_MODEL)  # not part of the tutorial: see NO_MODEL
model = joblib.load(os.environ["MODEL_PATH"])


@app.post("/predict")
def predict():
    """What most "serve your model with Flask" posts write, kept as written there."""
    return jsonify({"predictions": model.predict(np.array(request.get_json()["features"])).tolist()})
