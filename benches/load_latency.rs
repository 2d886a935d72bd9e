//! Library load latency through nvlibfs against the alternatives a user
//! would consider, measured in one run on one machine, as ratios to native.
//!
//!   cargo bench --bench load_latency                 # fixture driver, all servers
//!   cargo bench --bench load_latency -- --driver-root /   # this host's driver: native vs nvlibfs
//!
//! Servers: the native path, a kernel bind mount, bindfs (default and
//! `-o kernel_cache`), squashfuse on an image of the same tree, nvlibfs with
//! passthrough, with `--no-passthrough` and with `--no-passthrough --warm
//! none`. Loads run in fresh processes
//! (this binary re-executed) timing `dlopen(RTLD_NOW)` alone. Drops the page
//! cache machine-wide for the cold rows: run it on a machine you own.
//! Writes a markdown table and an SVG plot of the ratios (`--out DIR`).

use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs::select::FileKind;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__load") => child_load(&args[2..]),
        Some("__cuinit") => child_cuinit(&args[2]),
        _ => bench(&args[1..]),
    }
}

// ---------------------------------------------------------------- children

/// Loads each library with dlopen(RTLD_NOW); with --touch also reads one
/// byte of every page the loader mapped. Prints "dlopen_ns touch_ns" lines.
fn child_load(args: &[String]) {
    let touch = args.iter().any(|a| a == "--touch");
    for lib in args.iter().filter(|a| *a != "--touch") {
        let name = CString::new(lib.as_str()).unwrap();
        let start = Instant::now();
        // SAFETY: dlopen of a library path; the fixture and driver libraries
        // run no harmful constructors.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        let opened = start.elapsed();
        if handle.is_null() {
            // SAFETY: dlerror returns a C string owned by libc.
            let why = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) };
            eprintln!("{lib}: {}", why.to_string_lossy());
            std::process::exit(1);
        }
        // The loader maps the file by its real path (nvlibfs's mount point
        // links into the FUSE mount below it).
        let real = std::fs::canonicalize(lib).map_or_else(|_| lib.clone(), |p| p.display().to_string());
        let touched = if touch { touch_mappings(&real) } else { Duration::ZERO };
        println!("{} {}", opened.as_nanos(), touched.as_nanos());
    }
}

fn touch_mappings(lib: &str) -> Duration {
    let start = Instant::now();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut sum = 0u64;
    for line in maps.lines().filter(|l| l.ends_with(lib)) {
        let range = line.split(' ').next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if !line.split(' ').nth(1).unwrap().starts_with('r') {
            continue;
        }
        for page in (a..b).step_by(4096) {
            // SAFETY: a readable mapping of this process, per /proc/self/maps.
            sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(page as *const u8) } as u64);
        }
    }
    std::hint::black_box(sum);
    start.elapsed()
}

/// dlopen + cuInit + cuDeviceGet + cuCtxCreate in one fresh process; prints ns.
fn child_cuinit(lib: &str) {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuCtxCreate = unsafe extern "C" fn(*mut *mut libc::c_void, u32, i32) -> i32;
    let start = Instant::now();
    let name = CString::new(lib).unwrap();
    // SAFETY: loading libcuda and calling its documented entry points with
    // valid out-pointers.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW);
        assert!(!h.is_null(), "dlopen {lib} failed");
        let sym = |s: &str| libc::dlsym(h, CString::new(s).unwrap().as_ptr());
        let init: CuInit = std::mem::transmute(sym("cuInit"));
        let get: CuDeviceGet = std::mem::transmute(sym("cuDeviceGet"));
        let create: CuCtxCreate = std::mem::transmute(sym("cuCtxCreate_v2"));
        assert_eq!(init(0), 0, "cuInit");
        let mut dev = 0;
        assert_eq!(get(&mut dev, 0), 0, "cuDeviceGet");
        let mut ctx = std::ptr::null_mut();
        assert_eq!(create(&mut ctx, 0, dev), 0, "cuCtxCreate");
    }
    println!("{}", start.elapsed().as_nanos());
}

