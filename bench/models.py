"""The bench's two models: their recipe (bench.run.make_models fits it), and, run by a peer's own venv python
(bench/peers.py), one model laid out the way that peer serves it, described in JSON."""

# Only the standard library, numpy, scikit-learn and joblib (and mlflow for MLflow's layout): this runs in a peer's
# virtualenv, where none of the project's code or dependencies is installed.

import argparse
import json
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

FEATURES = 20
CHECK_ROWS = 5


def data() -> tuple[np.ndarray, np.ndarray]:
    """The bench's training data (bench.run.make_models's too), drawn from a fixed seed."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, FEATURES))
    y = (X[:, :5].sum(axis=1) + rng.normal(size=len(X)) > 0).astype(int)
    return X, y


def train(name: str, X: np.ndarray, y: np.ndarray):
    """The bench's recipe for "RF" or "LR" (bench.run.make_models's too), fitted on X, y."""
    if name == "RF":
        estimator = RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0)
    else:
        estimator = LogisticRegression(max_iter=1000, random_state=0)
    return estimator.fit(X, y)


def main() -> None:
    """Load the bench's joblib, or train the same recipe when this venv's scikit-learn cannot read it; write
    OUT/model.joblib (and OUT/mlflow-model for --mlflow); print how, and the labels of the check rows."""
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=("RF", "LR"))
    p.add_argument("joblib_path")
    p.add_argument("out")
    p.add_argument("--mlflow", action="store_true")
    a = p.parse_args()
    X, y = data()
    try:
        model, how = joblib.load(a.joblib_path), "the bench's joblib"
    except Exception as e:  # noqa: BLE001  (any unpickling failure means: train it here instead)
        model, how = train(a.name, X, y), f"retrained here ({type(e).__name__}: {str(e)[:200]})"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / "model.joblib")
    if a.mlflow:
        import mlflow.sklearn
        from mlflow.models import infer_signature

        # A signature, as MLflow's docs log every model with: the server then checks each request against it. MLflow 3
        # saves in skops's format by default, which refuses a forest's tree storage unless told it is trusted: we made
        # this file, so it is.
        signature = infer_signature(X[:CHECK_ROWS], model.predict(X[:CHECK_ROWS]))
        trusted = ["sklearn.tree._tree.Tree"] if a.name == "RF" else None
        mlflow.sklearn.save_model(model, str(out / "mlflow-model"), signature=signature, skops_trusted_types=trusted)
    expected = model.predict(X[:CHECK_ROWS]).tolist()
    print(json.dumps({"how": how, "sklearn": sklearn.__version__, "numpy": np.__version__, "expected": expected}))


if __name__ == "__main__":
    main()
