#!/usr/bin/env python3
"""The kubelet's side of a GPU node, over containerd's CRI socket: the calls
a kubelet makes for pods (RunPodSandbox, CreateContainer with mounts and
CDI devices, StartContainer, ExecSync as its probes do, StopPodSandbox,
RemovePodSandbox), with a client generated from the CRI's api.proto
(grpcio-tools). Used by tests/cri.rs; each command prints one JSON line.

    kubelet.py SOCKET gpu-pod NAME IMAGE UID (cdi|hostpath VIEW) -- CMD...
    kubelet.py SOCKET daemon-pod NAME IMAGE MANIFEST HOST_PATHS_JSON EXTRA_ARGS_JSON
    kubelet.py SOCKET load-pod NAME IMAGE VIEW BIN_DIR -- CMD...
    kubelet.py SOCKET exec CONTAINER_ID TIMEOUT -- CMD...
    kubelet.py SOCKET remove-pod POD_ID
    kubelet.py SOCKET remove-all
"""
import json
import os
import sys
import time
import uuid

import grpc
import yaml

import api_pb2 as cri
import api_pb2_grpc as cri_grpc


def stub(socket):
    channel = grpc.insecure_channel(f"unix://{socket}")
    return cri_grpc.RuntimeServiceStub(channel)


def sandbox(rt, name, log_dir, privileged=False):
    """A host-network pod (no CNI here), as the kubelet asks for one."""
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="nvlibfs-test", uid=str(uuid.uuid4()), attempt=0),
        log_directory=log_dir,
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.NODE),
                privileged=privileged,
            )
        ),
    )
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    return pod, config


def start(rt, pod, config, name, image, command, mounts=(), cdi=(), uid=None, privileged=False):
    security = cri.LinuxContainerSecurityContext(privileged=privileged)
    if uid is not None:
        security.run_as_user.value = uid
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=image),
        command=command,
        log_path=f"{name}.log",
        mounts=list(mounts),
        CDI_devices=[cri.CDIDevice(name=d) for d in cdi],
        linux=cri.LinuxContainerConfig(security_context=security),
    )
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    return cid


def run_exec(rt, cid, timeout, command):
    started = time.monotonic()
    r = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=command, timeout=timeout))
    return {
        "exit_code": r.exit_code,
        "stdout": r.stdout.decode(errors="replace"),
        "stderr": r.stderr.decode(errors="replace"),
        "ms": round((time.monotonic() - started) * 1000, 1),
    }


# Where pods log (the kubelet keeps /var/log/pods).
LOGS = os.environ.get("NVLIBFS_CRI_LOGS", "/tmp/nvlibfs-test-cri-logs")

PROPAGATION = {
    "HostToContainer": cri.PROPAGATION_HOST_TO_CONTAINER,
    "Bidirectional": cri.PROPAGATION_BIDIRECTIONAL,
    None: cri.PROPAGATION_PRIVATE,
}


def main(argv):
    rt = stub(argv[1])
    what = argv[2]
    if what == "gpu-pod":
        name, image, uid, how = argv[3], argv[4], int(argv[5]), argv[6]
        rest = argv[7:]
        mounts, cdi = [], []
        if how == "cdi":
            cdi = ["nvidia.com/gpu=all"]
        else:
            view = rest.pop(0)
            mounts = [
                cri.Mount(
                    container_path="/usr/local/nvidia",
                    host_path=view,
                    readonly=True,
                    propagation=cri.PROPAGATION_HOST_TO_CONTAINER,
                )
            ]
        command = rest[rest.index("--") + 1 :]
        pod, config = sandbox(rt, name, f"{LOGS}/{name}")
        cid = start(rt, pod, config, name, image, ["sleep", "infinity"], mounts, cdi, uid)
        result = run_exec(rt, cid, 30, command)
        result.update(pod=pod, container=cid)
        print(json.dumps(result))
    elif what == "daemon-pod":
        # The DaemonSet's pod as its manifest says: command, privileges,
        # volumes (host paths given by the test), readiness probe.
        name, image = argv[3], argv[4]
        with open(argv[5]) as f:
            manifest = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "DaemonSet")
        host_paths = json.loads(argv[6])
        extra = json.loads(argv[7])
        spec = manifest["spec"]["template"]["spec"]
        c = spec["containers"][0]
        volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
        mounts = [
            cri.Mount(
                container_path=m["mountPath"],
                host_path=host_paths.get(volumes[m["name"]], volumes[m["name"]]),
                readonly=m.get("readOnly", False),
                propagation=PROPAGATION[m.get("mountPropagation")],
            )
            for m in c["volumeMounts"]
        ]
        privileged = c.get("securityContext", {}).get("privileged", False)
        pod, config = sandbox(rt, name, f"{LOGS}/{name}", privileged)
        cid = start(rt, pod, config, name, image, c["command"] + extra, mounts, privileged=privileged)
        print(json.dumps({"pod": pod, "container": cid, "readiness": c["readinessProbe"]["exec"]["command"]}))
    elif what == "load-pod":
        # A GPU pod whose own process loads the driver (from BIN_DIR) for
        # as long as it runs; its output is its CRI log, LOG_DIR/NAME.log.
        name, image, view, bin_dir = argv[3:7]
        command = argv[argv.index("--") + 1 :]
        mounts = [
            cri.Mount(container_path="/usr/local/nvidia", host_path=view, readonly=True,
                      propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
            cri.Mount(container_path="/loader", host_path=bin_dir, readonly=True),
        ]
        log_dir = f"{LOGS}/{name}"
        pod, config = sandbox(rt, name, log_dir)
        cid = start(rt, pod, config, name, image, command, mounts)
        print(json.dumps({"pod": pod, "container": cid, "log": f"{log_dir}/{name}.log"}))
    elif what == "exec":
        cid, timeout = argv[3], int(argv[4])
        command = argv[argv.index("--") + 1 :]
        print(json.dumps(run_exec(rt, cid, timeout, command)))
    elif what == "remove-pod":
        # As the kubelet deletes a pod: each container stopped with the
        # grace period (SIGTERM, then SIGKILL), then the sandbox.
        listed = rt.ListContainers(
            cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=argv[3]))
        ).containers
        for c in listed:
            rt.StopContainer(cri.StopContainerRequest(container_id=c.id, timeout=30))
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=argv[3]))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=argv[3]))
        print(json.dumps({"removed": argv[3]}))
    elif what == "remove-all":
        for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            main([argv[0], argv[1], "remove-pod", p.id])
    else:
        raise SystemExit(f"kubelet.py: unknown command {what}")


if __name__ == "__main__":
    main(sys.argv)
