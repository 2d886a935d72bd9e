//! Puts the git revision into `nvlibfs --version`, so a bug report says
//! exactly which code runs. Outside a git checkout (a source tarball) it
//! says so instead of failing the build.

fn main() {
    // A build outside the checkout (contrib/release.sh builds in a Debian
    // root where the worktree's .git is out of reach) is told the revision.
    println!("cargo:rerun-if-env-changed=NVLIBFS_GIT_REV");
    if let Ok(rev) = std::env::var("NVLIBFS_GIT_REV") {
        println!("cargo:rustc-env=NVLIBFS_GIT_REV={rev}");
        println!("cargo:rerun-if-env-changed=NVLIBFS_TEST_VIEW_LAYOUT");
        return;
    }
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown revision".to_owned());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    println!(
        "cargo:rustc-env=NVLIBFS_GIT_REV={rev}{}",
        if dirty { "-dirty" } else { "" }
    );
    // Read with option_env! (a layout for tests only, src/view.rs); with
    // a build script, cargo rebuilds for a changed variable only if told.
    println!("cargo:rerun-if-env-changed=NVLIBFS_TEST_VIEW_LAYOUT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
}
