//! Follows the loaded kernel module: when its version changes (a module
//! reload after a driver upgrade), builds the new version's view and swaps
//! it in as a new generation, then tells the kernel to forget cached names
//! so new lookups see the new files. Open files keep the old generation.

use crate::served::{Served, FUSE_ROOT};
use fuser::{INodeNo, Notifier};
use nvlibfs::args::DriverArgs;
use nvlibfs::pin::PinRequest;
use nvlibfs::view::{NodeKind, View, ROOT_INO};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// sysfs sends no inotify events for a module reload, so the module's
/// version is polled; 500 ms keeps a re-pin well inside 2 s for a few
/// microseconds of work per poll (one small file read).
pub const POLL: Duration = Duration::from_millis(500);

pub fn watch(driver: DriverArgs, served: Arc<Served>, notifier: Notifier, stop: Arc<AtomicBool>) {
    let request = driver.pin_request();
    if matches!(request, PinRequest::Version(_)) {
        tracing::info!("--driver-version fixes the pin; not following the kernel module");
        return;
    }
    let mut last_error = None;
    while !stop.load(Relaxed) {
        std::thread::sleep(POLL);
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
        let current = served.current();
        let waiting = served.pin_problem().is_some();
        if pinned.version == current.view.pin().version && !waiting {
            continue;
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
        let (view, problem) = if plan.view.has_driver_libraries() {
            (plan.view, None)
        } else if waiting && pinned.version == current.view.pin().version {
            continue; // still waiting for the same version's files
        } else {
            let why = format!(
                "the loaded module is {} but no library of that version is under {}; serving nothing \
                 until they appear",
                pinned.version,
                driver.driver_root.display()
            );
            tracing::warn!("{why}");
            (View::build(pinned, driver.driver_root.clone(), Vec::new()), Some(why))
        };
        let old = served.install(view, problem);
        let new = served.current();
        tracing::info!(from = %old.view.pin().version, to = %new.view.pin().version, "re-pinned");
        for name in root_names(&old.view).union(&root_names(&new.view)) {
            if let Err(e) = notifier.inval_entry(INodeNo(FUSE_ROOT), name) {
                tracing::debug!(?name, "invalidating a cached name: {e}");
            }
        }
        if let Err(e) = notifier.inval_inode(INodeNo(FUSE_ROOT), 0, 0) {
            tracing::debug!("invalidating the root's attributes: {e}");
        }
    }
}

fn root_names(view: &View) -> BTreeSet<OsString> {
    match view.node(ROOT_INO).map(|n| &n.kind) {
        Some(NodeKind::Dir(entries)) => entries.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}
