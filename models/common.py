"""Helpers shared by the training scripts: ONNX export, drift baselines, tiny image writers."""

import json
import struct
import zlib

import numpy as np


def slots(edges, values):
    """The slot of each value among n bins and two tails: 0 below edges[0], n + 1 above
    edges[-1]; bin i holds edges[i] <= x < edges[i+1], the last bin also x == edges[-1]
    (the rule `runtime/bundle/src/drift.rs` applies on devices)."""
    edges = np.asarray(edges, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    i = np.searchsorted(edges, values, side="right")
    n = len(edges) - 1
    i[(i == n + 1) & (values == edges[-1])] = n
    return i


def shares(counts, digits=6):
    """Counts as shares rounded to `digits`, the rounding residue moved into the largest share
    so they still sum to 1."""
    p = np.round(np.asarray(counts, dtype=np.float64) / np.sum(counts), digits)
    p[np.argmax(p)] += round(1.0 - float(p.sum()), digits)
    return [round(float(x), digits) for x in p]


def summary(values):
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(values.mean()), 6),
        "std": round(float(values.std()), 6),
        "min": round(float(values.min()), 6),
        "max": round(float(values.max()), 6),
        "count": int(values.size),
    }


def histogram(values, bins=10):
    """Baseline of a continuous drift feature: edges at the training deciles (for bins=10),
    the expected share of underflow, each bin and overflow, and summary statistics."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.round(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)), 6))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + 1.0])
    # The training extremes round onto the outer edges: widen them by a rounding step so
    # every training value falls inside.
    edges[0] = min(edges[0], np.floor(values.min() * 1e6) / 1e6)
    edges[-1] = max(edges[-1], np.ceil(values.max() * 1e6) / 1e6)
    counts = np.bincount(slots(edges, values), minlength=len(edges) + 1)
    return {"edges": [float(e) for e in edges], "proportions": shares(counts), **summary(values)}


def categorical(values, classes):
    """Baseline of a class-valued feature (0 .. classes-1): one unit-wide bin per class."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.arange(classes + 1, dtype=np.float64) - 0.5
    counts = np.bincount(slots(edges, values), minlength=classes + 2)
    return {"edges": [float(e) for e in edges], "proportions": shares(counts), **summary(values)}


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")


def write_pgm(path, pixels):
    """Binary PGM (P5), 8-bit."""
    h, w = pixels.shape
    with open(path, "wb") as f:
        f.write(b"P5\n# written by models/common.py\n%d %d\n255\n" % (w, h))
        f.write(pixels.astype(np.uint8).tobytes())


def write_png(path, pixels):
    """8-bit grayscale PNG with no dependencies beyond zlib."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def export_classifier(clf, sample):
    """A fitted scikit-learn classifier as ONNX, the way the digits guest calls it: input
    `input`, output `probabilities` (no ZipMap, no label lookup)."""
    from skl2onnx import to_onnx

    onx = to_onnx(
        clf,
        initial_types=None,
        X=sample,
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.input[0].name = "input"
    for node in onx.graph.node:
        node.input[:] = ["input" if i == "X" else i for i in node.input]
    return keep_output(onx, "probabilities", "probabilities")


def keep_output(model, old_name, new_name):
    """Cuts the graph down to what computes `old_name`, exposed as the only output `new_name`.

    skl2onnx appends converter-specific tails (a label lookup through ai.onnx.ml
    ArrayFeatureExtractor, a reshape to one column for regressors) that the guest does not need;
    the exported model keeps only the plain tensor maths.
    """
    import onnx
    from onnx import helper, utils

    model = onnx.shape_inference.infer_shapes(model)
    model = utils.Extractor(model).extract_model([i.name for i in model.graph.input], [old_name])
    for node in model.graph.node:
        node.output[:] = [new_name if o == old_name else o for o in node.output]
    model.graph.output[0].name = new_name
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(model.graph, opset_imports=opsets, producer_name="outpost models/")
    onnx.checker.check_model(model)
    return model
