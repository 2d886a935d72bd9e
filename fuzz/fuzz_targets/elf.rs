//! The ELF checks read headers of files a host (or an attacker with write
//! access to a driver directory) controls: no input may panic them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nvlibfs::elf::inspect(data);
});
