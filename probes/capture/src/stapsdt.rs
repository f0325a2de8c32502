//! Which USDT probes a binary carries, from its `.note.stapsdt` ELF notes: bpftrace refuses a
//! whole program when one of its probes is missing, so the armed recorder asks first (a binary
//! that never runs the watchdog has no `stall_end` probe: the linker dropped it). The compiled
//! recorder attaches its uprobes itself, at the file offsets [`sites_in`] gives.

use std::path::Path;

/// One probe site from a `stapsdt` note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The provider (`freezetrap`).
    pub provider: String,
    /// The probe's name.
    pub name: String,
    /// Where the probe's `nop` is: a virtual address as in the note, or (from [`sites_in`]) the
    /// offset in the file, where a uprobe is attached.
    pub pc: u64,
    /// The probe's semaphore, like `pc` (0: none): the kernel increments it while a uprobe with
    /// this "reference counter" is attached, which is what makes the probe fire.
    pub semaphore: u64,
    /// The argument specification, e.g. `8@%rdi 8@%rsi`.
    pub args: String,
    base: u64,
}

/// `(provider, name)` of every SystemTap probe in the ELF file at `path`.
pub fn probes_in(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    Ok(read_notes(path)?
        .0
        .into_iter()
        .map(|s| (s.provider, s.name))
        .collect())
}

/// Every probe site in the ELF file at `path`, with `pc` and `semaphore` as file offsets.
/// Addresses that no loadable segment holds are dropped (a corrupt or unusual file).
pub fn sites_in(path: &Path) -> std::io::Result<Vec<Site>> {
    let (sites, base, segments) = read_notes(path)?;
    let to_offset = |vaddr: u64| {
        segments
            .iter()
            .find(|(addr, _, size)| vaddr >= *addr && vaddr < addr + size)
            .map(|(addr, offset, _)| vaddr - addr + offset)
    };
    Ok(sites
        .into_iter()
        .filter_map(|mut s| {
            // A prelinked file moved .stapsdt.base after the notes were written: shift by as much.
            let shift = base.map_or(0, |b| b.wrapping_sub(s.base));
            s.pc = to_offset(s.pc.wrapping_add(shift))?;
            if s.semaphore != 0 {
                s.semaphore = to_offset(s.semaphore)?;
            }
            Some(s)
        })
        .collect())
}

/// The notes, the address of `.stapsdt.base`, and the loadable segments `(vaddr, offset, filesz)`.
type Notes = (Vec<Site>, Option<u64>, Vec<(u64, u64, u64)>);

fn read_notes(path: &Path) -> std::io::Result<Notes> {
    use object::{Object, ObjectSection, ObjectSegment};
    // Read only the headers and the one section: service binaries with debug info run to
    // hundreds of MB.
    let data = object::ReadCache::new(std::fs::File::open(path)?);
    let file = object::File::parse(&data).map_err(std::io::Error::other)?;
    let base = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let segments = file
        .segments()
        .map(|s| (s.address(), s.file_range().0, s.file_range().1))
        .collect();
    let Some(section) = file.section_by_name(".note.stapsdt") else {
        return Ok((Vec::new(), base, segments));
    };
    let notes = section.data().map_err(std::io::Error::other)?;
    let addr_size = if file.is_64() { 8 } else { 4 };
    Ok((
        parse_notes(notes, file.is_little_endian(), addr_size),
        base,
        segments,
    ))
}

/// Parses ELF notes (4-byte aligned: namesz, descsz, type, name, desc) and keeps the `stapsdt`
/// ones (type 3), whose desc is pc, base, semaphore, then `provider\0name\0args\0`.
fn parse_notes(mut notes: &[u8], little: bool, addr_size: usize) -> Vec<Site> {
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().unwrap_or_default();
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let address = |b: &[u8]| {
        let mut v = [0u8; 8];
        if little {
            v[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(v)
        } else {
            v[8 - b.len()..].copy_from_slice(b);
            u64::from_be_bytes(v)
        }
    };
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut out = Vec::new();
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (
            word(&notes[0..4]) as usize,
            word(&notes[4..8]) as usize,
            word(&notes[8..12]),
        );
        let name_end = 12 + align(namesz);
        let desc_end = name_end + align(descsz);
        if desc_end > notes.len() {
            break;
        }
        let name = &notes[12..12 + namesz];
        let desc = &notes[name_end..name_end + descsz];
        if kind == 3 && name.starts_with(b"stapsdt") && desc.len() > 3 * addr_size {
            let mut strings = desc[3 * addr_size..].split(|&b| b == 0);
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            if let (Some(p), Some(n)) = (strings.next(), strings.next()) {
                out.push(Site {
                    provider: text(p),
                    name: text(n),
                    pc: address(&desc[..addr_size]),
                    base: address(&desc[addr_size..2 * addr_size]),
                    semaphore: address(&desc[2 * addr_size..3 * addr_size]),
                    args: strings.next().map(text).unwrap_or_default(),
                });
            }
        }
        notes = &notes[desc_end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_read_and_garbage_is_not() {
        let mut note = Vec::new();
        let addresses: Vec<u8> = [0x1000u64, 0x2000, 0x3000]
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect();
        let desc = [&addresses[..], b"freezetrap\0stall_begin\0-8@%rdi\0"].concat();
        for v in [8u32, desc.len() as u32, 3] {
            note.extend(v.to_le_bytes());
        }
        note.extend(b"stapsdt\0");
        note.extend(&desc);
        note.resize(note.len().div_ceil(4) * 4, 0);
        assert_eq!(
            parse_notes(&note, true, 8),
            [Site {
                provider: "freezetrap".into(),
                name: "stall_begin".into(),
                pc: 0x1000,
                base: 0x2000,
                semaphore: 0x3000,
                args: "-8@%rdi".into(),
            }]
        );
        assert!(parse_notes(&note[..20], true, 8).is_empty());
        assert!(parse_notes(&[0xff; 40], true, 8).is_empty());
    }

    #[test]
    fn this_test_binary_carries_the_probes_it_fires() {
        // Referenced here so the linker keeps the probe sites.
        probes::stall_begin(0, 0, 0);
        probes::large_alloc(0, 0, 0, 0, 0);
        let found = probes_in(&std::env::current_exe().unwrap()).unwrap();
        for name in ["stall_begin", "large_alloc"] {
            assert!(
                found.iter().any(|(p, n)| p == "freezetrap" && n == name),
                "{name} in {found:?}"
            );
        }
        // As file offsets: the bytes there are the probe's `nop`, and the semaphore is a u16 in
        // a data segment (0 in the file).
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let sites = sites_in(&std::env::current_exe().unwrap()).unwrap();
        let begin = sites.iter().find(|s| s.name == "stall_begin").unwrap();
        assert_eq!(exe[begin.pc as usize], 0x90, "{begin:?}");
        assert!(begin.semaphore > 0 && (begin.semaphore as usize) < exe.len());
        assert_eq!(begin.args, "8@%rdi 8@%rsi 8@%rdx");
    }
}
