"""Compare a device serving the published models with onnxruntime, through Triton's client.

For each model of catalog.json that loads, the same seeded inputs go to onnxruntime (in
process, on the file fetch.py cached) and to the device (its OIP endpoint, with
`tritonclient.http`, once with JSON tensors and once with binary tensors). A recurrent model
runs several steps, each side fed its own state back. Prints one JSON line per model: the
largest absolute difference per mode and output, the classification extension's top class
against onnxruntime's arg max, and what the configuration and statistics calls returned.

    python models/published/compare.py --url 127.0.0.1:PORT [--cache DIR] [--models a,b]

Exit status 1 when a call fails; the caller judges the differences against the catalog's
tolerances.
"""

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as http

from fetch import HERE, default_cache

NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def make_inputs(model):
    """The model's inputs, from a generator seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(model["name"].encode()))
    out = {}
    for spec in model["inputs"]:
        dtype, shape, gen = NUMPY[spec["datatype"]], spec["shape"], spec["gen"]
        if gen == "uniform":
            v = rng.uniform(spec["low"], spec["high"], shape)
        elif gen == "normal":
            v = rng.normal(0.0, spec["sd"], shape)
        elif gen == "randint":
            v = rng.integers(spec["low"], spec["high"], shape)
        elif gen == "const":
            v = np.full(shape, spec["value"])
        elif gen == "iris":
            from sklearn.datasets import load_iris
            x = load_iris().data
            v = x[rng.choice(len(x), shape[0], replace=False)]
        else:
            raise ValueError(f"unknown generator {gen!r}")
        out[spec["name"]] = np.asarray(v, dtype=dtype)
    return out


def tensor(value):
    """An onnxruntime output as an array (a ZipMap's list of maps as rows of probabilities)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return np.array([[row[k] for k in sorted(row)] for row in value], dtype=np.float32)
    return np.asarray(value)


def device_infer(client, name, inputs, outputs, binary):
    args = []
    for key, value in inputs.items():
        dt = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32",
              np.int64: "INT64"}[value.dtype.type]
        i = http.InferInput(key, list(value.shape), dt)
        i.set_data_from_numpy(value, binary_data=binary)
        args.append(i)
    wanted = [http.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    result = client.infer(name, args, outputs=wanted)
    return {o: result.as_numpy(o) for o in outputs}


def compare(client, cache, model):
    name = model["name"]
    session = ort.InferenceSession(str(cache / f"{name}.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    steps = model.get("recurrent", {}).get("steps", 1)
    feed = model.get("recurrent", {}).get("feed", {})
    first = make_inputs(model)
    report = {"model": name, "steps": steps, "max_abs_diff": {}, "outputs": {}}
    reference = None
    for binary in (False, True):
        mode = "binary" if binary else "json"
        rng = np.random.default_rng(7)
        ours, theirs = dict(first), dict(first)
        worst = {}
        for step in range(steps):
            want = dict(zip(names, (tensor(v) for v in session.run(None, theirs))))
            got = device_infer(client, name, ours, names, binary)
            for o in names:
                g, w = got[o], want[o]
                if g.shape != w.shape:
                    raise AssertionError(f"{name} {mode} step {step}: `{o}` has shape "
                                         f"{list(g.shape)}, onnxruntime {list(w.shape)}")
                d = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)),
                                 initial=0.0))
                worst[o] = max(worst.get(o, 0.0), d)
                report["outputs"][o] = {"shape": list(w.shape), "datatype": str(g.dtype)}
            if reference is None:
                reference = want
            # The next chunk of a stream: new samples, each side's own state fed back.
            for out, into in feed.items():
                ours[into], theirs[into] = got[out], want[out]
            for spec in model["inputs"]:
                if spec["name"] not in feed.values() and spec["gen"] == "normal":
                    chunk = rng.normal(0.0, spec["sd"], spec["shape"]).astype(np.float32)
                    ours[spec["name"]] = theirs[spec["name"]] = chunk
        report["max_abs_diff"][mode] = worst

    # The classification extension on the first floating-point output, as Triton answers it:
    # "value:index:label" per class, best first.
    if model.get("labels"):
        scores = next(o for o in names if reference[o].dtype.kind == "f")
        i = http.InferInput(model["inputs"][0]["name"], list(first[model["inputs"][0]["name"]].shape),
                            model["inputs"][0]["datatype"])
        i.set_data_from_numpy(first[model["inputs"][0]["name"]], binary_data=False)
        result = client.infer(name, [i], outputs=[
            http.InferRequestedOutput(scores, binary_data=False, class_count=2)])
        top = result.as_numpy(scores)
        top = [[c.decode() if isinstance(c, bytes) else str(c) for c in row]
               for row in np.atleast_2d(top)]
        expected = np.argmax(reference[scores].reshape(len(top), -1), axis=-1)
        report["classification"] = {
            "top": top[0],
            "agrees": all(int(row[0].split(":")[1]) == int(e) for row, e in zip(top, expected)),
            "labels": [model["labels"][int(e)] for e in expected],
        }

    config = client.get_model_config(name)
    stats = client.get_inference_statistics(name)
    report["config"] = {
        "name": config.get("name"),
        "inputs": [i["name"] for i in config.get("input", [])],
        "outputs": [o["name"] for o in config.get("output", [])],
    }
    report["inference_count"] = sum(
        s.get("inference_count", 0) for s in stats.get("model_stats", []))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="host:port of the device's OIP endpoint")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    args = ap.parse_args()
    catalog = json.loads((HERE / "catalog.json").read_text())
    only = set(filter(None, args.models.split(",")))
    client = http.InferenceServerClient(url=args.url.removeprefix("http://"))
    failed = False
    for model in catalog["models"]:
        if "refused" in model or (only and model["name"] not in only):
            continue
        if "labels" not in model and (args.cache / f"{model['name']}.labels").exists():
            model["labels"] = (args.cache / f"{model['name']}.labels").read_text().split("\n")
        try:
            report = compare(client, args.cache, model)
        except Exception as e:  # noqa: BLE001 - reported per model, the run goes on
            report = {"model": model["name"], "error": f"{type(e).__name__}: {e}"}
            failed = True
        print(json.dumps(report), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
