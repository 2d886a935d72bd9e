//! The dynamic linker's cache (`/etc/ld.so.cache`), glibc's format.
//!
//! It lists where the host's loader finds each SONAME, including directories
//! nvlibfs would not guess (`ld.so.conf.d` entries such as
//! `/usr/lib/x86_64-linux-gnu/nvidia/current`). Layout, from glibc's
//! `dl-cache.h`: an optional old-format block (`ld.so-1.7.0`, 12-byte
//! entries), then the new format (`glibc-ld.so.cache1.1`): a 48-byte header
//! and 24-byte entries whose key and value are offsets of NUL-terminated
//! strings from the start of the new-format header. Every offset is checked:
//! the file comes from the host and is not trusted.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const OLD_HEADER: usize = 16;
const OLD_ENTRY: usize = 12;
const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const NEW_HEADER: usize = 48;
const NEW_ENTRY: usize = 24;
/// `cache_file_new.flags`: which byte order the cache was written in.
const ENDIAN_LITTLE: u8 = 2;
const ENDIAN_BIG: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The SONAME the loader looks up, e.g. `libcuda.so.1`.
    pub soname: String,
    /// Where it finds it, as the host names it.
    pub path: PathBuf,
    /// glibc's entry flags (`FLAG_ELF_LIBC6 | FLAG_X8664_LIB64`, ...).
    pub flags: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CacheError {
    /// No known magic at the start.
    NotACache,
    /// Only the pre-2.32 format, with no new-format block.
    OldFormatOnly,
    /// Written on a machine of the other byte order.
    ForeignEndian,
    /// A count or offset points past the end of the file.
    Truncated { what: &'static str },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::NotACache => f.write_str("not a glibc ld.so.cache (unknown magic)"),
            CacheError::OldFormatOnly => {
                f.write_str("only the old `ld.so-1.7.0` format, which glibc stopped writing in 2.32; run ldconfig")
            }
            CacheError::ForeignEndian => f.write_str("written for the other byte order"),
            CacheError::Truncated { what } => write!(f, "truncated or corrupt: {what} lies past the end"),
        }
    }
}

impl std::error::Error for CacheError {}

pub fn parse(bytes: &[u8]) -> Result<Vec<CacheEntry>, CacheError> {
    let new = if bytes.starts_with(NEW_MAGIC) {
        bytes
    } else if bytes.starts_with(OLD_MAGIC) {
        let count = read_u32(bytes, OLD_MAGIC.len().next_multiple_of(4)).ok_or(CacheError::Truncated {
            what: "the old-format header",
        })?;
        let end = (count as usize)
            .checked_mul(OLD_ENTRY)
            .and_then(|n| n.checked_add(OLD_HEADER))
            .filter(|&end| end <= bytes.len())
            .ok_or(CacheError::Truncated {
                what: "the old-format table",
            })?;
        // The new block follows, aligned like its 8-byte entry fields.
        let start = end.next_multiple_of(8);
        match bytes.get(start..) {
            Some(rest) if rest.starts_with(NEW_MAGIC) => rest,
            _ => return Err(CacheError::OldFormatOnly),
        }
    } else {
        return Err(CacheError::NotACache);
    };

    let header = new
        .get(..NEW_HEADER)
        .ok_or(CacheError::Truncated { what: "the header" })?;
    match header[28] {
        ENDIAN_BIG if cfg!(target_endian = "little") => return Err(CacheError::ForeignEndian),
        ENDIAN_LITTLE if cfg!(target_endian = "big") => return Err(CacheError::ForeignEndian),
        _ => {}
    }
    let count = read_u32(header, 20).unwrap_or(0) as usize;
    let table_end = count
        .checked_mul(NEW_ENTRY)
        .and_then(|n| n.checked_add(NEW_HEADER))
        .filter(|&end| end <= new.len())
        .ok_or(CacheError::Truncated {
            what: "the entry table",
        })?;

    new[NEW_HEADER..table_end]
        .chunks_exact(NEW_ENTRY)
        .map(|entry| {
            let flags = read_u32(entry, 0).unwrap_or(0) as i32;
            let key = read_u32(entry, 4).unwrap_or(u32::MAX) as usize;
            let value = read_u32(entry, 8).unwrap_or(u32::MAX) as usize;
            let soname = read_str(new, key).ok_or(CacheError::Truncated {
                what: "a SONAME string",
            })?;
            let path = read_str(new, value).ok_or(CacheError::Truncated { what: "a path string" })?;
            Ok(CacheEntry {
                soname: String::from_utf8_lossy(soname).into_owned(),
                path: PathBuf::from(OsStr::from_bytes(path)),
                flags,
            })
        })
        .collect()
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_str(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let rest = bytes.get(at..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new-format cache of the given entries, as glibc lays it out.
    fn build(entries: &[(&str, &str)]) -> Vec<u8> {
        let strings_at = NEW_HEADER + entries.len() * NEW_ENTRY;
        let mut strings = Vec::new();
        let mut table = Vec::new();
        for (key, value) in entries {
            let k = strings_at + strings.len();
            strings.extend_from_slice(key.as_bytes());
            strings.push(0);
            let v = strings_at + strings.len();
            strings.extend_from_slice(value.as_bytes());
            strings.push(0);
            table.extend_from_slice(&0x0303i32.to_ne_bytes());
            table.extend_from_slice(&(k as u32).to_ne_bytes());
            table.extend_from_slice(&(v as u32).to_ne_bytes());
            table.extend_from_slice(&[0; 12]);
        }
        let mut out = NEW_MAGIC.to_vec();
        out.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
        out.extend_from_slice(&[ENDIAN_LITTLE, 0, 0, 0]);
        out.resize(NEW_HEADER, 0);
        out.extend(table);
        out.extend(strings);
        out
    }

    #[test]
    fn reads_entries() {
        let cache = build(&[
            ("libcuda.so.1", "/usr/lib/libcuda.so.1"),
            ("libc.so.6", "/lib/libc.so.6"),
        ]);
        let entries = parse(&cache).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].soname, "libcuda.so.1");
        assert_eq!(entries[1].path, PathBuf::from("/lib/libc.so.6"));
    }

    #[test]
    fn reads_the_new_block_behind_an_old_one() {
        let new = build(&[("libcuda.so.1", "/usr/lib/libcuda.so.1")]);
        let mut cache = OLD_MAGIC.to_vec();
        cache.resize(12, 0);
        cache.extend_from_slice(&1u32.to_ne_bytes());
        cache.extend_from_slice(&[0; OLD_ENTRY]);
        cache.resize(cache.len().next_multiple_of(8), 0);
        cache.extend(new);
        assert_eq!(parse(&cache).unwrap()[0].soname, "libcuda.so.1");
    }

    #[test]
    fn rejects_every_truncation_and_bad_offset() {
        let cache = build(&[("libcuda.so.1", "/usr/lib/libcuda.so.1")]);
        for len in 0..cache.len() - 1 {
            assert!(parse(&cache[..len]).is_err(), "accepted {len} bytes");
        }
        let mut huge = cache.clone();
        huge[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(
            parse(&huge),
            Err(CacheError::Truncated {
                what: "the entry table"
            })
        );
        let mut bad = cache.clone();
        bad[NEW_HEADER + 4..NEW_HEADER + 8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse(&bad).is_err());
        assert_eq!(parse(b"hello world, not a cache"), Err(CacheError::NotACache));
    }
}
