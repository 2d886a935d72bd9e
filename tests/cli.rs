//! The `nvlibfs` command as a newcomer meets it: help that describes every
//! argument and agrees with the README, quiet ends on closed pipes, errors
//! that say what is needed (root, which mount point, which version is on
//! disk), `umount` touching only what nvlibfs made, `check` asking the
//! daemon, and the demo's closing hints working when pasted.

mod common;

use common::{mount_command, nvlibfs, ok, Mounted, UnmountOnDrop, SERIAL, VERSION};
use nvlibfs_fixture::{build, FixtureSpec};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const STALE: &str = "570.86.15";
const NOBODY: [&str; 4] = ["--reuid", "65534", "--regid", "65534"];

fn readme(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nvlibfs ARGS` run as the unprivileged user nobody.
fn nvlibfs_as_nobody(args: &[&std::ffi::OsStr]) -> Output {
    common::require("setpriv", "util-linux");
    Command::new("setpriv")
        .args(NOBODY)
        .arg("--clear-groups")
        .arg(env!("CARGO_BIN_EXE_nvlibfs"))
        .args(args)
        .env_remove("NVLIBFS_LOG")
        .output()
        .unwrap()
}

/// Runs `cmd` with its standard output a pipe whose read end is already
/// closed: what `cmd | head -1` does to everything after the first line.
fn into_closed_pipe(cmd: &mut Command) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, which we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    cmd.stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// Ends as `seq 1 100000 | head -1` ends seq: killed by SIGPIPE, with
/// nothing said about it.
fn assert_quiet_on_closed_pipe(what: &str, out: &Output) {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{what}: ended with {} instead of SIGPIPE:\n{stderr}",
        out.status
    );
    for noise in ["panicked", "Broken pipe", "os error 32"] {
        assert!(!stderr.contains(noise), "{what} said {noise:?}:\n{stderr}");
    }
}

/// The subcommands `nvlibfs [PATH] --help` lists, by name.
fn subcommands(path: &[&str]) -> Vec<String> {
    let help = ok(nvlibfs().args(path).arg("--help").output().unwrap(), "--help");
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Arguments and options in a help text that have no description: an entry
/// line (`  -x, --long <V>`, `      --long`, `  <ARG>`) with no text after
/// its name and no more-indented line under it.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let entry = line.trim_start();
        if !(2..=6).contains(&indent) || !(entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('[')) {
            continue;
        }
        // Only `[default: ...]` or `[possible values: ...]` is no description.
        let describes = |t: &str| !t.trim().is_empty() && !t.trim().starts_with('[');
        let same_line = entry.split_once("  ").is_some_and(|(_, rest)| describes(rest));
        let next_line = lines.get(i + 1).is_some_and(|next| {
            let next_indent = next.len() - next.trim_start().len();
            describes(next) && next_indent > indent + 2
        });
        if !same_line && !next_line {
            missing.push(entry.trim().to_owned());
        }
    }
    missing
}

#[test]
fn every_command_argument_and_option_is_described() {
    let mut commands: Vec<Vec<String>> = vec![vec![]];
    let mut i = 0;
    while i < commands.len() {
        let path: Vec<&str> = commands[i].iter().map(String::as_str).collect();
        for sub in subcommands(&path) {
            let mut deeper = commands[i].clone();
            deeper.push(sub);
            commands.push(deeper);
        }
        i += 1;
    }
    let names: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
    for expected in [
        "scan",
        "mount",
        "umount",
        "status",
        "check",
        "cdi generate",
        "completions",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} not found in {names:?}");
    }
    let mut problems = Vec::new();
    for command in &commands {
        for flag in ["--help", "-h"] {
            let help = ok(nvlibfs().args(command).arg(flag).output().unwrap(), "help");
            for entry in undescribed(&help) {
                problems.push(format!("nvlibfs {} {flag}: {entry}", command.join(" ")));
            }
        }
        // The other way in, `nvlibfs help SUB`, shows the same text.
        if !command.is_empty() {
            let via_help = ok(nvlibfs().arg("help").args(command).output().unwrap(), "help SUB");
            assert!(undescribed(&via_help).is_empty(), "{via_help}");
        }
    }
    assert!(problems.is_empty(), "undescribed:\n{}", problems.join("\n"));
    // The parser is not vacuous.
    let sample = "Arguments:\n  <SHELL>  [possible values: bash, zsh]\n\nOptions:\n      --bare\n      \
        --state-dir <DIR>\n          [default: /run]\n  -h, --help  Print help\n";
    assert_eq!(
        undescribed(sample),
        ["<SHELL>  [possible values: bash, zsh]", "--bare", "--state-dir <DIR>"]
    );
}

#[test]
fn help_readme_and_docker_flags_give_the_same_examples() {
    let flags = ok(
        nvlibfs()
            .args(["docker-flags", "--mountpoint", "/run/nvlibs"])
            .output()
            .unwrap(),
        "docker-flags",
    );
    let volume = "/run/nvlibs:/usr/local/nvidia:ro,rslave";
    assert!(flags.contains(&format!("--volume={volume}\n")), "{flags}");
    let mount_help = ok(nvlibfs().args(["mount", "--help"]).output().unwrap(), "mount --help");
    assert!(mount_help.contains(&format!("-v {volume} ")), "{mount_help}");

    // The README's `docker run` in "Use it" is what docker-flags prints,
    // devices aside (they depend on the host).
    let readme = readme("README.md");
    let use_it = &readme[readme.find("## Use it").unwrap()..];
    let use_it = &use_it[..use_it[3..].find("\n## ").unwrap()];
    for line in flags.lines().filter(|l| !l.starts_with("--device=")) {
        let short = line.replacen("--volume=", "-v ", 1).replacen("--env=", "-e ", 1);
        assert!(use_it.contains(&short), "README's Use it lacks {short:?}:\n{use_it}");
    }

    // Every volume given anywhere a user copies from keeps rslave, so a
    // wholly new daemon's mount reaches running containers.
    let main_help = ok(nvlibfs().arg("--help").output().unwrap(), "--help");
    let docs = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"))
        .unwrap()
        .map(|e| format!("docs/{}", e.unwrap().file_name().to_string_lossy()));
    let mut texts: Vec<(String, String)> = [
        ("README.md", readme.clone()),
        ("contrib/README.md", self::readme("contrib/README.md")),
        ("mount --help", mount_help.clone()),
        ("docker-flags", flags.clone()),
    ]
    .map(|(n, t)| (n.to_owned(), t))
    .into();
    texts.extend(docs.map(|d| (d.clone(), self::readme(&d))));
    for (name, text) in texts {
        let words: Vec<&str> = text.split_whitespace().collect();
        for (i, word) in words.iter().enumerate() {
            let spec = match word.strip_prefix("--volume=") {
                Some(spec) => spec,
                None if *word == "-v" && i + 1 < words.len() => words[i + 1],
                None => continue,
            };
            let spec = spec.trim_end_matches(['`', ',', ')']);
            // The view, wherever it goes in: a new daemon's mount must reach
            // it. (The daemon's own container binds it rshared, so that its
            // mount reaches the host.)
            if spec.starts_with("/run/nvlibs:") && spec != "/run/nvlibs:/run/nvlibs:rshared" {
                assert!(spec.ends_with(":ro,rslave"), "{name}: volume {spec} without rslave");
            }
        }
    }

    // One NVLIBFS_LOG example, in the same words.
    let example = "NVLIBFS_LOG=nvlibfs=debug,nvlibfs_mountd=debug,fuser=info";
    let logging = "Logging: -v, -vv or -vvv, or NVLIBFS_LOG with a tracing filter";
    assert!(
        main_help.contains(logging) && main_help.contains(example),
        "{main_help}"
    );
    assert!(readme.contains(logging), "README's logging line differs");
    for text in [&readme, &main_help] {
        for (at, _) in text.match_indices("NVLIBFS_LOG=") {
            assert!(
                text[at..].starts_with(example),
                "another NVLIBFS_LOG example: {}",
                &text[at..at + 60]
            );
        }
    }
}

