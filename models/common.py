"""Helpers shared by the training scripts: ONNX export, histograms, tiny image writers."""

import json
import struct
import zlib

import numpy as np


def histogram(values, bins=10):
    """Baseline for a drift feature: n+1 ascending edges and n proportions summing to 1."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    proportions = counts / counts.sum()
    return {
        "edges": [round(float(e), 6) for e in edges],
        "proportions": [round(float(p), 6) for p in proportions[:-1]]
        + [round(1.0 - sum(round(float(p), 6) for p in proportions[:-1]), 6)],
    }


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
