//! Follows the loaded kernel module: when its version changes (a module
//! reload after a driver upgrade), builds the new version's view and swaps
//! it in as a new generation, then tells the kernel to look the root's
//! names up again, so new lookups see the new files; a second later it
//! deletes the old generation's names below the root, so the old
//! generation is freed as soon as its last user lets go. Open files keep
//! the old generation until then. For a while after each pin it also
//! scans the pinned version again, for files a package manager unpacks
//! after the pin was taken.

use crate::link::Link;
use crate::served::{Deletion, Forgetting, Served, FUSE_ROOT, SPEC_INO};
use fuser::{INodeNo, Notifier};
use nvlibfs::args::{DriverArgs, ServeArgs};
use nvlibfs::pin::PinRequest;
use nvlibfs::view::View;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// sysfs sends no inotify events for a module reload, so the module's
/// version is polled; 500 ms keeps a re-pin well inside 2 s for a few
/// microseconds of work per poll (one small file read).
pub const POLL: Duration = Duration::from_millis(500);

/// How long the pinned version's files are scanned again after a pin (the
/// daemon's start, a re-pin): a package manager unpacks a driver package
/// by package, and a pin taken in between would otherwise serve the part
/// it saw until the module changes again. Quiet that long, it has settled.
pub const SETTLE: Duration = Duration::from_secs(10);