#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let root = fixture.root.to_str().unwrap().to_owned();
    let vf = fixture.module_version_file().to_str().unwrap().to_owned();
    let empty_dev = dir.path().join("dev");
    std::fs::create_dir(&empty_dev).unwrap();
    let dev = empty_dev.to_str().unwrap();
    let scan = ["scan", "--driver-root", &root, "--module-version-file", &vf];
    let scan_json = ["scan", "--json", "--driver-root", &root, "--module-version-file", &vf];
    let commands: [&[&str]; 7] = [
        &scan,
        &scan_json,
        &["manpage"],
        &["completions", "bash"],
        &["docker-flags", "--mountpoint", "/"],
        &["cdi", "generate", "--dev", dev],
        &["--help"],
    ];
    for args in commands {
        let out = into_closed_pipe(nvlibfs().args(args));
        assert_quiet_on_closed_pipe(&args.join(" "), &out);
    }
}

#[test]
fn umount_removes_only_what_nvlibfs_mounted() {
    common::require_fixture_tools();
    common::require("mount", "mount");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let state = dir.path().join("state");
    let umount = |path: &Path| {
        nvlibfs()
            .arg("umount")
            .arg("--state-dir")
            .arg(&state)
            .arg(path)
            .output()
            .unwrap()
    };
    let mounted_at = |path: &Path| nvlibfs::mountinfo::at(path);

    // A tmpfs nvlibfs never made, even with nvlibfs's marker copied in.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "foreign"])
            .arg(&foreign)
            .output()
            .unwrap(),
        "mount tmpfs",
    );
    std::fs::write(foreign.join(".nvlibfs"), "").unwrap();
    let out = umount(&foreign);
    let still = mounted_at(&foreign);
    let _ = Command::new("umount").arg(&foreign).output();
    assert!(!out.status.success(), "unmounted a foreign tmpfs");
    assert!(still.is_some(), "the foreign tmpfs was unmounted");
    let err = text(&out.stderr);
    assert!(
        err.contains("not an nvlibfs mount point") && err.contains("tmpfs"),
        "{err}"
    );

    // A plain directory.
    let out = umount(dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not a mount point"),
        "{}",
        text(&out.stderr)
    );

    // A real one, at a path with a space in it.
    let mountpoint = dir.path().join("with space").join("mnt");
    ok(
        mount_command(&fixture, &state).arg(&mountpoint).output().unwrap(),
        "nvlibfs mount",
    );
    let _cleanup = UnmountOnDrop(mountpoint.clone(), state.clone());
    let mountpoint = std::fs::canonicalize(&mountpoint).unwrap();
    let live = mountpoint.join(".live");
    let mut suggested = Vec::new();
    for (inside, what) in [
        (live.clone(), "the FUSE mount inside the nvlibfs mount point"),
        (mountpoint.join("lib64"), "inside the nvlibfs mount point"),
        (live.join("bin"), "inside the nvlibfs mount point"),
    ] {
        let out = umount(&inside);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "umount {inside:?} succeeded");
        assert!(err.contains(what), "{err}");
        let instead = err
            .trim()
            .split_once("pass the mount point itself: ")
            .unwrap_or_else(|| panic!("does not say what to pass instead: {err}"))
            .1;
        suggested.push(instead.to_owned());
        let fuse = mounted_at(&live).expect("the FUSE mount stays");
        assert!(fuse.source == "nvlibfs" && fuse.fs_type.starts_with("fuse"), "{fuse:?}");
    }
    assert!(mountpoint.join("lib64/libcuda.so.1").exists(), "the view broke");

    // What it says to run instead is one command, and it works as printed.
    suggested.dedup();
    assert_eq!(suggested.len(), 1, "{suggested:?}");
    ok(
        Command::new("sh").arg("-c").arg(&suggested[0]).output().unwrap(),
        &suggested[0],
    );
    assert!(mounted_at(&live).is_none() && mounted_at(&mountpoint).is_none());
}

