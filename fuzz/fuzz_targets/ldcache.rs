//! The host's /etc/ld.so.cache is untrusted input to a root daemon.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = nvlibfs::ldcache::parse(data) {
        // Every entry must have come from inside the input.
        for e in entries {
            assert!(e.soname.len() <= data.len() && e.path.as_os_str().len() <= data.len());
        }
    }
});
