#!/usr/bin/env python3
"""Offline check of the manifests with the official Kubernetes client's
models: every document deserialises into its model and serialises back to
exactly what was written (a misspelt or misplaced field would be dropped),
and the fields nvlibfs relies on are there. Needs no cluster.

    python3 contrib/k8s/validate.py contrib/k8s/*.yaml
"""
import json
import sys

import yaml
from kubernetes import client


def model_name(doc):
    group_version = doc["apiVersion"].split("/")[-1]
    return "V1" + doc["kind"] if group_version == "v1" else group_version.capitalize() + doc["kind"]


def round_trip(doc):
    api = client.ApiClient()

    obj = api.deserialize(json.dumps(doc), model_name(doc), "application/json")
    return api.sanitize_for_serialization(obj)


def check(path):
    problems = []
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        what = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        back = round_trip(doc)
        if back != doc:
            problems.append(f"{what}: does not survive the client's model (misspelt or misplaced field?)\n  wrote {doc}\n  model {back}")
        if doc["kind"] == "DaemonSet":
            c = doc["spec"]["template"]["spec"]["containers"][0]
            if not c.get("securityContext", {}).get("privileged"):
                problems.append(f"{what}: the daemon needs privileged")
            probe = c.get("readinessProbe", {}).get("exec", {}).get("command", [])
            if "status" not in probe or "--here" not in probe:
                problems.append(f"{what}: readiness probe must run nvlibfs status --here (ready once this pod serves)")
            if "livenessProbe" in c:
                problems.append(f"{what}: no liveness probe: its failure kills the supervisor that holds the mount")
            if "--take-over" not in c.get("command", []):
                problems.append(f"{what}: the daemon must start with --take-over, so an update takes the mount over")
            rolling = doc["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
            if rolling.get("maxSurge") != 1 or rolling.get("maxUnavailable") != 0:
                problems.append(f"{what}: updates must roll with maxSurge 1, maxUnavailable 0 (new pod beside the old)")
            props = {m["mountPath"]: m.get("mountPropagation") for m in c["volumeMounts"]}
            if props.get("/run/nvlibs") != "Bidirectional":
                problems.append(f"{what}: /run/nvlibs needs Bidirectional propagation")
            if "/run/nvlibfs" not in props:
                problems.append(f"{what}: /run/nvlibfs (the state directory) must be the node's, shared by old and new pods")
        if doc["kind"] == "Pod":
            for c in doc["spec"]["containers"]:
                mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
                view = mounts.get("/usr/local/nvidia")
                if not view or view.get("mountPropagation") != "HostToContainer" or not view.get("readOnly"):
                    problems.append(f"{what}: /usr/local/nvidia must be read-only with HostToContainer")
    return len(docs), problems


def main():
    total, problems = 0, []
    for path in sys.argv[1:]:
        n, p = check(path)
        total += n
        problems += p
    for p in problems:
        print(p)
    print(f"{total} documents checked, {len(problems)} problems")
    return 1 if problems or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
