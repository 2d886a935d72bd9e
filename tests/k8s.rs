//! contrib/k8s checked offline against the official Kubernetes client's
//! models (contrib/k8s/validate.py; no cluster needed), and the check
//! itself shown to catch a misspelt field.

mod common;

use std::process::Command;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/k8s");

fn validate(files: &[std::path::PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(format!("{DIR}/validate.py"))
        .args(files)
        .output()
        .expect("python3 runs (`.ci/run` installs the kubernetes client)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn manifests_load_into_the_kubernetes_client_models() {
    common::require_python_module("kubernetes", "kubernetes pyyaml");
    common::require_python_module("yaml", "kubernetes pyyaml");
    let manifests: Vec<_> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 2);
    let (ok, text) = validate(&manifests);
    assert!(ok, "{text}");
    assert!(text.contains("3 documents checked, 0 problems"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let pod = std::fs::read_to_string(format!("{DIR}/gpu-pod.yaml")).unwrap();
    std::fs::write(&bad, pod.replace("mountPropagation:", "mountPropogation:")).unwrap();
    let (ok, text) = validate(std::slice::from_ref(&bad));
    assert!(
        !ok && text.contains("does not survive"),
        "a misspelt field went unnoticed:\n{text}"
    );

    // A rolling update that would delete the old pod before the new one
    // took the mount over.
    let daemonset = std::fs::read_to_string(format!("{DIR}/nvlibfs-daemonset.yaml")).unwrap();
    assert!(daemonset.contains("maxUnavailable: 0"));
    std::fs::write(&bad, daemonset.replace("maxUnavailable: 0", "maxUnavailable: 1")).unwrap();
    let (ok, text) = validate(std::slice::from_ref(&bad));
    assert!(!ok && text.contains("maxSurge 1, maxUnavailable 0"), "{text}");

    // A liveness probe: the kubelet would kill the supervisor on a slow status.
    std::fs::write(
        &bad,
        daemonset.replace(
            "          readinessProbe:",
            "          livenessProbe:\n            exec:\n              command: [\"nvlibfs\", \"status\", \"/run/nvlibs\"]\n          readinessProbe:",
        ),
    )
    .unwrap();
    let (ok, text) = validate(&[bad]);
    assert!(!ok && text.contains("no liveness probe"), "{text}");
}
