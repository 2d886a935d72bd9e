//! How long `nvlibfs scan` takes: pin, discovery, ELF checks and building the
//! view. Mount start-up pays this once per generation, so it must stay far
//! below 100 ms for a real 675 MB driver (headers only, no hashing).
//!
//! cargo bench --bench scan                      # a generated fixture driver
//! cargo bench --bench scan -- --driver-root /   # this host's driver, pinned to the loaded module

use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use std::path::PathBuf;
use std::time::Duration;

struct Options {
    driver_root: Option<PathBuf>,
    pin: PinRequest,
    iterations: usize,
}

fn options() -> Options {
    let mut o = Options {
        driver_root: None,
        pin: PinRequest::LoadedModule,
        iterations: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--driver-root" => o.driver_root = Some(value().into()),
            "--driver-version" => o.pin = PinRequest::Version(value()),
            "--module-version-file" => o.pin = PinRequest::ModuleFile(value().into()),
            "--iterations" => o.iterations = value().parse().unwrap_or_else(|_| usage("--iterations takes a number")),
            // cargo bench passes --bench; libtest-style filters are not used here.
            _ => {}
        }
    }
    o
}

fn usage(why: &str) -> ! {
    eprintln!("scan bench: {why}\nusage: scan [--driver-root DIR] [--driver-version V | --module-version-file F] [--iterations N]");
    std::process::exit(2);
}

fn main() {
    let mut o = options();
    let _fixture_dir;
    let root = match o.driver_root.take() {
        Some(root) => root,
        None => {
            let dir = tempfile::tempdir().expect("temp dir");
            let spec = nvlibfs_fixture::FixtureSpec {
                libcuda_bytes: 100 << 20,
                firmware_bytes: 32 << 20,
                stale: Some("570.86.15".into()),
                ..nvlibfs_fixture::FixtureSpec::new("580.159.04")
            };
            let fixture = nvlibfs_fixture::build(&spec, &dir.path().join("host")).expect("fixture builds");
            o.pin = PinRequest::ModuleFile(fixture.module_version_file());
            _fixture_dir = dir;
            fixture.root
        }
    };
    let kernel = KernelInfo::running();
    let mut times: Vec<Duration> = Vec::with_capacity(o.iterations);
    let mut summary = String::new();
    for i in 0..o.iterations.max(1) {
        let plan = match nvlibfs::plan(&root, &o.pin, &kernel) {
            Ok(plan) => plan,
            Err(e) => {
                eprintln!("scan bench: {e}");
                std::process::exit(1);
            }
        };
        if i == 0 {
            let m = plan.view.manifest();
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            summary = format!(
                "driver {} under {}: {} files ({:.0} MiB), {} symlinks, {} rejected",
                m.driver_version,
                m.driver_root,
                m.files.len(),
                bytes as f64 / (1 << 20) as f64,
                m.symlinks.len(),
                plan.rejected.len()
            );
        }
        times.push(plan.elapsed);
    }
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{summary}");
    println!("scan, first run:  {:.2} ms", ms(first));
    if !rest.is_empty() {
        println!(
            "scan, later runs: median {:.2} ms, min {:.2}, max {:.2} ({} runs)",
            ms(rest[rest.len() / 2]),
            ms(rest[0]),
            ms(rest[rest.len() - 1]),
            rest.len()
        );
    }
}
