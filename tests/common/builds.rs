//! nvlibfs-mountd built again with other compile-time settings, as another
//! release would be, for tests that restart to it; and copies of the
//! binaries cargo built, placed where a test may replace them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// nvlibfs-mountd built with `envs` set (each a setting the code reads
/// with `option_env!`), from the source as it is now, once per test
/// process and name. All variants share one target directory of their
/// own, so the binaries other tests use stay as they are (and a variant
/// rebuilds only what its settings change); each is copied out before the
/// next is built, under a lock that test processes running side by side
/// share, and renamed into place (another may be running the last copy).
pub fn variant(name: &str, envs: &[(&str, &str)]) -> PathBuf {
    variant_with(name, envs, &[])
}

/// `variant`, with cargo features of nvlibfs-mountd turned on.
pub fn variant_with(name: &str, envs: &[(&str, &str)], features: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("variants");
    let out = target.join(format!("nvlibfs-mountd-{name}"));
    if built.iter().any(|b| b == name) {
        return out;
    }
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join("build.lock")).unwrap();
    let _building = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking the variants' build: {e}"));
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .args(["build", "--quiet", "-p", "nvlibfs-mountd", "--bin", "nvlibfs-mountd"])
        .env("CARGO_TARGET_DIR", &target);
    for var in ["NVLIBFS_BUILD_ID", "NVLIBFS_TEST_VIEW_LAYOUT", "NVLIBFS_TEST_PROTOCOL"] {
        cargo.env_remove(var);
    }
    cargo.envs(envs.iter().copied());
    if !features.is_empty() {
        cargo.arg("--features").arg(features.join(","));
    }
    super::ok(cargo.output().unwrap(), &format!("building nvlibfs-mountd ({name})"));
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    std::fs::copy(target.join("debug/nvlibfs-mountd"), &partial).unwrap();
    std::fs::rename(&partial, &out).unwrap();
    built.push(name.to_owned());
    out
}

/// nvlibfs-mountd of another handover protocol version, as a release that
/// changed the protocol would be: what a restart or a takeover must refuse.
/// One definition, since every test process shares the build by its name.
pub fn protocol_variant() -> PathBuf {
    variant(
        "protocol",
        &[("NVLIBFS_TEST_PROTOCOL", "1"), ("NVLIBFS_BUILD_ID", "another-protocol")],
    )
}

/// nvlibfs-mountd with its failpoints compiled in (mountd/src/failpoint.rs).
pub fn failpoints_variant() -> PathBuf {
    variant_with("failpoints", &[], &["failpoints"])
}

/// The handover protocol's version this build speaks, as
/// mountd/src/protocol.rs sets it (each change to the protocol bumps it).
pub fn protocol_version() -> u32 {
    let source = include_str!("../../mountd/src/protocol.rs");
    let at = source.find("None => ").expect("the protocol version in protocol.rs") + 8;
    source[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The binaries cargo built, copied where the test may replace them.
pub fn binaries(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    super::nvlibfs(); // builds nvlibfs-mountd beside nvlibfs
    let built = Path::new(env!("CARGO_BIN_EXE_nvlibfs"));
    for name in ["nvlibfs", "nvlibfs-mountd"] {
        std::fs::copy(built.with_file_name(name), bin.join(name)).unwrap();
    }
    bin
}

/// Puts `binary` at `bin/nvlibfs-mountd` the way a package manager does:
/// written beside it, then renamed over it.
pub fn install(binary: &Path, bin: &Path) {
    let staged = bin.join("nvlibfs-mountd.new");
    std::fs::copy(binary, &staged).unwrap();
    std::fs::rename(&staged, bin.join("nvlibfs-mountd")).unwrap();
}