// ---------------------------------------------------------------- servers

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Native,
    Bind,
    Bindfs,
    BindfsKernelCache,
    Squashfuse,
    NvlibfsPassthrough,
    NvlibfsCached,
    /// The cached path with nothing put in the page cache at mount: what a
    /// library `--warm` does not name, or one whose pages the kernel
    /// reclaimed, costs on its first load.
    NvlibfsCachedUnwarmed,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Bind => "bind mount",
            Kind::Bindfs => "bindfs",
            Kind::BindfsKernelCache => "bindfs -o kernel_cache",
            Kind::Squashfuse => "squashfuse",
            Kind::NvlibfsPassthrough => "nvlibfs (passthrough)",
            Kind::NvlibfsCached => "nvlibfs --no-passthrough",
            Kind::NvlibfsCachedUnwarmed => "nvlibfs --no-passthrough --warm none",
        }
    }

    fn is_nvlibfs(self) -> bool {
        matches!(
            self,
            Kind::NvlibfsPassthrough | Kind::NvlibfsCached | Kind::NvlibfsCachedUnwarmed
        )
    }
}

/// The files every server is asked for, by their path in the view and on the host.
struct Files {
    big: (PathBuf, PathBuf),
    others: Vec<(PathBuf, PathBuf)>,
    firmware: (PathBuf, PathBuf),
    version: String,
    /// Libraries left out because they do not load here even natively.
    skipped: Vec<PathBuf>,
}

struct Env {
    root: PathBuf,
    pin: PinRequest,
    nvlibfs: PathBuf,
    work: PathBuf,
    squash_image: Option<PathBuf>,
    nvlibfs_flags: Vec<String>,
}

struct Server {
    kind: Kind,
    mountpoint: Option<PathBuf>,
}

impl Server {
    /// Where this server shows a file (view path, host source path).
    fn path(&self, env: &Env, (view, host): &(PathBuf, PathBuf)) -> PathBuf {
        match (&self.mountpoint, self.kind.is_nvlibfs()) {
            (None, _) => env.root.join(host),
            (Some(m), true) => m.join(view),
            (Some(m), false) => m.join(host),
        }
    }

