//! Module version files, version strings and library names: parsed from
//! files and directory entries a host controls.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(v) = nvlibfs::pin::parse_module_version(&text) {
        // A parsed version round-trips and orders without panicking.
        assert_eq!(nvlibfs::pin::DriverVersion::parse(v.as_str()).as_ref(), Some(&v));
        let _ = v.components();
    }
    if let Some(name) = nvlibfs::catalog::parse_library_name(&text) {
        assert!(text.starts_with(name.spec.name));
    }
});
