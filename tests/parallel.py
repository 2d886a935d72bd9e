#!/usr/bin/env python3
"""Runs every test binary of `cargo test --workspace` (and the doc tests),
several side by side, for contrib/test.sh.

cargo runs test binaries one after another; most of this suite's time is
spent waiting (for dockerd, systemd, daemons settling), so on two cores
running four at once takes about half as long. Each binary's output goes
to target/test-logs/NAME.log; a line is printed as each ends, and the
whole output of each that failed at the end. Tests that share a cache
entry (a Debian root, a docker image) take a lock while making it
(tests/common/images.rs), so running them side by side is safe.

NVLIBFS_TEST_JOBS sets how many run at once (default: twice the CPUs,
at least 4). Exits 1 if any binary failed, as `cargo test --no-fail-fast`.
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

# The longest binaries, as measured on a 2-core machine (seconds, serial):
# started first, so that the short ones fill in around them.
LONGEST = ["failpoints", "dind26", "handover_exact", "takeover", "core_model", "systemd", "cri",
           "rootless", "mount", "toolkit", "handover", "install", "lifecycle"]


def say(text):
    print(f"test.sh: {text}", file=sys.stderr, flush=True)


def test_binaries():
    """(name, executable, package directory) of each test binary, built."""
    build = subprocess.run(
        ["cargo", "test", "--workspace", "--no-run", "--message-format=json-render-diagnostics"],
        stdout=subprocess.PIPE, text=True)
    if build.returncode != 0:
        sys.exit(build.returncode)
    found = []
    for line in build.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable") \
                or not msg["profile"]["test"]:
            continue
        target = msg["target"]
        kind = target["kind"][0]
        name = target["name"] if kind == "test" else f"{target['name']} ({kind})"
        found.append((name, msg["executable"], os.path.dirname(msg["manifest_path"])))
    rank = {name: i for i, name in enumerate(LONGEST)}
    return sorted(found, key=lambda b: (rank.get(b[0], len(LONGEST)), b[0]))


def run(name, command, cwd, logs):
    log = os.path.join(logs, re.sub(r"[^\w.-]+", "-", name).strip("-") + ".log")
    start = time.monotonic()
    env = dict(os.environ, CARGO_MANIFEST_DIR=cwd)
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    took = time.monotonic() - start
    with open(log) as f:
        text = f.read()
    counts = [tuple(map(int, m)) for m in re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)]
    passed, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    say(f"{'ok    ' if code == 0 else 'FAILED'} {name} ({passed} passed, {failed} failed, {took:.0f} s)")
    return name, code, passed, failed, log


def main():
    start = time.monotonic()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    logs = os.path.join(root, "target", "test-logs")
    os.makedirs(logs, exist_ok=True)
    binaries = test_binaries()
    jobs = int(os.environ.get("NVLIBFS_TEST_JOBS", max(4, 2 * (os.cpu_count() or 1))))
    say(f"running {len(binaries)} test binaries and the doc tests, {jobs} at a time; logs in {logs}")
    work = [(name, [exe], cwd) for name, exe, cwd in binaries]
    work.append(("doc tests", ["cargo", "test", "--workspace", "--doc"], root))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda w: run(*w, logs), work))
    failures = [r for r in results if r[1] != 0]
    for name, _, _, _, log in failures:
        with open(log) as f:
            print(f"\n===== {name} ({log}) =====\n{f.read()}", flush=True)
    passed = sum(r[2] for r in results)
    failed = sum(r[3] for r in results)
    say(f"{passed} tests passed, {failed} failed; {len(results) - len(failures)} of {len(results)} binaries "
        f"passed; {time.monotonic() - start:.0f} s")
    if failures:
        say("failed: " + ", ".join(r[0] for r in failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