/// Checks every `POLL`, and at once when `wake` says so (SIGHUP); returns
/// when `wake`'s sender is dropped.
///
/// The supervisor gets checkpoints around each swap (see
/// `Served::swap_in`), and one whenever the set of live generations
/// changed (one was freed).
///
/// It also follows the NVIDIA device nodes under `dev`: when they change
/// (`nvidia-uvm` made on first use, a GPU added), the view is built again
/// with a CDI spec that lists them.
pub fn watch(
    driver: DriverArgs,
    serve: ServeArgs,
    fuse_mount: PathBuf,
    served: Arc<Served>,
    notifier: Notifier,
    wake: Receiver<()>,
    link: &Link,
) {
    let request = driver.pin_request();
    let follows_module = !matches!(request, PinRequest::Version(_));
    if !follows_module {
        tracing::info!("--driver-version fixes the pin; not following the kernel module");
    }
    let mut last_error = None;
    let mut checkpointed = served.live_generations();
    let mut settling_since = Some(Instant::now());
    loop {
        match wake.recv_timeout(POLL) {
            Ok(()) => tracing::info!("checking the kernel module's version now (SIGHUP)"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // A retired generation's names, once no path walk can be on its
        // way through them (and again: a process working inside an old
        // directory caches them anew, which would keep it alive).
        let retired = served.retired_names();
        if !retired.is_empty() {
            delete_names(&notifier, &retired);
        }
        // A restart under way: the old and the new server must serve the
        // same generations until one of them serves alone.
        let Some(_repinning) = link.repin() else {
            continue;
        };
        follow_devices(&served, &serve.dev, Some(&notifier), Some(link));
        let live = served.live_generations();
        if live != checkpointed {
            match link.checkpoint(&served) {
                Ok(()) => checkpointed = live,
                Err(e) => tracing::error!("{e}; a server that takes over would start from the previous checkpoint"),
            }
        }
        let pinned = match request.resolve() {
            Ok(p) => {
                last_error = None;
                p
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("cannot read the module version ({msg}); still serving what is pinned");
                    last_error = Some(msg);
                }
                continue;
            }
        };
        let Some(current) = served.current() else { continue };
        let waiting = served.pin_problem().is_some();
        let repin = pinned.version != current.view.pin().version || waiting;
        settling_since = settling_since.filter(|since| since.elapsed() < SETTLE);
        if !repin && settling_since.is_none() {
            continue;
        }
        if repin {
            // A scan that takes long (a slow driver root) holds re-pins,
            // and a restart's freeze waits for it.
            crate::failpoint::hit("server-repin").unwrap_or_else(|e| tracing::error!("{e}"));
        }
        // Pins again from the module, so the view says where its pin came from.
        let plan = match nvlibfs::plan(&driver.driver_root, &request, &nvlibfs::discover::KernelInfo::running()) {
            Ok(plan) => plan,
            Err(e) => {
                tracing::error!("re-pinning to {}: {e}", pinned.version);
                continue;
            }
        };
        let pinned = plan.view.pin().clone();
        let to = pinned.version.clone();
        let (view, problem) = if plan.view.has_driver_libraries() {
            let view = with_spec_dir(plan.view);
            if !repin && !adds_files(&view, &current.view) {
                continue; // settling, and nothing new
            }
            (view, None)
        } else if !repin || (waiting && pinned.version == current.view.pin().version) {
            continue; // still waiting for the same version's files
        } else {
            let why = format!(
                "the loaded module is {} but no library of that version is under {}; serving nothing \
                 until they appear",
                pinned.version,
                driver.driver_root.display()
            );
            tracing::warn!("{why}");
            (
                with_spec_dir(View::build(pinned, driver.driver_root.clone(), Vec::new())),
                Some(why),
            )
        };
        let from = current.view.pin().version.clone();
        let forgetting = match served.swap_in(view, problem, |served| link.checkpoint(served)) {
            Ok(forgetting) => forgetting,
            Err(e) => {
                // What the supervisor does not hold, no successor could
                // serve: the new generation is not made current.
                tracing::error!(
                    "not re-pinning to {to} yet: {e}; trying again in {} ms",
                    POLL.as_millis()
                );
                continue;
            }
        };
        if served.current().is_some_and(|now| now.number == current.number) {
            continue; // no room for another generation; its error says so
        }
        if repin {
            tracing::info!(%from, %to, "re-pinned");
        } else {
            tracing::info!(version = %to, "more of the pinned version's files appeared; serving them too");
        }
        settling_since = Some(Instant::now());
        checkpointed = served.live_generations();
        tell_kernel(&notifier, &forgetting);
        crate::warm::warm(&served, &notifier, &fuse_mount, &serve);
    }
}

/// Whether `scanned` serves every path `served` does and more: files of
/// the pinned version that arrived since. A scan that lacks something
/// served (a file being replaced just then) changes nothing: the served
/// generation holds its files open.
fn adds_files(scanned: &View, served: &View) -> bool {
    let paths =
        |view: &View| -> std::collections::HashSet<PathBuf> { view.walk().into_iter().map(|(p, _)| p).collect() };
    let (scanned, served) = (paths(scanned), paths(served));
    scanned.len() > served.len() && served.is_subset(&scanned)
}

/// A view as a mount serves it: with the directory its CDI spec is named
/// in (the spec itself is beside the generations; see `Served::set_spec`).
pub fn with_spec_dir(mut view: View) -> View {
    view.add_dir(Path::new(nvlibfs::cdi::VIEW_SPEC_DIR));
    view
}

/// Serves a CDI spec that lists the NVIDIA device nodes under `dev` as
/// they are now, if they changed (or nothing is served yet): no new
/// generation, only the spec. The kernel is told to drop what it cached
/// of it, and every `etc/cdi` is deleted in the kernel (the spec's name
/// first, then the directory's; both are looked up again at once, the
/// directory as a new inode, see `Generation::entry`): a runtime watching
/// the directory with inotify (docker's CDI cache) sees it go and reads
/// the spec again. A new spec is
/// checkpointed, so that a successor serves it too; one that is not just
/// makes the successor notice the nodes again.
pub fn follow_devices(served: &Served, dev: &Path, notifier: Option<&Notifier>, link: Option<&Link>) {
    let spec = match nvlibfs::cdi::view_spec(&served.mountpoint, dev) {
        Ok(spec) => spec,
        Err(e) => return tracing::warn!("{e}; the view's CDI spec stays as it is"),
    };
    let first = match served.spec_contents() {
        Some(now) if now == spec.as_bytes() => return,
        now => now.is_none(),
    };
    // Before the new spec: a lookup after it would give the directory its
    // new inode, and the deletions below are of the one watched now.
    if notifier.is_some() {
        cache_spec_names(served);
    }
    if let Err(e) = served.set_spec(spec.as_bytes()) {
        return tracing::error!("making the view's CDI spec: {e}");
    }
    if let Err(e) = link.map_or(Ok(()), |link| link.checkpoint(served)) {
        tracing::error!("{e}; a server that takes over would look at the device nodes again");
    }
    if let Some(notifier) = notifier {
        if let Err(e) = notifier.inval_inode(INodeNo(SPEC_INO), 0, 0) {
            tracing::debug!("invalidating the CDI spec: {e}");
        }
        let name = std::ffi::OsStr::new(nvlibfs::cdi::VIEW_SPEC_NAME);
        let dirs = served.spec_dirs();
        let files: Vec<Deletion> = (dirs.iter())
            .map(|dir| Deletion {
                parent: dir.child,
                child: SPEC_INO,
                name: name.to_owned(),
            })
            .collect();
        delete_names(notifier, &files);
        delete_names(notifier, &dirs);
    }
    if !first {
        tracing::info!("the NVIDIA device nodes changed; serving a CDI spec that lists them");
    }
}

/// Has the kernel look up the current generation's `etc/cdi/nvlibfs.json`
/// through the mount, so that the deletions that follow a new spec find
/// the names cached.
/// A deletion reaches an inotify watcher only through a name the kernel
/// caches, and memory pressure (or `drop_caches`) drops cached names, a
/// watched directory's too (inotify holds its inode, not its name):
/// without this, a runtime watching the spec's directory (docker's CDI
/// cache) hears nothing and goes on with the old spec. The lookup is
/// answered by this server's other threads; this one holds no lock they
/// need. It is made from a child process (see `own_mount`).
fn cache_spec_names(served: &Served) {
    let spec = (served.mountpoint.join(nvlibfs::control::LIVE_DIR))
        .join(nvlibfs::cdi::VIEW_SPEC_DIR)
        .join(nvlibfs::cdi::VIEW_SPEC_NAME);
    if let Some(Err(e)) = crate::own_mount::inodes(&[&spec], false).pop() {
        tracing::debug!("looking up {}: {e}", spec.display());
    }
}

/// Makes the kernel look the root's names up again, and its listing, so
/// new lookups reach the new generation (see `Forgetting`).
pub fn tell_kernel(notifier: &Notifier, forgetting: &Forgetting) {
    for name in &forgetting.root_names {
        if let Err(e) = notifier.inval_entry(INodeNo(FUSE_ROOT), name) {
            tracing::debug!(?name, "invalidating a cached name: {e}");
        }
    }
    if let Err(e) = notifier.inval_inode(INodeNo(FUSE_ROOT), 0, 0) {
        tracing::debug!("invalidating the root's listing: {e}");
    }
}

/// FUSE_NOTIFY_DELETE, not INVAL_ENTRY: it also marks each inode as having
/// no links, so the kernel evicts it (and sends FORGET) as soon as nothing
/// uses it, instead of keeping it cached until memory runs short. Names
/// the kernel does not cache answer ENOENT, which is fine.
fn delete_names(notifier: &Notifier, deletions: &[Deletion]) {
    for d in deletions {
        match notifier.delete(INodeNo(d.parent), INodeNo(d.child), &d.name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::debug!(name = ?d.name, "dropping a cached name: {e}"),
        }
    }
}