#[test]
fn without_root_each_command_says_that_root_is_needed() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mounted::new(FixtureSpec::new(VERSION), &[]);

    // Mount: says so before it creates anything, even where it could.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (mountpoint, state, log) = (
        open.path().join("mnt"),
        open.path().join("state"),
        open.path().join("mount.log"),
    );
    let out = nvlibfs_as_nobody(&[
        "mount".as_ref(),
        "--driver-root".as_ref(),
        m.fixture.root.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--log-file".as_ref(),
        log.as_os_str(),
        mountpoint.as_os_str(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root (or CAP_SYS_ADMIN)"), "{err}");
    let left: Vec<PathBuf> = std::fs::read_dir(open.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "a refused mount left {left:?}");

    // Status and check: "may not ask" is not "nothing is served".
    let state_dir = m.state_dir.as_os_str();
    // `command --state-dir STATE MOUNTPOINT` as nobody: fails, and says why.
    let refused = |command: &str| {
        let out = nvlibfs_as_nobody(&[
            command.as_ref(),
            "--state-dir".as_ref(),
            state_dir,
            m.mountpoint.as_os_str(),
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        err
    };
    let err = refused("status");
    assert!(
        err.contains("only root may ask the daemon") && err.contains("names host paths"),
        "{err}"
    );
    assert!(!err.contains("no nvlibfs daemon"), "{err}");

    let out = nvlibfs_as_nobody(&[
        "check".as_ref(),
        "--mountpoint".as_ref(),
        m.mountpoint.as_os_str(),
        "--state-dir".as_ref(),
        state_dir,
    ]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("only root may ask the daemon") && report.contains("run it as root: sudo"),
        "{report}"
    );
    assert!(!report.contains("no nvlibfs daemon"), "{report}");

    // Restart signals root's supervisor: it says that, not that status
    // names host paths.
    let err = refused("restart");
    assert!(
        err.contains("restarting needs root: it signals the daemon's supervisor") && err.contains("sudo "),
        "{err}"
    );
    assert!(!err.contains("host paths"), "{err}");

    // As root, where nothing serves: the other message.
    let out = nvlibfs()
        .arg("status")
        .arg("--state-dir")
        .arg(&m.state_dir)
        .arg(m.dir.path())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no nvlibfs daemon serves"),
        "{err}"
    );

    // And status, served, survives a closed pipe like the rest.
    for format in ["text", "json", "prometheus"] {
        let out = into_closed_pipe(
            nvlibfs()
                .args(["status", "--format", format, "--state-dir"])
                .arg(&m.state_dir)
                .arg(&m.mountpoint),
        );
        assert_quiet_on_closed_pipe(&format!("status --format {format}"), &out);
    }
}

#[test]
fn scan_and_mount_agree_on_a_pinned_version_with_no_files() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec {
        stale: Some(STALE.into()),
        ..FixtureSpec::new(VERSION)
    };
    let fixture = build(&spec, &dir.path().join("host")).unwrap();
    let root = std::fs::canonicalize(&fixture.root).unwrap();
    // 580.159.4 is not 580.159.04: file names carry the version verbatim.
    // The message names where it looked, and what it found there.
    let expected = format!(
        "no driver library of version 580.159.4 under {}; looked in /etc/ld.so.cache, /usr/lib/x86_64-linux-gnu, \
         /usr/lib/x86_64-linux-gnu/vdpau, /usr/lib, /usr/bin, /lib/firmware/nvidia; found {VERSION} in \
         /usr/lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu/vdpau; {STALE} in /usr/lib/x86_64-linux-gnu, \
         /usr/lib/x86_64-linux-gnu/vdpau",
        root.display()
    );
    for json in [false, true] {
        let mut scan = nvlibfs();
        scan.arg("scan")
            .arg("--driver-root")
            .arg(&root)
            .args(["--driver-version", "580.159.4"]);
        if json {
            scan.arg("--json");
        }
        let out = scan.output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "scan (json: {json}): {err}");
        assert!(err.contains(&expected), "scan (json: {json}): {err}");
        if json {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report still comes");
            assert_eq!(report["driver_version"], "580.159.4");
        }
    }
    let mountpoint = dir.path().join("mnt");
    let out = nvlibfs()
        .arg("mount")
        .arg("--driver-root")
        .arg(&root)
        .args(["--driver-version", "580.159.4", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg(&mountpoint)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "mount: {err}");
    assert!(err.contains(&expected), "mount: {err}");
    assert!(nvlibfs::mountinfo::at(&mountpoint).is_none());

    // With nothing of any version there, both say that too.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let out = nvlibfs()
        .arg("scan")
        .arg("--driver-root")
        .arg(&bare)
        .args(["--driver-version", VERSION])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "looked in nothing: none of the places where drivers are installed exists; \
             found no NVIDIA driver libraries of any version"
        ),
        "{err}"
    );
}

