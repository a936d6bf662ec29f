"""Train the demo model deterministically from iris (ships with scikit-learn) and write it with metadata."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from app.registry import save_model

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def main(path: str = "models/iris/1/model.joblib") -> None:
    """Fit a scaled logistic regression on iris with string labels and save it."""
    iris = load_iris()
    labels = np.asarray(iris.target_names)[iris.target]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
    model.fit(iris.data, labels)
    # A few rows of each class, so the compiled backend is checked on real inputs.
    samples = iris.data[::10]
    # The training rows and labels as the drift reference: quantile bins per feature, class frequencies.
    reference = (iris.data, labels)
    meta = save_model(
        model, path, name="iris", version="1", feature_names=FEATURES, sample_rows=samples, reference=reference
    )
    print(f"wrote {path} (sha256 {meta['sha256'][:12]}..., classes {meta['classes']})")


if __name__ == "__main__":
    main(*sys.argv[1:])
