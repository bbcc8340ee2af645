#!/usr/bin/env python3
"""Builds a kustomization to plain YAML, as `kubectl kustomize DIR` would, for the checks.

Neither kubectl nor kustomize can be installed where .ci/check-deploy runs, so this renders the
subset of kustomize that deploy/kubernetes uses, and refuses anything else, so that what is
validated is what `kubectl apply -k` applies:

  resources   files, and directories holding a kustomization.yaml (rendered first)
  namespace   set on every namespaced resource (not on Namespace objects themselves)
  labels      `pairs` added to metadata.labels (includeSelectors and includeTemplates false)
  images      name -> newName / newTag / digest, on containers and initContainers
  patches     strategic merge patches, inline (`patch:`) or from a file (`path:`); the target
              is the resource with the patch's kind and metadata.name

The strategic merge follows Kubernetes' rules for the fields the patches touch: maps merge,
a null deletes a key, lists of containers, initContainers, env, volumes (by name),
volumeMounts (by mountPath) and container ports (by containerPort) merge by key, and every
other list (args, Service and NetworkPolicy ports, ingress rules) is replaced.

    render.py DIR [OUT]     (OUT: a file; default stdout)
"""

import copy
import os
import sys

import yaml

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "resources", "labels", "images", "patches"}

# (parent key, list key) -> merge key. A list under any other key is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


class RenderError(Exception):
    pass


def merge_key(path, key):
    """The merge key of the list at `key` (under `path`), or None when it is replaced."""
    if key in MERGE_KEYS:
        return MERGE_KEYS[key]
    # Container ports merge by containerPort; a Service's or NetworkPolicy's are replaced.
    if key == "ports" and path and path[-1] in ("containers", "initContainers"):
        return "containerPort"
    return None


def strategic_merge(base, patch, path=()):
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise RenderError(f"patch directive {key} at {'/'.join(path)} is not supported here")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, path + (key,))
        elif isinstance(value, list) and isinstance(out.get(key), list) and merge_key(path, key):
            mk = merge_key(path, key)
            merged = copy.deepcopy(out[key])
            for item in value:
                if not isinstance(item, dict) or mk not in item:
                    raise RenderError(f"an item of {key} at {'/'.join(path)} has no {mk}")
                for i, existing in enumerate(merged):
                    if isinstance(existing, dict) and existing.get(mk) == item[mk]:
                        merged[i] = strategic_merge(existing, item, path + (key,))
                        break
                else:
                    merged.append(copy.deepcopy(item))
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: a document without kind or metadata")
    return docs


def pod_spec(resource):
    spec = resource.get("spec", {})
    if resource["kind"] == "Pod":
        return spec
    if resource["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def split_image(image):
    """name, tag, digest of an image reference."""
    name, digest = (image.split("@", 1) + [None])[:2]
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def render(directory):
    kfile = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(kfile):
        raise RenderError(f"{directory}: no kustomization.yaml")
    with open(kfile, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: fields this renderer does not support: {sorted(unknown)}")
    if k.get("kind") != "Kustomization":
        raise RenderError(f"{kfile}: kind is not Kustomization")

    resources = []
    for entry in k.get("resources", []):
        path = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(path):
            resources.extend(render(path))
        elif os.path.isfile(path):
            resources.extend(load_docs(path))
        else:
            raise RenderError(f"{kfile}: resource {entry} not found (remote resources are not supported)")

    def ident(r):
        return (r["kind"], r["metadata"]["name"])

    seen = set()
    for r in resources:
        if ident(r) in seen:
            raise RenderError(f"{kfile}: {ident(r)} appears twice")
        seen.add(ident(r))

    # Patches first (kustomize applies them after resources are gathered, matching by kind and
    # name before the namespace is changed), then namespace, labels and images.
    for p in k.get("patches", []):
        if set(p) - {"patch", "path"}:
            raise RenderError(f"{kfile}: patch fields {sorted(set(p) - {'patch', 'path'})} are not supported")
        if "patch" in p:
            docs = [d for d in yaml.safe_load_all(p["patch"]) if d is not None]
        else:
            docs = load_docs(os.path.join(directory, p["path"]))
        for doc in docs:
            if "op" in doc or isinstance(doc, list):
                raise RenderError(f"{kfile}: JSON 6902 patches are not supported")
            target = [i for i, r in enumerate(resources) if ident(r) == ident(doc)]
            if len(target) != 1:
                raise RenderError(f"{kfile}: patch target {ident(doc)} not found")
            i = target[0]
            if doc.get("apiVersion") != resources[i].get("apiVersion"):
                raise RenderError(f"{kfile}: patch {ident(doc)} has apiVersion {doc.get('apiVersion')}")
            patch = copy.deepcopy(doc)
            patch["metadata"].pop("namespace", None)
            resources[i] = strategic_merge(resources[i], patch)

    ns = k.get("namespace")
    for r in resources:
        if ns and r["kind"] not in CLUSTER_SCOPED:
            r["metadata"]["namespace"] = ns
        for group in k.get("labels", []):
            if set(group) - {"pairs", "includeSelectors", "includeTemplates"} or group.get("includeSelectors") \
                    or group.get("includeTemplates"):
                raise RenderError(f"{kfile}: only labels[].pairs without selectors or templates are supported")
            r["metadata"].setdefault("labels", {}).update(group["pairs"])
        spec = pod_spec(r)
        if spec:
            for image in k.get("images", []):
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    name, tag, digest = split_image(c["image"])
                    if name != image["name"]:
                        continue
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    if "digest" in image:
                        c["image"] = f"{name}@{image['digest']}"
                    else:
                        c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return resources


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    try:
        docs = render(sys.argv[1])
    except (RenderError, yaml.YAMLError, KeyError) as e:
        sys.exit(f"render.py: {e}")
    text = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, explicit_start=True)
    if len(sys.argv) == 3:
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
