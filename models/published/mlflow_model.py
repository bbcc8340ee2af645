"""Write an MLflow model directory with the onnx flavor, as a data scientist's run would.

The digits classifier of models/digits/train.py (scikit-learn's MLP on the 8x8 digits that ship
inside scikit-learn, inputs scaled to 0-1), exported with skl2onnx's defaults (so it ends in a
ZipMap) and saved with mlflow.onnx.save_model's defaults (its weights, as raw bytes, go to an
external data file beside model.onnx), with a signature inferred from its inputs and outputs and the
run id of a tracking run. Also writes the 64-pixel test inputs and onnxruntime's probabilities
for them, for the test to compare with.

    python models/published/mlflow_model.py OUT_DIR
"""

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from skl2onnx import to_onnx

import mlflow.onnx
from mlflow.models import Model, infer_signature


def main():
    out = Path(sys.argv[1])
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0,
                                                   stratify=y)
    x_train = (x_train / 16.0).astype(np.float32)
    x_test = (x_test[:8] / 16.0).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0)
    clf.fit(x_train, y_train)
    onx = to_onnx(clf, x_train[:1])
    # skl2onnx writes weights as lists of floats, which onnx never moves out of the file;
    # exporters such as torch.onnx write raw bytes, and MLflow's default then puts them in an
    # external data file. Written as raw bytes here, so this directory is shaped like those.
    for i, t in enumerate(onx.graph.initializer):
        onx.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"X": x_test})
    probabilities = np.array([[row[k] for k in sorted(row)] for row in probabilities],
                             dtype=np.float32)
    signature = infer_signature(
        x_test, {"output_label": label, "output_probability": probabilities})
    model_dir = out / "model"
    mlflow.onnx.save_model(onx, str(model_dir), signature=signature,
                           mlflow_model=Model(run_id=uuid.uuid4().hex))
    (out / "expected.json").write_text(json.dumps({
        "inputs": x_test.tolist(),
        "labels": label.tolist(),
        "probabilities": probabilities.tolist(),
    }))
    print(model_dir)


if __name__ == "__main__":
    main()
