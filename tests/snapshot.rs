//! A view rebuilt from its snapshot and its held files is the same view:
//! the same paths at the same inode numbers with the same attributes,
//! links and manifest. That is what lets a replacement daemon answer for
//! every inode the kernel still holds.

mod common;

use nvlibfs::discover::KernelInfo;
use nvlibfs::pin::PinRequest;
use nvlibfs::view::{NodeKind, View};
use nvlibfs_fixture::{build, FixtureSpec};

fn describe(view: &View) -> Vec<String> {
    view.walk()
        .into_iter()
        .map(|(path, ino)| {
            let attr = view.attr(ino).unwrap();
            let extra = match &view.node(ino).unwrap().kind {
                NodeKind::Symlink(t) => format!("-> {}", t.display()),
                NodeKind::File(f) => format!("{} {:?} {:?}", f.source, f.library.map(|l| l.name), f.soname),
                NodeKind::Dir(_) => String::new(),
            };
            format!("{} {ino} {attr:?} {extra}", path.display())
        })
        .collect()
}

#[test]
fn a_view_restored_from_its_snapshot_is_the_same_view() {
    common::require_fixture_tools();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = FixtureSpec::new(common::VERSION);
    spec.lib32 = true;
    let fixture = build(&spec, &dir.path().join("host")).unwrap();
    let plan = nvlibfs::plan(
        &fixture.root,
        &PinRequest::ModuleFile(fixture.module_version_file()),
        &KernelInfo::running(),
    )
    .unwrap();
    let mut view = plan.view;
    // A directory added after the build (where a mount names its CDI
    // spec) too, and the generated ld.so.cache, a sealed memfd.
    let cdi = view.add_dir(std::path::Path::new(nvlibfs::cdi::VIEW_SPEC_DIR));
    let (snapshot, files) = view.snapshot().unwrap();
    assert!(files.len() > 30);
    let copies = files.iter().map(|f| f.try_clone().unwrap()).collect();
    // Through JSON, as it travels between processes.
    let json = serde_json::to_string(&snapshot).unwrap();
    let restored = View::restore(serde_json::from_str(&json).unwrap(), copies).unwrap();
    let (a, b) = (describe(&restored), describe(&view));
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a, b);
    }
    assert_eq!(restored.pin(), view.pin());
    assert_eq!(restored.lookup_path(std::path::Path::new("etc/cdi")), Some(cdi));
    let cache = std::path::Path::new("etc/ld.so.cache");
    let read = |v: &View| {
        let NodeKind::File(file) = &v.node(v.lookup_path(cache).unwrap()).unwrap().kind else {
            panic!("etc/ld.so.cache is not a file")
        };
        let mut bytes = vec![0; file.size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file.file, &mut bytes, 0).unwrap();
        bytes
    };
    assert_eq!(read(&restored), read(&view));
    let (a, b) = (restored.manifest(), view.manifest());
    assert_eq!(serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());

    let err = View::restore(snapshot.clone(), Vec::new()).unwrap_err();
    assert!(err.contains("descriptors"), "{err}");

    // Two descriptors swapped: refused, never served as each other.
    let mut swapped: Vec<std::fs::File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
    swapped.swap(0, 1);
    let err = View::restore(snapshot.clone(), swapped).unwrap_err();
    assert!(err.contains("is not the file that was held"), "{err}");

    // A node whose parent is not an earlier directory: refused.
    let copies = || files.iter().map(|f| f.try_clone().unwrap()).collect::<Vec<_>>();
    let mut bad = snapshot.clone();
    let last = bad.nodes.len() as u64 + 1;
    bad.nodes[0].parent = last;
    let err = View::restore(bad, copies()).unwrap_err();
    assert!(err.contains("not an earlier directory"), "{err}");

    // A field this build does not know: refused, not ignored.
    let mut value = serde_json::to_value(&snapshot).unwrap();
    value["nodes"][0]["layout"] = serde_json::json!("v3");
    assert!(serde_json::from_value::<nvlibfs::view::ViewSnapshot>(value).is_err());
}