#[test]
fn check_asks_the_daemon_and_suggests_commands_that_run() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let root = std::fs::canonicalize(&fixture.root).unwrap();
    let vf = root.join("sys/module/nvidia/version");
    let state = dir.path().join("state");
    let mountpoint = dir.path().join("mnt");
    let check = || check(&mountpoint, &state);

    // Not served yet: given the driver flags, check suggests a mount that
    // carries all of them, and it runs as printed.
    let out = nvlibfs()
        .arg("check")
        .arg("--driver-root")
        .arg(&root)
        .arg("--module-version-file")
        .arg(&vf)
        .arg("--mountpoint")
        .arg(&mountpoint)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let suggested = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("-> start it: "))
        .unwrap_or_else(|| panic!("no mount suggested:\n{report}"))
        .to_owned();
    for needed in ["--driver-root", "--module-version-file", "--state-dir"] {
        assert!(suggested.contains(needed), "{suggested}");
    }
    ok(
        Command::new("sh").arg("-c").arg(&suggested).output().unwrap(),
        &suggested,
    );
    let _cleanup = UnmountOnDrop(mountpoint.clone(), state.clone());

    // Served: with no driver flags, check takes the daemon's.
    let out = check();
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}\n{}", text(&out.stderr));
    assert!(
        report.contains(&format!(
            "Driver flags    --driver-root {} --module-version-file {}",
            root.display(),
            vf.display()
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!("Loaded module   {VERSION} (from {})", vf.display())),
        "{report}"
    );
    assert!(
        report.contains(&format!("On disk         {VERSION} (under {})", root.display())),
        "{report}"
    );
}

