"""The tutorial baseline: load the joblib at import, predict with scikit-learn, jsonify the labels."""

import os

import joblib
import numpy as np
from flask import Flask, jsonify, request

app = Flask(__name__)
model = joblib.load(os.environ["MODEL_PATH"])


@app.post("/predict")
def predict():
    """What most "serve your model with Flask" posts write, kept as written there."""
    return jsonify({"predictions": model.predict(np.array(request.get_json()["features"])).tolist()})
