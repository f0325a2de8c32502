//! Which USDT probes a binary carries, from its `.note.stapsdt` ELF notes: bpftrace refuses a
//! whole program when one of its probes is missing, so the armed recorder asks first (a binary
//! that never runs the watchdog has no `stall_end` probe: the linker dropped it).

use std::path::Path;

/// `(provider, name)` of every SystemTap probe in the ELF file at `path`.
pub fn probes_in(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    use object::{Object, ObjectSection};
    // Read only the headers and the one section: service binaries with debug info run to
    // hundreds of MB.
    let data = object::ReadCache::new(std::fs::File::open(path)?);
    let file = object::File::parse(&data).map_err(std::io::Error::other)?;
    let Some(section) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let notes = section.data().map_err(std::io::Error::other)?;
    let addr_size = if file.is_64() { 8 } else { 4 };
    Ok(parse_notes(notes, file.is_little_endian(), addr_size))
}

/// Parses ELF notes (4-byte aligned: namesz, descsz, type, name, desc) and keeps the `stapsdt`
/// ones (type 3), whose desc is pc, base, semaphore, then `provider\0name\0args\0`.
fn parse_notes(mut notes: &[u8], little: bool, addr_size: usize) -> Vec<(String, String)> {
    let word = |b: &[u8]| {
        let b: [u8; 4] = b.try_into().unwrap_or_default();
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
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
            if let (Some(p), Some(n)) = (strings.next(), strings.next()) {
                out.push((
                    String::from_utf8_lossy(p).into_owned(),
                    String::from_utf8_lossy(n).into_owned(),
                ));
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
        let desc = [&[0u8; 24][..], b"freezetrap\0stall_begin\0-8@%rdi\0"].concat();
        for v in [8u32, desc.len() as u32, 3] {
            note.extend(v.to_le_bytes());
        }
        note.extend(b"stapsdt\0");
        note.extend(&desc);
        note.resize(note.len().div_ceil(4) * 4, 0);
        assert_eq!(
            parse_notes(&note, true, 8),
            [("freezetrap".to_string(), "stall_begin".to_string())]
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
    }
}
