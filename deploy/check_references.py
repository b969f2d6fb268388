#!/usr/bin/env python3
"""Cross-references of the Kubernetes manifests under deploy/k8s (PyYAML only).

The schemas are checked by scripts/check_manifests.sh (kubernetes-validate);
this checks what a schema cannot see, the fields Keel relies on against each
other: apiVersion/kind/name,
containers with image, ports, gRPC probes and resources, selectors that match
pod labels, ConfigMap/Secret references (names and keys) that exist, a
PodDisruptionBudget per Deployment, HPA targets, and placeholder secrets.

Before checking, it runs a self-test: known defects injected into a copy of
the manifests must each be reported (so the checker cannot pass vacuously).

Usage: check_references.py [DIR]   (default: deploy/k8s next to this script)
"""

import copy
import pathlib
import re
import sys

import yaml

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load(directory):
    docs = []
    files = sorted(pathlib.Path(directory).glob("*.yaml"))
    if not files:
        raise SystemExit(f"no manifests in {directory}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    docs.append((f"{path.name}#{i}", doc))
    return docs


def quantity(value):
    """CPU or memory quantity as a float in base units (cores or bytes)."""
    s = str(value)
    units = {
        "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    }
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"not a quantity: {s!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def check(docs):
    errors = []

    def err(where, msg):
        errors.append(f"{where}: {msg}")

    by_kind = {}
    for where, doc in docs:
        if not isinstance(doc, dict):
            err(where, "not a mapping")
            continue
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = (doc.get("metadata") or {}).get("name")
        if not kind or not api or not name:
            err(where, "apiVersion, kind and metadata.name are required")
            continue
        if kind in API_VERSIONS and api != API_VERSIONS[kind]:
            err(where, f"{kind} should be apiVersion {API_VERSIONS[kind]}, not {api}")
        if not DNS_1123.match(str(name)) or len(str(name)) > 63:
            err(where, f"metadata.name {name!r} is not a DNS-1123 label")
        if name in by_kind.setdefault(kind, {}):
            err(where, f"duplicate {kind} {name}")
        by_kind[kind][name] = (where, doc)

    configmaps = {n: (d.get("data") or {}) for n, (_, d) in by_kind.get("ConfigMap", {}).items()}
    secrets = {}
    for n, (where, d) in by_kind.get("Secret", {}).items():
        data = dict(d.get("stringData") or {})
        data.update(d.get("data") or {})
        secrets[n] = data
        for key, value in data.items():
            if "FAKE" not in str(value):
                err(where, f"Secret {n} key {key}: committed values must be fake placeholders")

    def ref_ok(where, source, kind, name, key=None):
        store = configmaps if kind == "ConfigMap" else secrets
        if name not in store:
            err(where, f"{source} refers to missing {kind} {name!r}")
        elif key is not None and key not in store[name]:
            err(where, f"{source} refers to missing key {key!r} of {kind} {name}")

    pods = {}  # deployment name -> (labels, ports by name/number, replicas)
    for name, (where, d) in by_kind.get("Deployment", {}).items():
        spec = d.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if not selector:
            err(where, "spec.selector.matchLabels is required")
        for k, v in selector.items():
            if labels.get(k) != v:
                err(where, f"selector {k}={v} does not match the pod template labels")
        pod = template.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for vname, v in volumes.items():
            if "configMap" in v:
                cm = v["configMap"].get("name")
                ref_ok(where, f"volume {vname}", "ConfigMap", cm)
                for item in v["configMap"].get("items") or []:
                    ref_ok(where, f"volume {vname}", "ConfigMap", cm, item.get("key"))
            if "secret" in v:
                sn = v["secret"].get("secretName")
                ref_ok(where, f"volume {vname}", "Secret", sn)
                for item in v["secret"].get("items") or []:
                    ref_ok(where, f"volume {vname}", "Secret", sn, item.get("key"))
        containers = pod.get("containers") or []
        if not containers:
            err(where, "at least one container is required")
        ports = {}
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            if not c.get("name") or not c.get("image"):
                err(cw, "name and image are required")
            cports = c.get("ports") or []
            if not cports:
                err(cw, "ports are required")
            for p in cports:
                number = p.get("containerPort")
                if not isinstance(number, int) or not 0 < number < 65536:
                    err(cw, f"containerPort {number!r} is not a port number")
                ports[number] = number
                if p.get("name"):
                    ports[p["name"]] = number
            for probe in ("readinessProbe", "livenessProbe"):
                grpc = (c.get(probe) or {}).get("grpc")
                if not grpc:
                    err(cw, f"{probe} must be a native gRPC probe")
                elif grpc.get("port") not in [p.get("containerPort") for p in cports]:
                    err(cw, f"{probe} port {grpc.get('port')} is not a container port")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        err(cw, f"resources.{part}.{r} is required")
            for r in ("cpu", "memory"):
                try:
                    req = quantity(res["requests"][r])
                    lim = quantity(res["limits"][r])
                    if req > lim:
                        err(cw, f"{r} request exceeds its limit")
                except (KeyError, TypeError):
                    pass
                except ValueError as e:
                    err(cw, str(e))
            for source in c.get("envFrom") or []:
                if "configMapRef" in source:
                    ref_ok(cw, "envFrom", "ConfigMap", source["configMapRef"].get("name"))
                if "secretRef" in source:
                    ref_ok(cw, "envFrom", "Secret", source["secretRef"].get("name"))
            seen = set()
            for e in c.get("env") or []:
                ename = e.get("name", "")
                if not ENV_NAME.match(ename):
                    err(cw, f"env name {ename!r} is invalid")
                if ename in seen:
                    err(cw, f"env {ename} is set twice")
                seen.add(ename)
                source = e.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    ref_ok(cw, f"env {ename}", "Secret", ref.get("name"), ref.get("key"))
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    ref_ok(cw, f"env {ename}", "ConfigMap", ref.get("name"), ref.get("key"))
                if "value" not in e and not source:
                    err(cw, f"env {ename} has neither value nor valueFrom")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    err(cw, f"volumeMount {m.get('name')} has no volume")
        pods[name] = (labels, ports, spec.get("replicas", 1))

    def selected(selector):
        return [n for n, (labels, _, _) in pods.items()
                if selector and all(labels.get(k) == v for k, v in selector.items())]

    for name, (where, d) in by_kind.get("Service", {}).items():
        targets = selected((d.get("spec") or {}).get("selector") or {})
        if not targets:
            err(where, "selector matches no Deployment's pods")
        for p in (d.get("spec") or {}).get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for t in targets:
                if target not in pods[t][1]:
                    err(where, f"targetPort {target!r} is not a port of {t}")

    covered = set()
    for name, (where, d) in by_kind.get("PodDisruptionBudget", {}).items():
        spec = d.get("spec") or {}
        targets = selected((spec.get("selector") or {}).get("matchLabels") or {})
        if not targets:
            err(where, "selector matches no Deployment's pods")
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            err(where, "exactly one of minAvailable and maxUnavailable is required")
        for t in targets:
            covered.add(t)
            min_available = spec.get("minAvailable")
            if isinstance(min_available, int) and min_available >= pods[t][2]:
                err(where, f"minAvailable {min_available} would block every eviction of {t}")
    for name in pods:
        if name not in covered:
            err(by_kind["Deployment"][name][0], "no PodDisruptionBudget selects this Deployment")

    for name, (where, d) in by_kind.get("HorizontalPodAutoscaler", {}).items():
        spec = d.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        if ref.get("kind") != "Deployment" or ref.get("name") not in pods:
            err(where, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} does not exist")
        if not spec.get("metrics"):
            err(where, "metrics are required")
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            err(where, "minReplicas exceeds maxReplicas")

    return errors


def self_test(docs):
    """Each injected defect must be reported, and only then is a pass trusted."""

    def find(kind, name=None):
        for i, (_, d) in enumerate(docs):
            if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
                return i
        raise SystemExit(f"self-test: no {kind} {name or ''} to mutate")

    def container(d):
        return d["spec"]["template"]["spec"]["containers"][0]

    dep = find("Deployment")
    defects = {
        "missing readiness probe": (dep, lambda d: container(d).pop("readinessProbe")),
        "HTTP liveness probe": (dep, lambda d: container(d).__setitem__(
            "livenessProbe", {"httpGet": {"path": "/", "port": 80}})),
        "selector not matching labels": (dep, lambda d: d["spec"]["selector"]["matchLabels"]
                                         .__setitem__("app.kubernetes.io/name", "nope")),
        "no memory limit": (dep, lambda d: container(d)["resources"]["limits"].pop("memory")),
        "no image": (dep, lambda d: container(d).pop("image")),
        "missing secret key": (dep, lambda d: container(d).setdefault("env", []).append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "keel-secrets", "key": "NOPE"}}})),
        "missing configmap": (dep, lambda d: container(d).setdefault("envFrom", []).append(
            {"configMapRef": {"name": "nope"}})),
        "real-looking secret": (find("Secret"), lambda d: d["stringData"].__setitem__(
            "DATABASE_URL", "postgres://keel:hunter2@db/keel")),
        "no metadata.name": (dep, lambda d: d["metadata"].pop("name")),
        "PDB blocking every eviction": (find("PodDisruptionBudget"),
                                        lambda d: d["spec"].__setitem__("minAvailable", 100)),
    }
    if check(docs):
        return  # the real check reports these
    for what, (index, mutate) in defects.items():
        broken = copy.deepcopy(docs)
        mutate(broken[index][1])
        if not check(broken):
            raise SystemExit(f"self-test failed: a manifest with '{what}' passed the checks")


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "k8s"
    try:
        docs = load(directory)
    except yaml.YAMLError as e:
        raise SystemExit(f"YAML error: {e}")
    self_test(docs)
    errors = check(docs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    kinds = sorted({d["kind"] for _, d in docs})
    print(f"{len(docs)} manifests OK ({', '.join(kinds)})")


if __name__ == "__main__":
    main()