#[test]
fn cdi_generate_warns_when_it_finds_no_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = nvlibfs()
        .args(["cdi", "generate", "--dev"])
        .arg(dir.path())
        .output()
        .unwrap();
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the spec is still written");
    assert_eq!(spec["devices"].as_array().map(Vec::len), Some(1), "only `all`");
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: no NVIDIA GPU device nodes") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
    assert!(err.contains("--dev DIR"), "does not say what to pass: {err}");
}

/// The demo, run with the binaries built for this test, ends with hints
/// that work when pasted into a shell as they are.
#[test]
fn the_demos_closing_hints_run_as_printed() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_nvlibfs")).parent().unwrap();
    // The demo generates its fake driver with the fixture's binary.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "nvlibfs-fixture", "--bin", "nvlibfs-fixture"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    ok(build.output().unwrap(), "building nvlibfs-fixture");
    let _ = nvlibfs(); // builds the daemon beside it, as for every mount test

    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("demo mount");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/demo.sh"))
        .env("NVLIBFS_DEMO_BIN", bin_dir)
        .env("NVLIBFS_DEMO_DIR", dir.path())
        .env("NVLIBFS_DEMO_MOUNT", &mountpoint)
        .env_remove("NVLIBFS_LOG")
        .output()
        .unwrap();
    let shown = ok(out, "contrib/demo.sh");
    let hints = &shown[shown.find("stays mounted").expect("the closing hints")..];
    let nvlibfs_path = bin_dir.join("nvlibfs");
    let commands: Vec<&str> = hints
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&*nvlibfs_path.to_string_lossy()))
        .collect();
    assert_eq!(commands.len(), 3, "status, check, umount:\n{hints}");
    assert!(commands[2].contains(" umount "), "{hints}");
    for command in commands {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        ok(out, command);
    }
    assert!(nvlibfs::mountinfo::at(&mountpoint).is_none(), "still mounted");
    // The demo logs beside its fake driver, not in the default state
    // directory, so that `--clean` takes everything it wrote.
    let stray = nvlibfs::control::log_path(Path::new(nvlibfs::control::DEFAULT_STATE_DIR), &mountpoint);
    assert!(!stray.exists(), "the demo left {}", stray.display());
    assert!(dir.path().join("nvlibfs.log").exists());
    // The docker hint's flags, too (no engine needed to print them).
    let flags = hints
        .lines()
        .find_map(|l| l.trim().strip_prefix("docker run $(")?.split_once(") IMAGE"))
        .map(|(flags, _)| flags.to_owned())
        .unwrap_or_else(|| panic!("no docker hint:\n{hints}"));
    let out = Command::new("sh").arg("-c").arg(&flags).output().unwrap();
    let warned = String::from_utf8_lossy(&out.stderr).contains("no GPU");
    let printed = ok(out, &flags);
    assert!(printed.contains(":/usr/local/nvidia:ro,rslave"), "{printed}");
    // With no /dev/nvidia* here, the flags give no GPU, and it says so.
    assert_eq!(warned, common::nvidia_nodes().is_empty(), "{printed}");

    // --clean, after the demo again (mounted): nothing mounted, nothing left.
    let demo = || {
        let mut c = Command::new("bash");
        c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/demo.sh"))
            .env("NVLIBFS_DEMO_BIN", bin_dir)
            .env("NVLIBFS_DEMO_DIR", dir.path())
            .env("NVLIBFS_DEMO_MOUNT", &mountpoint)
            .env_remove("NVLIBFS_LOG");
        c
    };
    ok(demo().output().unwrap(), "contrib/demo.sh, again");
    ok(demo().arg("--clean").output().unwrap(), "contrib/demo.sh --clean");
    assert!(
        nvlibfs::mountinfo::at(&mountpoint).is_none(),
        "--clean left the view mounted"
    );
    assert!(!dir.path().exists(), "--clean left {}", dir.path().display());
}