    fn mount(env: &Env, kind: Kind) -> (Server, f64) {
        if kind == Kind::Native {
            return (Server { kind, mountpoint: None }, 0.0);
        }
        let mnt = env.work.join(format!("mnt-{kind:?}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let root = env.root.as_os_str();
        let start = Instant::now();
        let mut cmd = match kind {
            Kind::Bind => cmd("mount", &["--bind".as_ref(), root, mnt.as_os_str()]),
            Kind::Bindfs => cmd("bindfs", &[root, mnt.as_os_str()]),
            Kind::BindfsKernelCache => cmd(
                "bindfs",
                &["-o".as_ref(), "kernel_cache".as_ref(), root, mnt.as_os_str()],
            ),
            Kind::Squashfuse => cmd(
                "squashfuse",
                &[env.squash_image.as_ref().unwrap().as_os_str(), mnt.as_os_str()],
            ),
            Kind::NvlibfsPassthrough | Kind::NvlibfsCached | Kind::NvlibfsCachedUnwarmed => {
                let mut c = Command::new(&env.nvlibfs);
                c.args(["mount", "--state-dir"])
                    .arg(env.work.join("state"))
                    .arg("--driver-root")
                    .arg(&env.root);
                match &env.pin {
                    PinRequest::ModuleFile(f) => c.arg("--module-version-file").arg(f),
                    PinRequest::Version(v) => c.args(["--driver-version", v]),
                    PinRequest::LoadedModule => &mut c,
                };
                match kind {
                    Kind::NvlibfsCached => c.arg("--no-passthrough"),
                    Kind::NvlibfsCachedUnwarmed => c.args(["--no-passthrough", "--warm", "none"]),
                    _ => &mut c,
                };
                c.args(&env.nvlibfs_flags);
                c.arg(&mnt);
                c
            }
            Kind::Native => unreachable!(),
        };
        let out = cmd.stdout(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "mounting {}: {}",
            kind.label(),
            String::from_utf8_lossy(&out.stderr)
        );
        // Ready means a lookup is answered.
        while std::fs::read_dir(&mnt).map(|mut d| d.next().is_none()).unwrap_or(true) {
            std::thread::sleep(Duration::from_micros(200));
        }
        let ready_ms = start.elapsed().as_secs_f64() * 1e3;
        (
            Server {
                kind,
                mountpoint: Some(mnt),
            },
            ready_ms,
        )
    }

    fn unmount(&self, env: &Env) {
        if let Some(m) = &self.mountpoint {
            let out = if self.kind.is_nvlibfs() {
                Command::new(&env.nvlibfs)
                    .args(["umount", "--state-dir"])
                    .arg(env.work.join("state"))
                    .arg(m)
                    .output()
            } else {
                Command::new("umount").arg(m).output()
            }
            .unwrap();
            assert!(
                out.status.success(),
                "umount {}: {}",
                m.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            // Let the FUSE daemon exit before the next mount.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bytes nvlibfs's server read for the kernel (READ requests and
    /// the warm-up), from `nvlibfs status --json`.
    fn bytes_read(&self, env: &Env) -> Option<u64> {
        let m = self.mountpoint.as_ref().filter(|_| self.kind.is_nvlibfs())?;
        let out = Command::new(&env.nvlibfs)
            .args(["status", "--json", "--state-dir"])
            .arg(env.work.join("state"))
            .arg(m)
            .output()
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let counters = &status["counters"];
        Some(counters["bytes_read"].as_u64()? + counters["warmed_bytes"].as_u64().unwrap_or(0))
    }

    /// The FUSE daemon's processes (nvlibfs's supervisor and server, or
    /// the one of another server): those whose command line names the
    /// mount point.
    fn daemon_pids(&self) -> Vec<u32> {
        let Some(m) = self.mountpoint.as_ref().and_then(|m| m.to_str()) else {
            return Vec::new();
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                (pid != std::process::id() && args.contains(&m.as_bytes()) && !args[0].ends_with(b"nvlibfs"))
                    .then_some(pid)
            })
            .collect()
    }
}

fn cmd(program: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

// ---------------------------------------------------------------- measuring

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("dropping caches needs root");
}

fn cached_bytes() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// One fresh loader process; per library (dlopen, touch) times.
fn load(libs: &[PathBuf], touch: bool) -> Vec<(Duration, Duration)> {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.arg("__load");
    if touch {
        c.arg("--touch");
    }
    let out = c.args(libs).output().unwrap();
    assert!(out.status.success(), "loader: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (
                Duration::from_nanos(a.parse().unwrap()),
                Duration::from_nanos(b.parse().unwrap()),
            )
        })
        .collect()
}

/// dlopen + cuInit + a first context in a fresh process, in ms.
fn cuinit(libcuda: &Path) -> f64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("__cuinit")
        .arg(libcuda)
        .output()
        .unwrap();
    assert!(out.status.success(), "cuInit: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().unwrap() / 1e6
}

/// One pread of the whole file into a buffer already faulted in.
fn pread_whole(path: &Path) -> Duration {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![1u8; f.metadata().unwrap().len() as usize];
    let start = Instant::now();
    f.read_exact_at(&mut buf, 0).unwrap();
    start.elapsed()
}

fn read_file(path: &Path) -> Duration {
    let start = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    start.elapsed()
}

/// Samples of one row, in the row's unit.
type Samples = Vec<f64>;

struct Row {
    name: String,
    unit: &'static str,
    /// Whether a ratio to native means anything (not for absolute figures).
    ratio: bool,
    by_server: BTreeMap<Kind, Samples>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(s: &Samples) -> (f64, f64, f64) {
    let mut v = s.clone();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

struct Options {
    driver_root: Option<PathBuf>,
    pin: Option<PinRequest>,
    out: PathBuf,
    warm: usize,
    cold: usize,
    nvlibfs: Option<PathBuf>,
    cuinit: bool,
    /// Extra `nvlibfs mount` flags, to measure one lever at a time.
    nvlibfs_flags: Vec<String>,
    /// Only these columns (labels as in the table); all when empty.
    servers: Vec<String>,
}

fn options(args: &[String]) -> Options {
    let mut o = Options {
        driver_root: None,
        pin: None,
        out: PathBuf::from("benches/results"),
        warm: 15,
        cold: 5,
        nvlibfs: None,
        cuinit: false,
        nvlibfs_flags: Vec::new(),
        servers: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--driver-root" => o.driver_root = Some(v().into()),
            "--driver-version" => o.pin = Some(PinRequest::Version(v())),
            "--out" => o.out = v().into(),
            "--warm" => o.warm = v().parse().unwrap_or_else(|_| usage("--warm takes a number")),
            "--cold" => o.cold = v().parse().unwrap_or_else(|_| usage("--cold takes a number")),
            "--nvlibfs" => o.nvlibfs = Some(v().into()),
            "--cuinit" => o.cuinit = true,
            "--nvlibfs-flag" => o.nvlibfs_flags.push(v()),
            "--servers" => o.servers = v().split(',').map(str::to_owned).collect(),
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    o
}

fn usage(why: &str) -> ! {
    eprintln!(
        "load_latency: {why}\nusage: load_latency [--driver-root DIR [--driver-version V] [--cuinit]] \
         [--out DIR] [--warm N] [--cold N] [--nvlibfs PATH] [--nvlibfs-flag FLAG]... \
         [--servers native,nvlibfs --no-passthrough,...]"
    );
    std::process::exit(2);
}

fn find_nvlibfs() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("nvlibfs"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| usage("no nvlibfs binary near this bench; build it or pass --nvlibfs"))
}

fn bench(args: &[String]) {
    let o = options(args);
    let work = tempfile::tempdir().unwrap();
    let _ = std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let (root, pin, kinds, label) = match &o.driver_root {
        Some(root) => (
            root.clone(),
            o.pin.clone().unwrap_or_default(),
            vec![
                Kind::Native,
                Kind::NvlibfsPassthrough,
                Kind::NvlibfsCached,
                Kind::NvlibfsCachedUnwarmed,
            ],
            "this host's driver".to_owned(),
        ),
        None => {
            let spec = nvlibfs_fixture::FixtureSpec {
                libcuda_bytes: 100 << 20,
                firmware_bytes: 72 << 20,
                ..nvlibfs_fixture::FixtureSpec::new("580.159.04")
            };
            let f = nvlibfs_fixture::build(&spec, &work.path().join("host")).expect("fixture builds");
            let kinds = vec![
                Kind::Native,
                Kind::Bind,
                Kind::Bindfs,
                Kind::BindfsKernelCache,
                Kind::Squashfuse,
                Kind::NvlibfsPassthrough,
                Kind::NvlibfsCached,
                Kind::NvlibfsCachedUnwarmed,
            ];
            (
                f.root.clone(),
                PinRequest::ModuleFile(f.module_version_file()),
                kinds,
                "fixture driver".to_owned(),
            )
        }
    };
    let kinds: Vec<Kind> = kinds
        .into_iter()
        .filter(|k| o.servers.is_empty() || *k == Kind::Native || o.servers.iter().any(|s| s == k.label()))
        .collect();
    let mut files = files(&root, &pin);
    // A real driver's graphics libraries need the host's GLVND, X11 and so
    // on; measure the ones this host can load at all.
    let (loadable, skipped): (Vec<_>, Vec<_>) = files.others.drain(..).partition(|(_, host)| {
        Command::new(std::env::current_exe().unwrap())
            .arg("__load")
            .arg(root.join(host))
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    files.others = loadable;
    files.skipped = skipped.into_iter().map(|(view, _)| view).collect();
    let squash_image = kinds.contains(&Kind::Squashfuse).then(|| {
        let img = work.path().join("tree.squashfs");
        let out = Command::new("mksquashfs")
            .arg(&root)
            .arg(&img)
            .args(["-quiet", "-no-progress"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mksquashfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        img
    });
    let env = Env {
        root,
        pin,
        nvlibfs: o.nvlibfs.clone().unwrap_or_else(find_nvlibfs),
        work: work.path().to_owned(),
        squash_image,
        nvlibfs_flags: o.nvlibfs_flags.clone(),
    };
    let big_size = std::fs::metadata(env.root.join(&files.big.1)).unwrap().len();
    let fw_size = std::fs::metadata(env.root.join(&files.firmware.1)).unwrap().len();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |name: String, unit: &'static str, ratio: bool| {
        rows.push(Row {
            name,
            unit,
            ratio,
            by_server: BTreeMap::new(),
        });
        rows.len() - 1
    };
    let big_name = files.big.0.file_name().unwrap().to_string_lossy().into_owned();
    let r_first = row(
        format!("dlopen {big_name} ({:.0} MiB), first load after mount", mib(big_size)),
        "ms",
        true,
    );
    let r_warm = row(format!("dlopen {big_name}, warm"), "ms", true);
    let r_cold = row(format!("dlopen {big_name}, cold (page cache dropped)"), "ms", true);
    let r_others = row(
        format!("dlopen the {} other libraries in one process, warm", files.others.len()),
        "ms",
        true,
    );
    let r_others_cold = row(
        format!("dlopen the {} other libraries, cold", files.others.len()),
        "ms",
        true,
    );
    let r_touch = row(format!("dlopen {big_name} + touch every page, warm"), "ms", true);
    let r_touch_first = row(
        format!("dlopen {big_name} + touch every page, first after mount"),
        "ms",
        true,
    );
    // What no path through a daemon can beat where native first touches
    // map pages already cached: copying the file's bytes once.
    let r_pread_first = row(
        format!("pread {big_name} whole into a buffer, first after mount (native: the copy floor)"),
        "ms",
        true,
    );
    let r_fw = row(
        format!(
            "read firmware {} ({:.0} MiB), warm",
            files.firmware.0.display(),
            mib(fw_size)
        ),
        "ms",
        true,
    );
    let r_fw_cold = row("read firmware, cold".to_owned(), "ms", true);
    let r_conc = row(
        "32 concurrent loaders (all libraries + touch), wall".to_owned(),
        "ms",
        true,
    );
    let r_growth = row("page-cache growth / bytes loaded, cold".to_owned(), "x", true);
    let r_growth_shared = row(
        "page-cache growth / bytes loaded, host copy already cached".to_owned(),
        "x",
        false,
    );
    let r_ready = row("mount to ready".to_owned(), "ms", false);
    let r_rss = row("daemon RSS after the run".to_owned(), "MiB", false);
    let r_cpu = row("daemon CPU time over the run".to_owned(), "ms", false);
    let r_cpu_gib = row(
        "daemon CPU per GiB it read for the kernel, over the run".to_owned(),
        "ms/GiB",
        false,
    );
    let r_cuinit = o
        .cuinit
        .then(|| row("dlopen + cuInit + first context (fresh process)".to_owned(), "ms", true));
    let r_cuinit_first = o.cuinit.then(|| {
        row(
            "dlopen + cuInit + first context, first after mount".to_owned(),
            "ms",
            true,
        )
    });

    for &kind in &kinds {
        eprintln!("load_latency: measuring {}", kind.label());
        let mut put = |r: usize, v: f64| rows[r].by_server.entry(kind).or_default().push(v);
        // First load after a fresh mount (host copy in cache, as on a host in use).
        for _ in 0..o.cold {
            std::fs::read(env.root.join(&files.big.1)).unwrap();
            let (server, ready) = Server::mount(&env, kind);
            let big = server.path(&env, &files.big);
            put(r_first, ms(load(std::slice::from_ref(&big), false)[0].0));
            put(r_ready, ready);
            server.unmount(&env);
            let (server, _) = Server::mount(&env, kind);
            let t = load(std::slice::from_ref(&server.path(&env, &files.big)), true)[0];
            put(r_touch_first, ms(t.0 + t.1));
            server.unmount(&env);
            let (server, _) = Server::mount(&env, kind);
            put(r_pread_first, ms(pread_whole(&server.path(&env, &files.big))));
            server.unmount(&env);
            if let Some(r) = r_cuinit_first {
                let (server, _) = Server::mount(&env, kind);
                put(r, cuinit(&server.path(&env, &files.big)));
                server.unmount(&env);
            }
        }
        let (server, _) = Server::mount(&env, kind);
        let big = server.path(&env, &files.big);
        let others: Vec<PathBuf> = files.others.iter().map(|f| server.path(&env, f)).collect();
        let fw = server.path(&env, &files.firmware);
        load(std::slice::from_ref(&big), true); // warm up
        for _ in 0..o.warm {
            put(r_warm, ms(load(std::slice::from_ref(&big), false)[0].0));
            put(r_others, load(&others, false).iter().map(|t| ms(t.0)).sum());
            let t = load(std::slice::from_ref(&big), true)[0];
            put(r_touch, ms(t.0 + t.1));
            put(r_fw, ms(read_file(&fw)));
        }
        for _ in 0..o.cold {
            drop_caches();
            put(r_cold, ms(load(std::slice::from_ref(&big), false)[0].0));
            drop_caches();
            put(r_others_cold, load(&others, false).iter().map(|t| ms(t.0)).sum());
            drop_caches();
            put(r_fw_cold, ms(read_file(&fw)));
            drop_caches();
            let before = cached_bytes();
            load(std::slice::from_ref(&big), true);
            put(r_growth, cached_bytes().saturating_sub(before) as f64 / big_size as f64);
        }
        // The host already has the library cached; what do mounting and
        // loading it here add? (A warm-up fills the page cache at mount.)
        server.unmount(&env);
        drop_caches();
        std::fs::read(env.root.join(&files.big.1)).unwrap();
        // The daemon's own binaries, read again after the drop, are not the view's.
        for binary in [env.nvlibfs.clone(), env.nvlibfs.with_file_name("nvlibfs-mountd")] {
            let _ = std::fs::read(binary);
        }
        let before = cached_bytes();
        let (fresh, _) = Server::mount(&env, kind);
        let big = fresh.path(&env, &files.big);
        load(std::slice::from_ref(&big), true);
        put(
            r_growth_shared,
            cached_bytes().saturating_sub(before) as f64 / big_size as f64,
        );
        let mut all = vec![big.clone()];
        all.extend(files.others.iter().map(|f| fresh.path(&env, f)));
        for _ in 0..3 {
            let start = Instant::now();
            let children: Vec<_> = (0..32)
                .map(|_| {
                    Command::new(std::env::current_exe().unwrap())
                        .arg("__load")
                        .arg("--touch")
                        .args(&all)
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for mut c in children {
                assert!(c.wait().unwrap().success());
            }
            put(r_conc, ms(start.elapsed()));
        }
        if let Some(r) = r_cuinit {
            for _ in 0..o.cold {
                put(r, cuinit(&big));
            }
        }
        let pids = fresh.daemon_pids();
        if !pids.is_empty() {
            let (mut rss_kb, mut ticks) = (0.0, 0.0);
            for pid in pids {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
                    rss_kb += kb.trim().trim_end_matches("kB").trim().parse::<f64>().unwrap_or(0.0);
                }
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, r)| r.split_whitespace().collect())
                    .unwrap_or_default();
                if fields.len() > 13 {
                    ticks += fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
                }
            }
            put(r_rss, rss_kb / 1024.0);
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            let cpu_ms = ticks / hz * 1e3;
            put(r_cpu, cpu_ms);
            if let Some(bytes) = fresh.bytes_read(&env).filter(|&b| b > 0) {
                put(r_cpu_gib, cpu_ms / (bytes as f64 / (1u64 << 30) as f64));
            }
        }
        fresh.unmount(&env);
    }

    let report = report(&rows, &kinds, &label, &files, &env);
    std::fs::create_dir_all(&o.out).unwrap();
    let name = if o.driver_root.is_some() {
        "load-latency-real-driver"
    } else {
        "load-latency"
    };
    let md = o.out.join(format!("{name}.md"));
    let svg = o.out.join(format!("{name}.svg"));
    std::fs::write(&md, report.replace("PLOT", &svg.file_name().unwrap().to_string_lossy())).unwrap();
    std::fs::write(&svg, plot(&rows, &kinds)).unwrap();
    println!("{}", std::fs::read_to_string(&md).unwrap());
    eprintln!("load_latency: wrote {} and {}", md.display(), svg.display());
}

/// The files to load, from the same plan nvlibfs mounts.
fn files(root: &Path, pin: &PinRequest) -> Files {
    let plan = nvlibfs::plan(root, pin, &KernelInfo::running()).expect("scan of the driver");
    let mut big = None;
    let mut others = Vec::new();
    let mut firmware: Vec<(PathBuf, PathBuf, u64)> = Vec::new();
    for (_, f) in plan.view.files() {
        let pair = (f.view_path.clone(), f.source.relative().to_owned());
        match f.kind {
            FileKind::Lib64 if f.library.is_some_and(|l| l.name == "libcuda") => big = Some(pair),
            FileKind::Lib64 => others.push(pair),
            FileKind::Firmware => firmware.push((pair.0, pair.1, f.size)),
            _ => {}
        }
    }
    firmware.sort_by_key(|f| std::cmp::Reverse(f.2));
    let fw = firmware
        .into_iter()
        .next()
        .map(|(v, h, _)| (v, h))
        .expect("firmware in the view");
    Files {
        big: big.expect("libcuda in the view"),
        others,
        firmware: fw,
        version: plan.view.pin().version.to_string(),
        skipped: Vec::new(),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.to_owned()))
        .unwrap_or_default();
    format!(
        "{cpu}, {} cores, {}, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem.split_whitespace().nth(1).map_or(String::new(), |kb| format!(
            "{:.0} GiB",
            kb.parse::<f64>().unwrap_or(0.0) / (1 << 20) as f64
        )),
        kernel.trim()
    )
}

fn report(rows: &[Row], kinds: &[Kind], label: &str, files: &Files, env: &Env) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Library load latency: nvlibfs against native and the alternatives\n"
    );
    let _ = writeln!(s, "- Machine: {}", machine());
    let _ = writeln!(s, "- Date: {}", date());
    let _ = writeln!(s, "- Driver: {label} {} under `{}`", files.version, env.root.display());
    let _ = writeln!(
        s,
        "- Each cell: median (min–max) and, in bold, the median's ratio to native. Loads run in a fresh \
         process and time `dlopen(RTLD_NOW)` only (plus the page walk where it says so); cold rows drop the \
         page cache first.\n"
    );
    if !files.skipped.is_empty() {
        let names: Vec<String> = files.skipped.iter().map(|p| p.display().to_string()).collect();
        let _ = writeln!(
            s,
            "- Left out (they do not load on this host even natively): {}\n",
            names.join(", ")
        );
    }
    let _ = writeln!(s, "![ratios to native](PLOT)\n");
    let _ = write!(s, "| measurement |");
    for k in kinds {
        let _ = write!(s, " {} |", k.label());
    }
    let _ = write!(s, "\n|---|");
    for _ in kinds {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s);
    for r in rows.iter().filter(|r| !r.by_server.is_empty()) {
        let native = r.by_server.get(&Kind::Native).map(|v| stats(v).0);
        let _ = write!(s, "| {} ({}) |", r.name, r.unit);
        for k in kinds {
            match r.by_server.get(k) {
                Some(v) => {
                    let (med, min, max) = stats(v);
                    let _ = write!(s, " {} ({}–{})", fmt(med), fmt(min), fmt(max));
                    if let (true, Some(n)) = (r.ratio, native) {
                        if n > 0.0 {
                            let _ = write!(s, " **×{:.2}**", med / n);
                        }
                    }
                    let _ = write!(s, " |");
                }
                None => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let _ = writeln!(s);
    }
    s
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Grouped horizontal bars of each server's ratio to native, log scale.
fn plot(rows: &[Row], kinds: &[Kind]) -> String {
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.ratio && r.by_server.contains_key(&Kind::Native))
        .collect();
    let others: Vec<Kind> = kinds.iter().copied().filter(|k| *k != Kind::Native).collect();
    let colors = [
        "#888888", "#d98c1f", "#e8c05a", "#7f5fbf", "#1f8f4f", "#4f9fdf", "#a8cdee",
    ];
    let (left, width, bar, gap) = (450.0, 480.0, 9.0, 14.0);
    let group = others.len() as f64 * bar + gap;
    let height = 60.0 + rows.len() as f64 * group + 40.0;
    let (lo, hi) = (0.05f64.log10(), 300f64.log10());
    let x = |ratio: f64| left + (ratio.clamp(0.05, 300.0).log10() - lo) / (hi - lo) * width;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{height}' font-family='sans-serif' font-size='11'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='10' y='20' font-size='14'>Ratio to native (median; log scale; lower is better)</text>\n",
        left + width + 210.0
    );
    for tick in [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0] {
        let tx = x(tick);
        let _ = writeln!(
            s,
            "<line x1='{tx}' y1='40' x2='{tx}' y2='{}' stroke='{}'/><text x='{tx}' y='{}' text-anchor='middle'>×{tick}</text>",
            height - 30.0,
            if tick == 1.0 { "#000" } else { "#ddd" },
            height - 15.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y0 = 50.0 + i as f64 * group;
        let native = stats(&r.by_server[&Kind::Native]).0;
        let _ = writeln!(
            s,
            "<text x='{}' y='{}' text-anchor='end'>{}</text>",
            left - 8.0,
            y0 + group / 2.0 - 4.0,
            xml(&r.name)
        );
        for (j, k) in others.iter().enumerate() {
            let Some(v) = r.by_server.get(k) else { continue };
            let ratio = if native > 0.0 { stats(v).0 / native } else { 1.0 };
            let y = y0 + j as f64 * bar;
            let _ = writeln!(
                s,
                "<rect x='{}' y='{y}' width='{}' height='{}' fill='{}'/><text x='{}' y='{}' font-size='9'>×{:.2}</text>",
                x(0.05),
                x(ratio) - x(0.05),
                bar - 1.0,
                colors[j % colors.len()],
                x(ratio) + 3.0,
                y + bar - 2.0,
                ratio
            );
        }
    }
    for (j, k) in others.iter().enumerate() {
        let y = 50.0 + j as f64 * 16.0;
        let _ = writeln!(
            s,
            "<rect x='{}' y='{y}' width='10' height='10' fill='{}'/><text x='{}' y='{}'>{}</text>",
            left + width + 10.0,
            colors[j % colors.len()],
            left + width + 24.0,
            y + 9.0,
            xml(k.label())
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
