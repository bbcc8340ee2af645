"""Trains the handwritten-digit classifier and exports it to ONNX.

Data: scikit-learn's bundled 8x8 digits (1,797 images, values 0-16); nothing is downloaded.
Run with: python models/digits/train.py   (from the repository root, requirements installed)
Writes: digits.onnx, expected.json, baseline.json, samples/*.pgm|png next to this script.
"""

import os
import sys

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import categorical, export_classifier, histogram, write_json, write_pgm, write_png  # noqa: E402

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)

clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0)
clf.fit((X_train / 16.0).astype(np.float32), y_train)
accuracy = clf.score((X_test / 16.0).astype(np.float32), y_test)

onx = export_classifier(clf, (X_train[:1] / 16.0).astype(np.float32))
with open(os.path.join(HERE, "digits.onnx"), "wb") as f:
    f.write(onx.SerializeToString())

session = ort.InferenceSession(os.path.join(HERE, "digits.onnx"))
cases = []
for i in [0, 1, 2, 3, 4]:
    pixels = X_test[i]
    (probabilities,) = session.run(None, {"input": (pixels / 16.0).astype(np.float32)[None, :]})
    cases.append(
        {
            "pixels": [int(p) for p in pixels],
            "true_label": int(y_test[i]),
            "label": int(np.argmax(probabilities[0])),
            "probabilities": [round(float(p), 6) for p in probabilities[0]],
        }
    )

# Images for the raw endpoint: test digit 0 scaled up 8x, dark ink on a light background.
os.makedirs(os.path.join(HERE, "samples"), exist_ok=True)
ink = X_test[0].reshape(8, 8) / 16.0
image = np.kron(255.0 - ink * 255.0, np.ones((8, 8))).round()
write_pgm(os.path.join(HERE, "samples", "digit.pgm"), image)
write_png(os.path.join(HERE, "samples", "digit.png"), image)

# Drift baseline: the mean intensity of each training digit as the guest computes it, and the
# class the model predicts for it (prediction drift).
mean_intensity = (X_train / 16.0).astype(np.float32).mean(axis=1)
(train_probabilities,) = session.run(None, {"input": (X_train / 16.0).astype(np.float32)})
write_json(
    os.path.join(HERE, "baseline.json"),
    {
        "features": [{"name": "mean_intensity", **histogram(mean_intensity)}],
        "outputs": [{"name": "predicted_class", **categorical(np.argmax(train_probabilities, axis=1), 10)}],
        "thresholds": {"moderate": 0.1, "significant": 0.25},
        # Labels posted as feedback are joined with the predicted class: accuracy.
        "quality": {"output": "predicted_class", "task": "classification"},
    },
)
write_json(
    os.path.join(HERE, "expected.json"),
    {
        "test_accuracy": round(float(accuracy), 4),
        "tolerance": 1e-4,
        "sample_image_label": int(y_test[0]),
        "cases": cases,
    },
)
print(f"digits: test accuracy {accuracy:.4f}, wrote digits.onnx ({os.path.getsize(os.path.join(HERE, 'digits.onnx'))} bytes)")