/// `nvlibfs check` of `mountpoint`, asking daemons of `state`.
fn check(mountpoint: &Path, state: &Path) -> Output {
    nvlibfs()
        .arg("check")
        .arg("--mountpoint")
        .arg(mountpoint)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

/// A fixture driver, and a state directory and a mount point (canonical,
/// as messages name it) for it, in a directory of their own.
fn fixture_to_mount() -> (tempfile::TempDir, nvlibfs_fixture::Fixture, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = build(&FixtureSpec::new(VERSION), &dir.path().join("host")).unwrap();
    let state = dir.path().join("state");
    let mountpoint = std::fs::canonicalize(dir.path()).unwrap().join("mnt");
    (dir, fixture, state, mountpoint)
}

/// The server and the supervisor are named the same way everywhere (the
/// mount's message, `status`, `check`, a refused second mount); the
/// counts of `scan` and `mount` agree; the counters say they are the
/// server's; and where nothing answers for a mount point, `check`,
/// `status` and `docker-flags` say what is served instead, or that a
/// mount was left by a daemon that is gone, and no lock file is left.
#[test]
fn both_processes_and_unserved_mount_points_are_named_alike_everywhere() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, fixture, state, mountpoint) = fixture_to_mount();
    let other = mountpoint.with_file_name("not-mounted");
    let lock = nvlibfs::control::lock_path(&state, &mountpoint);

    // A mount that fails (a mount point that is not empty) leaves no lock.
    std::fs::create_dir_all(mountpoint.join("something")).unwrap();
    let out = mount_command(&fixture, &state).arg(&mountpoint).output().unwrap();
    assert!(!out.status.success(), "mounted on a non-empty directory");
    assert!(!lock.exists(), "a failed mount left {}", lock.display());
    let takeover = nvlibfs::control::takeover_path(&state, &mountpoint);
    assert!(!takeover.exists(), "a failed mount left {}", takeover.display());
    std::fs::remove_dir(mountpoint.join("something")).unwrap();

    let said = ok(
        mount_command(&fixture, &state).arg(&mountpoint).output().unwrap(),
        "mount",
    );
    let _cleanup = UnmountOnDrop(mountpoint.clone(), state.clone());
    // `nvlibfs COMMAND --state-dir STATE MOUNTPOINT`.
    let on_mount = |command: &str| {
        nvlibfs()
            .arg(command)
            .arg("--state-dir")
            .arg(&state)
            .arg(&mountpoint)
            .output()
            .unwrap()
    };
    let s = common::status_of(&state, &mountpoint);
    let supervisor = s.supervisor_pid.expect("a supervisor");
    let pids = format!("server pid {}, supervisor pid {supervisor}", s.pid);
    assert!(said.contains(&pids), "{said}");
    let scanned = ok(
        nvlibfs()
            .arg("scan")
            .arg("--driver-root")
            .arg(&fixture.root)
            .arg("--module-version-file")
            .arg(fixture.module_version_file())
            .output()
            .unwrap(),
        "scan",
    );
    assert!(scanned.contains(&format!("Files ({}, ", s.files)), "{scanned}");
    assert!(said.contains(&format!("({} files, ", s.files)), "{said}");

    let shown = ok(on_mount("status"), "status");
    assert!(
        shown.contains(&format!("({pids}, nvlibfs ")) && shown.contains("server up "),
        "{shown}"
    );
    let checked = text(&check(&mountpoint, &state).stdout);
    assert!(checked.contains(&pids), "{checked}");
    let refused = mount_command(&fixture, &state).arg(&mountpoint).output().unwrap();
    let err = text(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains(&format!("(supervisor pid {supervisor})")),
        "{err}"
    );

    // From another PID namespace the daemon's pids name other processes:
    // restart refuses rather than signal one of them.
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--"])
        .arg(env!("CARGO_BIN_EXE_nvlibfs"))
        .args(["restart", "--state-dir"])
        .arg(&state)
        .arg(&mountpoint)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another PID namespace") && err.contains("--take-over"),
        "{err}"
    );
    assert_eq!(common::status_of(&state, &mountpoint).supervisor_pid, Some(supervisor));

    // Counters are the server's: after a restart, status says so.
    ok(on_mount("restart"), "restart");
    let shown = ok(on_mount("status"), "status");
    assert!(shown.contains("refused writes, since the last handover"), "{shown}");

    // Where nothing answers: what is served instead.
    let out = check(&other, &state);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(&format!("no nvlibfs daemon serves {}", other.display()))
            && report.contains("nvlibfs serves ")
            && report.contains(&mountpoint.display().to_string()),
        "{report}"
    );
    let flags = |given: Option<&Path>| {
        let mut c = nvlibfs();
        c.arg("docker-flags");
        if let Some(given) = given {
            c.arg("--mountpoint").arg(given);
        }
        c.output().unwrap()
    };
    let out = flags(Some(&mountpoint));
    // Nothing on stderr but, on a machine without GPU nodes, that notice.
    let said: Vec<String> = text(&out.stderr)
        .lines()
        .filter(|l| !(common::nvidia_nodes().is_empty() && l.starts_with("nvlibfs: no /dev/nvidia* device node")))
        .map(str::to_owned)
        .collect();
    assert!(out.status.success() && said.is_empty(), "{}", text(&out.stderr));
    let out = flags(Some(&other));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("serves nothing at {}", other.display())), "{err}");
    assert!(text(&out.stdout).contains(&format!("--volume={}:", other.display())));
    if nvlibfs::mountinfo::at(Path::new("/run/nvlibs")).is_none() {
        let out = flags(None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("nothing is served at /run/nvlibs (the default --mountpoint)")
                && err.contains(&mountpoint.display().to_string())
                && err.contains("--mountpoint DIR"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }

    // Both processes killed: a mount left behind, and what removes it.
    let s = common::status_of(&state, &mountpoint);
    for pid in [supervisor, s.pid] {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while [supervisor, s.pid]
        .iter()
        .any(|&p| nvlibfs::control::process_running(p))
    {
        assert!(std::time::Instant::now() < deadline, "the daemon outlived SIGKILL");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = on_mount("status");
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("left from a daemon that is gone")
            && err.contains(&format!("`nvlibfs umount {}`", mountpoint.display())),
        "{err}"
    );
    assert!(lock.exists(), "a killed daemon cannot remove its lock file");
    ok(on_mount("umount"), "umount");
    assert!(!lock.exists(), "umount left the killed daemon's lock file");
}

/// SIGINT to a foreground daemon is logged as SIGINT, and the daemon
/// ends having removed its lock file and its takeover socket.
#[test]
fn sigint_is_logged_as_sigint() {
    common::require_fixture_tools();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, fixture, state, mountpoint) = fixture_to_mount();
    let log = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let mut daemon = mount_command(&fixture, &state)
        .arg("--foreground")
        .arg(&mountpoint)
        .stderr(log)
        .spawn()
        .unwrap();
    let _cleanup = UnmountOnDrop(mountpoint.clone(), state.clone());
    common::wait_for("the foreground daemon to serve", || {
        nvlibfs::control::query(&state, &mountpoint).is_ok()
    });
    let supervisor = common::status_of(&state, &mountpoint)
        .supervisor_pid
        .expect("a supervisor");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor as i32), nix::sys::signal::SIGINT).unwrap();
    let status = daemon.wait().unwrap();
    let logged = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(status.success(), "{status}:\n{logged}");
    assert!(logged.contains("SIGINT: unmounting"), "{logged}");
    assert!(!logged.contains("SIGTERM"), "{logged}");
    assert!(
        !nvlibfs::control::lock_path(&state, &mountpoint).exists(),
        "the lock file stayed"
    );
    let takeover = nvlibfs::control::takeover_path(&state, &mountpoint);
    assert!(!takeover.exists(), "{} stayed", takeover.display());
}

