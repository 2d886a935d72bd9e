//! The install script, the .deb it builds, and what they install: both
//! binaries, a man page and completions generated from the clap
//! definitions, the systemd unit; `--version` names the git revision.

mod common;

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bin_dir() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nvlibfs")).parent().unwrap()
}

#[test]
fn install_puts_every_piece_in_place() {
    let dest = tempfile::tempdir().unwrap();
    // The daemon binary belongs to another package; build it if needed.
    if let Ok(cargo) = std::env::var("CARGO") {
        run(Command::new(cargo).args(["build", "--quiet", "-p", "nvlibfs-mountd"]));
    }
    run(Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/install.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .env("DESTDIR", dest.path())
        .env("PREFIX", "/usr/local"));
    let root = dest.path().join("usr/local");
    for bin in ["bin/nvlibfs", "bin/nvlibfs-mountd"] {
        assert!(root.join(bin).is_file(), "{bin}");
    }
    let man = std::fs::read_to_string(root.join("share/man/man1/nvlibfs.1")).unwrap();
    assert!(man.contains(".TH nvlibfs 1"), "{man}");
    assert!(man.contains("scan") && man.contains("mount") && man.contains("status"));
    let bash = std::fs::read_to_string(root.join("share/bash-completion/completions/nvlibfs")).unwrap();
    assert!(bash.contains("_nvlibfs") && bash.contains("--driver-root"));
    assert!(root.join("share/zsh/vendor-completions/_nvlibfs").is_file());
    assert!(root.join("share/fish/vendor_completions.d/nvlibfs.fish").is_file());
    let licence = std::fs::read_to_string(root.join("share/doc/nvlibfs/LICENSE")).unwrap();
    assert!(licence.contains("Apache License"), "{licence}");
    let unit = std::fs::read_to_string(dest.path().join("lib/systemd/system/nvlibfs.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/nvlibfs mount --foreground /run/nvlibs"),
        "{unit}"
    );

    let version = run(Command::new(root.join("bin/nvlibfs")).arg("--version"));
    assert!(
        version.starts_with(&format!("nvlibfs {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(
        !version.contains("unknown revision"),
        "built from git, so the revision is known: {version}"
    );
}

#[test]
fn the_deb_package_holds_the_same_files() {
    common::require("dpkg-deb", "dpkg");
    let out = tempfile::tempdir().unwrap();
    if let Ok(cargo) = std::env::var("CARGO") {
        run(Command::new(cargo).args(["build", "--quiet", "-p", "nvlibfs-mountd"]));
    }
    run(Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/install.sh"))
        .args(["--deb", "--bin-dir"])
        .arg(bin_dir())
        .env("DEB_DIR", out.path()));
    let deb = std::fs::read_dir(out.path()).unwrap().next().unwrap().unwrap().path();
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains("Package: nvlibfs") && info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))));
    // The glibc floor is the newest GLIBC_ version the binaries ask for:
    // a package of this machine's build must not install where it cannot run.
    let needs = run(Command::new("readelf")
        .args(["-V", "--wide"])
        .arg(bin_dir().join("nvlibfs"))
        .arg(bin_dir().join("nvlibfs-mountd")));
    let newest = needs
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0), v))
        })
        .max()
        .map(|(_, _, v)| v)
        .expect("the binaries use glibc");
    assert!(
        info.contains(&format!("Depends: libc6 (>= {newest})")),
        "the package should depend on libc6 >= {newest}:\n{info}"
    );
    let files = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for f in [
        "./usr/bin/nvlibfs",
        "./usr/bin/nvlibfs-mountd",
        "./usr/share/man/man1/nvlibfs.1",
        "./lib/systemd/system/nvlibfs.service",
        "./usr/share/doc/nvlibfs/LICENSE",
    ] {
        assert!(files.contains(f), "{f} missing from the package:\n{files}");
    }
}
