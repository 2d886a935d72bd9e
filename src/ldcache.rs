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

/// glibc's `_dl_cache_libcmp`: runs of digits compare as numbers, so
/// `libfoo.so.10` sorts after `libfoo.so.9`.
pub fn libcmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let number = |s: &[u8], k: &mut usize| {
        let mut v: u64 = 0;
        while *k < s.len() && s[*k].is_ascii_digit() {
            v = v.saturating_mul(10).saturating_add((s[*k] - b'0') as u64);
            *k += 1;
        }
        v
    };
    while i < a.len() {
        match (a[i].is_ascii_digit(), b.get(j).is_some_and(u8::is_ascii_digit)) {
            (true, true) => {
                let (x, y) = (number(a, &mut i), number(b, &mut j));
                if x != y {
                    return x.cmp(&y);
                }
            }
            (true, false) => return std::cmp::Ordering::Greater,
            (false, true) => return std::cmp::Ordering::Less,
            (false, false) => {
                let y = b.get(j).copied().unwrap_or(0);
                if a[i] != y {
                    return a[i].cmp(&y);
                }
                i += 1;
                j += 1;
            }
        }
    }
    0u8.cmp(b.get(j).unwrap_or(&0))
}

/// A new-format cache (`glibc-ld.so.cache1.1`) of `entries`, in the order
/// the dynamic loader's binary search needs: descending by [`libcmp`].
pub fn write(entries: &[CacheEntry]) -> Vec<u8> {
    let mut sorted: Vec<&CacheEntry> = entries.iter().collect();
    sorted.sort_by(|x, y| libcmp(&y.soname, &x.soname));
    let strings_at = NEW_HEADER + sorted.len() * NEW_ENTRY;
    let mut strings = Vec::new();
    let mut table = Vec::new();
    for e in &sorted {
        let key = strings_at + strings.len();
        strings.extend_from_slice(e.soname.as_bytes());
        strings.push(0);
        let value = strings_at + strings.len();
        strings.extend_from_slice(e.path.as_os_str().as_bytes());
        strings.push(0);
        table.extend_from_slice(&e.flags.to_ne_bytes());
        table.extend_from_slice(&(key as u32).to_ne_bytes());
        table.extend_from_slice(&(value as u32).to_ne_bytes());
        table.extend_from_slice(&[0; 12]);
    }
    let mut out = NEW_MAGIC.to_vec();
    out.extend_from_slice(&(sorted.len() as u32).to_ne_bytes());
    out.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
    out.push(if cfg!(target_endian = "little") {
        ENDIAN_LITTLE
    } else {
        ENDIAN_BIG
    });
    out.resize(NEW_HEADER, 0);
    out.extend(table);
    out.extend(strings);
    out
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

    fn build(entries: &[(&str, &str)]) -> Vec<u8> {
        let entries: Vec<CacheEntry> = entries
            .iter()
            .map(|(k, v)| CacheEntry {
                soname: k.to_string(),
                path: PathBuf::from(v),
                flags: 0x0303,
            })
            .collect();
        write(&entries)
    }

    #[test]
    fn writes_what_it_reads_in_the_loaders_order() {
        let cache = build(&[
            ("libc.so.6", "/lib/libc.so.6"),
            ("libcuda.so.1", "/usr/lib/libcuda.so.1"),
        ]);
        let entries = parse(&cache).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].soname, "libcuda.so.1");
        assert_eq!(entries[1].path, PathBuf::from("/lib/libc.so.6"));
    }

    #[test]
    fn compares_like_glibc() {
        use std::cmp::Ordering::*;
        assert_eq!(libcmp("libfoo.so.10", "libfoo.so.9"), Greater);
        assert_eq!(libcmp("libfoo.so.1", "libfoo.so.1"), Equal);
        assert_eq!(libcmp("libfoo.so", "libfoo.so.1"), Less);
        assert_eq!(libcmp("libfoo1", "libfooa"), Greater);
        assert_eq!(libcmp("libGL.so", "libc.so"), Less);
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
