"""Drift arithmetic with numpy, independent of the Rust implementation the devices and the
fleet run (`runtime/bundle/src/drift.rs`); the tests compare the two.

  python models/drift.py psi --baseline models/sensor/baseline.json --samples S.json
      S.json: {"feature": [values, ...], ...}; prints {"feature": psi, ...} as JSON.
  python models/drift.py baseline --samples S.json [--bins 10] [--outputs name,...]
      prints a baseline (training deciles, tails, statistics) for the features in S.json.
  python models/drift.py onnx-baseline --spec NAME.bundle.toml --data X.npy [--bins 10]
      prints the baseline `outpost bundle build --onnx … --baseline-data X.npy` computes for
      the generic guest's `monitor` features, from numpy and onnxruntime.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import categorical, histogram, slots  # noqa: E402

EPSILON = 1e-4


def psi(feature, values):
    """PSI of `values` against one baseline feature: sum of (a - e) * ln(a / e) over the
    slots, shares raised to EPSILON; a baseline in the first format (n proportions, no tails)
    counts values outside its edges in the end bins."""
    edges = np.asarray(feature["edges"], dtype=np.float64)
    n = len(edges) - 1
    expected = np.asarray(feature["proportions"], dtype=np.float64)
    s = slots(edges, values)
    if len(expected) == n:
        s = np.clip(s, 1, n) - 1
        counts = np.bincount(s, minlength=n)
    else:
        counts = np.bincount(s, minlength=n + 2)
    a = np.maximum(counts / counts.sum(), EPSILON)
    e = np.maximum(expected, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def monitored(m, x):
    """Feature `m` of each item (row along the first axis) of tensor `x`, as the generic guest
    observes it (`examples/generic/src/lib.rs`)."""
    n = x.shape[0] if x.ndim else 1
    x = np.asarray(x, dtype=np.float64).reshape(n, *x.shape[1:])
    if m["stat"] == "value":
        return x.reshape(n, -1)[:, m.get("column", 0)]
    if "channel" in m:
        x = np.take(x, m["channel"], axis=m.get("axis", 1))
    x = x.reshape(n, -1)
    return {"mean": lambda: x.mean(axis=1), "std": lambda: x.std(axis=1), "argmax": lambda: x.argmax(axis=1)}[m["stat"]]()


def onnx_baseline(spec_path, data, bins):
    import tomllib

    import onnxruntime

    with open(spec_path, "rb") as f:
        spec = tomllib.load(f)
    generic = spec.get("metadata", {}).get("generic", {})
    [model] = spec["model"]
    session = onnxruntime.InferenceSession(
        os.path.join(os.path.dirname(os.path.abspath(spec_path)), model["path"]), providers=["CPUExecutionProvider"]
    )
    x = np.load(data)
    [port] = session.get_inputs()
    step = generic.get("inputs", {}).get(port.name)
    fed = x.astype(np.float32)
    if step:
        fed = fed * np.float32(step.get("scale", 1.0)) + np.float32(step.get("offset", 0.0))
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {port.name: fed})))
    baseline = {"features": [], "outputs": []}
    for m in generic["monitor"]:
        if "output" in m:
            values = monitored(m, outputs[m["output"]])
        else:
            values = monitored(m, x)
        if "classes" in m:
            k = m["classes"] or max(len(spec.get("labels", [])), int(values.max()) + 1)
            made = categorical(values, k)
        else:
            made = histogram(values, bins)
        baseline["outputs" if "output" in m else "features"].append({"name": m["name"], **made})
    return baseline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("psi")
    p.add_argument("--baseline", required=True)
    p.add_argument("--samples", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("--samples", required=True)
    b.add_argument("--bins", type=int, default=10)
    b.add_argument("--outputs", default="", help="comma-separated names that are model outputs")
    o = sub.add_parser("onnx-baseline")
    o.add_argument("--spec", required=True)
    o.add_argument("--data", required=True)
    o.add_argument("--bins", type=int, default=10)
    args = parser.parse_args()
    if args.command == "onnx-baseline":
        print(json.dumps(onnx_baseline(args.spec, args.data, args.bins), indent=1))
        return
    with open(args.samples) as f:
        samples = json.load(f)
    if args.command == "psi":
        with open(args.baseline) as f:
            baseline = json.load(f)
        features = {x["name"]: x for x in baseline["features"] + baseline.get("outputs", [])}
        missing = sorted(set(samples) - set(features))
        if missing:
            sys.exit(f"the baseline does not name {', '.join(missing)}")
        print(json.dumps({name: psi(features[name], np.asarray(v, dtype=np.float64)) for name, v in samples.items()}))
    else:
        outputs = {x for x in args.outputs.split(",") if x}
        made = {name: {"name": name, **histogram(v, args.bins)} for name, v in samples.items()}
        print(
            json.dumps(
                {
                    "features": [v for k, v in made.items() if k not in outputs],
                    "outputs": [v for k, v in made.items() if k in outputs],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
