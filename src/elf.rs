//! Is this file really a library (or program) this host can load?
//!
//! Reads headers only, with positioned reads: the ELF header, the program
//! headers, the dynamic segment and the string holding `DT_SONAME`. That is a
//! few small reads whatever the file's size, which keeps a scan of a 675 MB
//! driver in milliseconds, and no mapping means a file truncated under us
//! gives an error, not SIGBUS.

use goblin::container::{Container, Ctx};
use goblin::elf::dynamic::{DT_NULL, DT_SONAME, DT_STRSZ, DT_STRTAB};
use goblin::elf::header::{self, Header};
use goblin::elf::program_header::{ProgramHeader, PT_DYNAMIC, PT_LOAD};
use goblin::elf::Elf;
use std::fmt;
use std::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElfClass {
    Elf32,
    Elf64,
}

impl ElfClass {
    pub fn bits(self) -> u8 {
        match self {
            ElfClass::Elf32 => 32,
            ElfClass::Elf64 => 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectType {
    /// `ET_DYN`: shared objects, and position-independent executables.
    Dynamic,
    /// `ET_EXEC`.
    Executable,
    Other(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    pub class: ElfClass,
    pub object_type: ObjectType,
    pub soname: Option<String>,
}

#[derive(Debug)]
pub enum ElfProblem {
    NotElf,
    /// The headers describe `needs` bytes; the file has `size`.
    Truncated {
        size: u64,
        needs: u64,
    },
    /// For a machine this host cannot run.
    ForeignMachine {
        machine: String,
    },
    Malformed(String),
    Io(io::Error),
}

impl fmt::Display for ElfProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfProblem::NotElf => f.write_str("not an ELF file"),
            ElfProblem::Truncated { size, needs } => {
                write!(f, "truncated ELF: {size} bytes, its headers describe {needs}")
            }
            ElfProblem::ForeignMachine { machine } => write!(
                f,
                "ELF for {machine}, this host runs {}",
                header::machine_to_str(HOST_MACHINES[1].1)
            ),
            ElfProblem::Malformed(why) => write!(f, "malformed ELF: {why}"),
            ElfProblem::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// The (class, machine) pairs this host's loader accepts: its native 32- and
/// 64-bit machines.
#[cfg(target_arch = "x86_64")]
const HOST_MACHINES: [(ElfClass, u16); 2] = [(ElfClass::Elf32, header::EM_386), (ElfClass::Elf64, header::EM_X86_64)];
#[cfg(target_arch = "aarch64")]
const HOST_MACHINES: [(ElfClass, u16); 2] = [(ElfClass::Elf32, header::EM_ARM), (ElfClass::Elf64, header::EM_AARCH64)];

/// Positioned reads from a file, or from bytes in tests and fuzzing.
pub trait ReadAt {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Dynamic segments of real libraries are a few hundred bytes; anything far
/// larger is not worth reading to find one string.
const MAX_DYNAMIC: u64 = 1 << 20;
const MAX_PHDRS: u16 = 256;
const MAX_SONAME: u64 = 255;

pub fn inspect(src: &(impl ReadAt + ?Sized)) -> Result<ElfInfo, ElfProblem> {
    let size = src.size().map_err(ElfProblem::Io)?;
    let read = |offset: u64, len: u64| -> Result<Vec<u8>, ElfProblem> {
        let end = offset.saturating_add(len);
        if end > size {
            return Err(ElfProblem::Truncated { size, needs: end });
        }
        let mut buf = vec![0; len as usize];
        src.read_exact_at(&mut buf, offset).map_err(ElfProblem::Io)?;
        Ok(buf)
    };

    let ident = read(0, header::SIZEOF_IDENT as u64).map_err(|_| ElfProblem::NotElf)?;
    if &ident[..header::SELFMAG] != header::ELFMAG {
        return Err(ElfProblem::NotElf);
    }
    let (class, container, header_size) = match ident[header::EI_CLASS] {
        header::ELFCLASS64 => (ElfClass::Elf64, Container::Big, header::header64::SIZEOF_EHDR),
        header::ELFCLASS32 => (ElfClass::Elf32, Container::Little, header::header32::SIZEOF_EHDR),
        other => return Err(ElfProblem::Malformed(format!("unknown ELF class {other}"))),
    };
    let native = if cfg!(target_endian = "little") {
        header::ELFDATA2LSB
    } else {
        header::ELFDATA2MSB
    };
    let head = read(0, header_size as u64)?;
    let header: Header = Elf::parse_header(&head).map_err(|e| ElfProblem::Malformed(e.to_string()))?;
    if ident[header::EI_DATA] != native || !HOST_MACHINES.contains(&(class, header.e_machine)) {
        return Err(ElfProblem::ForeignMachine {
            machine: format!("{} ({}-bit)", header::machine_to_str(header.e_machine), class.bits()),
        });
    }
    // Native byte order, checked above.
    let ctx = Ctx::from(container);

    // Section headers sit at the very end of a linked file: the cheapest
    // check that nothing was cut off.
    let table_end = |offset: u64, count: u16, entry: u16| offset.saturating_add(count as u64 * entry as u64);
    let mut needs = table_end(header.e_phoff, header.e_phnum, header.e_phentsize);
    if header.e_shnum > 0 {
        needs = needs.max(table_end(header.e_shoff, header.e_shnum, header.e_shentsize));
    }
    if needs > size {
        return Err(ElfProblem::Truncated { size, needs });
    }
    if header.e_phnum > MAX_PHDRS {
        return Err(ElfProblem::Malformed(format!("{} program headers", header.e_phnum)));
    }
    let table = read(header.e_phoff, header.e_phnum as u64 * header.e_phentsize as u64)?;
    let phdrs = ProgramHeader::parse(&table, 0, header.e_phnum as usize, ctx)
        .map_err(|e| ElfProblem::Malformed(format!("program headers: {e}")))?;
    for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD || p.p_type == PT_DYNAMIC) {
        needs = needs.max(ph.p_offset.saturating_add(ph.p_filesz));
    }
    if needs > size {
        return Err(ElfProblem::Truncated { size, needs });
    }

    let object_type = match header.e_type {
        header::ET_DYN => ObjectType::Dynamic,
        header::ET_EXEC => ObjectType::Executable,
        other => ObjectType::Other(other),
    };
    let soname = match phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
        Some(dynamic) => {
            if dynamic.p_filesz > MAX_DYNAMIC {
                return Err(ElfProblem::Malformed(format!(
                    "{}-byte dynamic segment",
                    dynamic.p_filesz
                )));
            }
            let entries = read(dynamic.p_offset, dynamic.p_filesz)?;
            find_soname(&entries, class, &phdrs, &read)?
        }
        None => None,
    };
    Ok(ElfInfo {
        class,
        object_type,
        soname,
    })
}

fn find_soname(
    entries: &[u8],
    class: ElfClass,
    phdrs: &[ProgramHeader],
    read: &impl Fn(u64, u64) -> Result<Vec<u8>, ElfProblem>,
) -> Result<Option<String>, ElfProblem> {
    let word = match class {
        ElfClass::Elf32 => 4,
        ElfClass::Elf64 => 8,
    };
    let value = |bytes: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        b[..word].copy_from_slice(&bytes[..word]);
        if cfg!(target_endian = "little") {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b) >> (64 - 8 * word)
        }
    };
    let (mut strtab, mut strsz, mut soname) = (None, None, None);
    for entry in entries.chunks_exact(2 * word) {
        match value(entry) {
            DT_NULL => break,
            DT_STRTAB => strtab = Some(value(&entry[word..])),
            DT_STRSZ => strsz = Some(value(&entry[word..])),
            DT_SONAME => soname = Some(value(&entry[word..])),
            _ => {}
        }
    }
    let Some(name_at) = soname else { return Ok(None) };
    let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
        return Err(ElfProblem::Malformed("DT_SONAME without a string table".into()));
    };
    // DT_STRTAB is a load address; find where it lies in the file.
    let strtab = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .find(|p| p.p_vaddr <= strtab && strtab.saturating_add(strsz) <= p.p_vaddr.saturating_add(p.p_filesz))
        .map(|p| strtab - p.p_vaddr + p.p_offset)
        .ok_or_else(|| ElfProblem::Malformed("string table outside every loaded segment".into()))?;
    if name_at >= strsz {
        return Err(ElfProblem::Malformed(
            "DT_SONAME points outside the string table".into(),
        ));
    }
    let bytes = read(strtab + name_at, (strsz - name_at).min(MAX_SONAME + 1))?;
    let len = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ElfProblem::Malformed("DT_SONAME is not terminated".into()))?;
    match std::str::from_utf8(&bytes[..len]) {
        Ok(s) if !s.is_empty() && !s.contains('/') && s.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(s.to_owned())),
        _ => Err(ElfProblem::Malformed(format!(
            "DT_SONAME {:?} is not a plain file name",
            String::from_utf8_lossy(&bytes[..len])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_exe() -> Vec<u8> {
        std::fs::read("/proc/self/exe").unwrap()
    }

    #[test]
    fn reads_a_real_program() {
        let info = inspect(own_exe().as_slice()).unwrap();
        assert_eq!(info.class, ElfClass::Elf64);
        assert_eq!(info.soname, None);
    }

    #[test]
    fn never_panics_on_prefixes_or_flipped_bytes() {
        let exe = own_exe();
        for len in 0..1024.min(exe.len()) {
            let _ = inspect(&exe[..len]);
        }
        let mut copy = exe.clone();
        for i in 0..1024.min(exe.len()) {
            copy[i] ^= 0xff;
            let _ = inspect(copy.as_slice());
            copy[i] ^= 0xff;
        }
    }

    #[test]
    fn names_problems() {
        assert!(matches!(inspect(&b"#!/bin/sh\n"[..]), Err(ElfProblem::NotElf)));
        assert!(matches!(inspect(&b""[..]), Err(ElfProblem::NotElf)));
        let exe = own_exe();
        assert!(matches!(inspect(&exe[..40]), Err(ElfProblem::Truncated { .. })));
        assert!(matches!(
            inspect(&exe[..exe.len() - 1]),
            Err(ElfProblem::Truncated { .. })
        ));
        let mut foreign = exe.clone();
        foreign[18..20].copy_from_slice(&header::EM_S390.to_ne_bytes());
        let err = inspect(foreign.as_slice()).unwrap_err().to_string();
        assert!(err.contains("S390"), "{err}");
    }
}
