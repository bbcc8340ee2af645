"""The retraining loop's last mile for the digits model: retrain on the original data plus data
from the drifted distribution, build and sign a new bundle, push it to the fleet, and start a
canary rollout. Meant as a fleet rule's command (it reads the firing's JSON on stdin, see
docs/rules.md), and runnable by hand.

  python models/digits/retrain.py --fleet http://127.0.0.1:7878 --key signer.key --tag lab
      [--version 1.2.0] [--stages 1,50%,100%] [--canary '{"percent": 20}'] [--gate ...]
      [--guest digits_guest.wasm] [--work DIR] [--no-push] [--outpost PATH] < firing.json

Training needs models/requirements.txt (scikit-learn, skl2onnx, onnx). With
--prebuilt FILE.opb the training and build are skipped and that signed bundle is pushed
(the standard library is enough then): the tests use it to run the loop in seconds.

The drifted distribution is synthesised: faded digits (ink divided by three), as the demo
traffic and the tests send. A real pipeline would pull the field's samples and the labels
posted as feedback; everything after the training step stays the same.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run(cmd, **kw):
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def next_version(version):
    major, minor, _ = (int(p) for p in version.split("+")[0].split("-")[0].split("."))
    return f"{major}.{minor + 1}.0"


def faded(X):
    import numpy as np

    return np.floor(X / 3.0)


def train(work, version):
    """Retrains on the original training split plus its faded copy; writes the ONNX model and
    the training baseline of the new data into `work`. Returns the test accuracy on both."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    sys.path.insert(0, os.path.dirname(HERE))
    from common import categorical, export_classifier, histogram, write_json

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    X_all = np.concatenate([X_train, faded(X_train)])
    y_all = np.concatenate([y_train, y_train])
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0)
    clf.fit((X_all / 16.0).astype(np.float32), y_all)
    scores = {
        "original": float(clf.score((X_test / 16.0).astype(np.float32), y_test)),
        "faded": float(clf.score((faded(X_test) / 16.0).astype(np.float32), y_test)),
    }
    onx = export_classifier(clf, (X_all[:1] / 16.0).astype(np.float32))
    with open(os.path.join(work, "digits.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    predicted = clf.predict((X_all / 16.0).astype(np.float32))
    write_json(
        os.path.join(work, "baseline.json"),
        {
            "features": [{"name": "mean_intensity", **histogram((X_all / 16.0).astype(np.float32).mean(axis=1))}],
            "outputs": [{"name": "predicted_class", **categorical(predicted, 10)}],
            "thresholds": {"moderate": 0.1, "significant": 0.25},
            "quality": {"output": "predicted_class", "task": "classification"},
        },
    )
    return scores


def find_guest(given):
    if given:
        return given
    candidates = [
        os.path.join(os.environ.get("CARGO_TARGET_DIR", ""), "wasm32-wasip2/release/digits_guest.wasm"),
        os.path.join(ROOT, "examples/target/wasm32-wasip2/release/digits_guest.wasm"),
    ]
    for c in candidates:
        if os.path.isfile(c):
            return c
    run(["cargo", "build", "--release", "--target", "wasm32-wasip2", "--manifest-path", os.path.join(ROOT, "examples/Cargo.toml")])
    for c in candidates:
        if os.path.isfile(c):
            return c
    sys.exit("retrain: no digits guest; pass --guest FILE")


def build(args, work, version):
    """The example's bundle spec with the new model, baseline and version; built and signed."""
    with open(os.path.join(ROOT, "examples/digits/bundle.toml")) as f:
        spec = f.read()
    guest = shutil.copy(find_guest(args.guest), os.path.join(work, "guest.wasm"))
    spec = (
        spec.replace('version = "1.0.0"', f'version = "{version}"')
        .replace('guest = "../target/wasm32-wasip2/release/digits_guest.wasm"', f'guest = "{os.path.basename(guest)}"')
        .replace('baseline = "../../models/digits/baseline.json"', 'baseline = "baseline.json"')
        .replace('path = "../../models/digits/digits.onnx"', 'path = "digits.onnx"')
        .replace('training = "models/digits/train.py"', 'training = "models/digits/retrain.py (original + faded digits)"')
    )
    with open(os.path.join(work, "bundle.toml"), "w") as f:
        f.write(spec)
    out = os.path.join(work, f"digits-{version}.opb")
    run([args.outpost, "bundle", "build", os.path.join(work, "bundle.toml"), "--out", out])
    run([args.outpost, "bundle", "sign", out, "--key", args.key])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleet", default=os.environ.get("OUTPOST_FLEET", "http://127.0.0.1:7878"))
    p.add_argument("--key", help="the signing key (outpost key generate)")
    p.add_argument("--version", help="the new version (default: the firing's version, minor + 1)")
    p.add_argument("--from-version", default="1.0.0", help="the version replaced, without a firing on stdin")
    p.add_argument("--tag", help="roll out to devices with this tag (default: every device)")
    p.add_argument("--stages", default="1,50%,100%")
    p.add_argument("--canary", help="the first stage's canary policy (JSON)")
    p.add_argument("--soak", default="60s")
    p.add_argument("--gate", action="append", default=[])
    p.add_argument("--window", default="60s")
    p.add_argument("--min-requests", default="100")
    p.add_argument("--deadline", default="10m")
    p.add_argument("--guest", help="the digits guest (.wasm); default: built by cargo")
    p.add_argument("--work", default=os.path.join(ROOT, "target", "retrain"))
    p.add_argument("--prebuilt", help="push this signed bundle instead of training one")
    p.add_argument("--no-push", action="store_true", help="stop after building the bundle")
    p.add_argument("--outpost", default=os.environ.get("OUTPOST_BIN", "outpost"))
    args = p.parse_args()

    firing = {}
    if not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if text:
            firing = json.loads(text)
    replaced = firing.get("version", args.from_version)
    print(
        f"retrain: {firing.get('rule', 'by hand')}: {firing.get('metric', '')} "
        f"{firing.get('value', '')} on digits {replaced}",
        file=sys.stderr,
    )
    if args.prebuilt:
        bundle = args.prebuilt
        version = json.loads(run([args.outpost, "bundle", "inspect", bundle, "--json"]))["manifest"]["version"]
    else:
        if not args.key:
            sys.exit("retrain: --key is needed to sign the new bundle")
        version = args.version or next_version(replaced)
        os.makedirs(args.work, exist_ok=True)
        scores = train(args.work, version)
        print(f"retrain: test accuracy {scores}", file=sys.stderr)
        bundle = build(args, args.work, version)
    print(f"retrain: bundle {bundle} (digits {version})", file=sys.stderr)
    if args.no_push:
        return
    remote = ["--fleet", args.fleet]
    run([args.outpost, "fleet", "push", bundle, *remote])
    start = [args.outpost, "fleet", "rollout", "start", f"digits@{version}", *remote]
    start += ["--tag", args.tag] if args.tag else ["--all"]
    start += ["--stages", args.stages, "--soak", args.soak, "--window", args.window]
    start += ["--min-requests", args.min_requests, "--deadline", args.deadline]
    for g in args.gate:
        start += ["--gate", g]
    if args.canary:
        start += ["--canary", args.canary]
    print(run(start + ["--json"]).strip())


if __name__ == "__main__":
    main()
