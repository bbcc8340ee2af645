"""Trains the sensor anomaly detector (an autoencoder) and exports it to ONNX.

Data: readings from a seeded generator that mimics a motor's sensors — temperature (°C),
vibration (g) and current (A): slow thermal cycles, a rotation-rate vibration, load-following
current, Gaussian noise. Not real measurements; nothing is downloaded.
Run with: python models/sensor/train.py   (from the repository root, requirements installed)
Writes: sensor.onnx, metadata.json (scaler, window, threshold), baseline.json, expected.json.
"""

import os
import sys

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.neural_network import MLPRegressor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import histogram, keep_output, write_json  # noqa: E402

WINDOW = 16
CHANNELS = ["temperature", "vibration", "current"]


def readings(n, seed):
    """n time steps of normal operation, shape (n, 3)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    load = 0.5 + 0.5 * np.sin(2 * np.pi * t / 240.0 + rng.uniform(0, 2 * np.pi))
    temperature = 40.0 + 6.0 * load + rng.normal(0, 0.3, n)
    vibration = 0.4 + 0.15 * np.sin(2 * np.pi * t / 8.0) + 0.1 * load + rng.normal(0, 0.03, n)
    current = 2.0 + 3.0 * load + rng.normal(0, 0.08, n)
    return np.stack([temperature, vibration, current], axis=1)


def windows(r):
    n = len(r) // WINDOW
    return r[: n * WINDOW].reshape(n, WINDOW * len(CHANNELS))


train = readings(40_000, seed=1)
mean, std = train.mean(axis=0), train.std(axis=0)
scale = lambda r: (r - mean) / std  # noqa: E731

X = windows(scale(train)).astype(np.float32)
model = MLPRegressor(hidden_layer_sizes=(24, 8, 24), activation="tanh", max_iter=400, random_state=0)
model.fit(X, X)

onx = to_onnx(model, X=X[:1], target_opset=17)
onx.graph.input[0].name = "input"
for node in onx.graph.node:
    node.input[:] = ["input" if i == "X" else i for i in node.input]
onx = keep_output(onx, "add_result3", "reconstruction")
path = os.path.join(HERE, "sensor.onnx")
with open(path, "wb") as f:
    f.write(onx.SerializeToString())

session = ort.InferenceSession(path)


def scores(r):
    x = windows(scale(r)).astype(np.float32)
    (recon,) = session.run(None, {"input": x})
    return ((recon - x) ** 2).mean(axis=1)


validation = readings(8_000, seed=2)
threshold = float(np.quantile(scores(validation), 0.999) * 1.5)

normal = readings(WINDOW * 2, seed=3)
faulty = normal.copy()
faulty[WINDOW + 4 : WINDOW + 10, 1] += 1.5  # a bearing knock in the second window
faulty[WINDOW:, 0] += 8.0  # and overheating
cases = []
for name, r in [("normal", normal), ("fault in second window", faulty)]:
    s = scores(r)
    cases.append(
        {
            "name": name,
            "readings": [[round(float(v), 4) for v in row] for row in r],
            "scores": [round(float(v), 6) for v in s],
            "anomalies": [bool(v > threshold) for v in s],
        }
    )
# Recompute from the rounded readings the tests send, so expectations match them exactly.
for case in cases:
    s = scores(np.array(case["readings"]))
    case["scores"] = [round(float(v), 6) for v in s]
    case["anomalies"] = [bool(v > threshold) for v in s]

write_json(
    os.path.join(HERE, "metadata.json"),
    {
        "window": WINDOW,
        "channels": CHANNELS,
        "channel_mean": [round(float(v), 6) for v in mean],
        "channel_std": [round(float(v), 6) for v in std],
        "threshold": round(threshold, 6),
    },
)
# Drift baseline: what the guest observes, per complete window of the training readings —
# each channel's mean over the window, and the window's reconstruction error (prediction drift).
window_means = train[: len(train) // WINDOW * WINDOW].reshape(-1, WINDOW, len(CHANNELS)).mean(axis=1)
write_json(
    os.path.join(HERE, "baseline.json"),
    {
        "features": [{"name": c, **histogram(window_means[:, i])} for i, c in enumerate(CHANNELS)],
        "outputs": [{"name": "score", **histogram(scores(train))}],
        "thresholds": {"moderate": 0.1, "significant": 0.25},
    },
)
write_json(os.path.join(HERE, "expected.json"), {"tolerance": 1e-4, "threshold": round(threshold, 6), "cases": cases})
print(f"sensor: threshold {threshold:.5f}, scores {[c['scores'] for c in cases]}")