/// `contrib/test.sh --clean` removes what the tests leave: the cache, the
/// users the rootless tests made (and their subordinate ids), and of the
/// packages the script installed those still there; it says what before it
/// starts, in the words the test command's notice uses. Run in namespaces
/// of its own (a copy of /etc, an empty /home, its own PIDs, no Docker
/// engine), so that the machine's users, caches and images stay.
#[test]
fn test_sh_clean_removes_what_the_tests_leave() {
    common::require("unshare", "util-linux");
    common::require("useradd", "passwd");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("rootless-docker")).unwrap();
    std::fs::write(cache.join("inner-bookworm-minbase-1.tar"), "a cached root").unwrap();
    std::fs::write(cache.join("installed-packages"), "nvlibfs-no-such-package\n").unwrap();
    let script = format!(
        r#"set -e
        mount --make-rprivate /
        cp -a /etc {d}/etc && mount --bind {d}/etc /etc
        mkdir {d}/home {d}/mail && mount --bind {d}/home /home && mount --bind {d}/mail /var/mail
        for user in nvlibfs-rootless dockremap; do
            id "$user" >/dev/null 2>&1 || useradd -m "$user"
            grep -q "^$user:" /etc/subuid || echo "$user:1500000:65536" >>/etc/subuid
        done
        {root}/contrib/test.sh --clean
        for user in nvlibfs-rootless dockremap; do
            if id "$user" >/dev/null 2>&1; then echo "user $user stayed"; fi
            if grep "^$user:" /etc/subuid /etc/subgid; then echo "$user's ids stayed"; fi
        done
        [ ! -e {cache} ] || echo "the cache stayed"
        echo checked"#,
        d = dir.path().display(),
        root = env!("CARGO_MANIFEST_DIR"),
        cache = cache.display()
    );
    // podman's store too is one of its own, empty: --clean must not remove
    // the images of tests running beside this one.
    let storage = dir.path().join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/podman-graph\"\nrunroot = \"{d}/podman-run\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--mount-proc", "bash", "-c", &script])
        .env("NVLIBFS_TEST_CACHE", &cache)
        .env("CONTAINERS_STORAGE_CONF", &storage)
        .env("DOCKER_HOST", format!("unix://{}/no-docker.sock", dir.path().display()))
        .output()
        .unwrap();
    let (said, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{said}\n{err}");
    assert_eq!(said.trim(), "checked", "{err}");
    for named in [
        format!("{} (", cache.display()),
        "docker images nvlibfs-test-*".into(),
        "podman images nvlibfs-*".into(),
        "users nvlibfs-rootless (with its /run/user/UID)".into(),
        "and (dockerd's) dockremap; podman's image store in /var/lib/containers".into(),
        "a Python venv with the kubernetes client and pyyaml".into(),
        "packages this script installed: nvlibfs-no-such-package".into(),
    ] {
        assert!(err.contains(&named), "--clean does not name {named:?}:\n{err}");
    }
    assert!(
        !err.contains("apt-get"),
        "removed a package that is not installed:\n{err}"
    );
    // The test command's notice is the same list.
    let notice = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/test.sh")).unwrap();
    assert!(
        notice
            .contains("echo \"test.sh: the tests leave behind (contrib/test.sh --clean removes it):\"\n    leftovers"),
        "test.sh no longer prints what the tests leave before it starts"
    );
}
