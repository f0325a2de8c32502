//! Naming a target's user frames from outside it — also after it exited.
//!
//! bpftrace names user frames when it prints, by reading the target's `/proc/PID/maps` and
//! binaries then: once the target has exited (the freeze that got it killed), every frame it
//! prints is a bare address, and Rust v0 names (`_RNv...`) stay mangled. So the capture keeps
//! its own view: a snapshot of the target's executable mappings taken while it is alive, with
//! each mapped file held open (`/proc/PID/map_files/...`, which works across mount namespaces
//! and for deleted files), and names addresses itself from those files' DWARF and symbol tables
//! (`addr2line`), demangling legacy and v0 Rust names and C++.
//!
//! Reading `/proc/PID/maps` takes the target's `mmap_lock`: during a freeze it waits for the
//! freeze to end. Callers take the snapshot on a thread of their own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// One named frame (inlined calls give several per address, outermost first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFrame {
    /// Demangled function name, without the legacy hash.
    pub function: String,
    /// Source file, when the binary has line info.
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
}

struct Object {
    file: File,
    /// `(file offset, virtual address, file size)` of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// The GNU build id, to find a separate debug file.
    build_id: Option<Vec<u8>>,
    loader: OnceLock<Option<addr2line::Loader>>,
    /// Function symbols of `/usr/lib/debug/.build-id/xx/yyyy.debug` (`start`, `end`, name),
    /// sorted: what a stripped library (Debian's libc) is named from when its debug package is
    /// installed, as gdb and bpftrace do.
    debug_symbols: OnceLock<Vec<(u64, u64, String)>>,
}

impl Object {
    fn open(file: File) -> Option<Object> {
        use object::{Object as _, ObjectSegment as _};
        let cache = object::ReadCache::new(&file);
        let parsed = object::File::parse(&cache).ok()?;
        let segments = parsed
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, s.address(), size)
            })
            .collect();
        let build_id = parsed.build_id().ok().flatten().map(<[u8]>::to_vec);
        drop(parsed);
        Some(Object {
            file,
            segments,
            build_id,
            loader: OnceLock::new(),
            debug_symbols: OnceLock::new(),
        })
    }

    /// The name of the function at `svma` from the separate debug file, if there is one.
    fn debug_symbol(&self, svma: u64) -> Option<&str> {
        let symbols = self.debug_symbols.get_or_init(|| {
            use object::{Object as _, ObjectSymbol as _};
            let Some(id) = self.build_id.as_deref().filter(|id| id.len() > 1) else {
                return Vec::new();
            };
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let path = format!("/usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..]);
            let Ok(data) = std::fs::read(path) else {
                return Vec::new();
            };
            let Ok(parsed) = object::File::parse(&*data) else {
                return Vec::new();
            };
            let mut v: Vec<(u64, u64, String)> = parsed
                .symbols()
                .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
                .filter_map(|s| {
                    Some((
                        s.address(),
                        s.address() + s.size(),
                        s.name().ok()?.to_string(),
                    ))
                })
                .collect();
            v.sort();
            v
        });
        let i = symbols.partition_point(|s| s.0 <= svma).checked_sub(1)?;
        let (start, end, name) = &symbols[i];
        (svma >= *start && (svma < *end || end == start)).then_some(name.as_str())
    }

    /// The file's own (link-time) address of the byte at `file_off`.
    fn svma(&self, file_off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(off, _, size)| (*off..off.saturating_add(*size)).contains(&file_off))
            .map(|(off, vaddr, _)| file_off - off + vaddr)
    }

    fn loader(&self) -> Option<&addr2line::Loader> {
        self.loader
            .get_or_init(|| {
                // Through our own descriptor: the path works as long as we hold the file, even
                // when the target (and its /proc entries) are gone.
                addr2line::Loader::new(format!("/proc/self/fd/{}", self.file.as_raw_fd())).ok()
            })
            .as_ref()
    }
}

/// The target's executable mappings, with their files held open.
#[derive(Default)]
pub struct TargetSymbols {
    /// start -> (end, file offset, object index)
    maps: BTreeMap<u64, (u64, u64, usize)>,
    objects: Vec<Object>,
    /// (device:inode) -> object index, so a file mapped several times is opened once.
    by_inode: BTreeMap<String, usize>,
    cache: std::sync::Mutex<BTreeMap<u64, Vec<UserFrame>>>,
}

impl TargetSymbols {
    /// Reads `/proc/PID/maps` and opens every executable file mapping. Blocks while the
    /// target's `mmap_lock` is held for write (a freeze): call it on a thread of its own.
    pub fn snapshot(pid: u32) -> std::io::Result<TargetSymbols> {
        let mut s = TargetSymbols::default();
        s.refresh(pid)?;
        Ok(s)
    }

    /// Reads the mappings again (new libraries, a restart), keeping what is known.
    pub fn refresh(&mut self, pid: u32) -> std::io::Result<()> {
        let maps = File::open(format!("/proc/{pid}/maps"))?;
        for line in BufReader::new(maps).lines() {
            let line = line?;
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms), Some(offset), Some(dev), Some(inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let path: String = f.collect::<Vec<_>>().join(" ");
            if !perms.contains('x') || inode == "0" || !path.starts_with('/') {
                continue;
            }
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi), Ok(offset)) = (
                u64::from_str_radix(lo, 16),
                u64::from_str_radix(hi, 16),
                u64::from_str_radix(offset, 16),
            ) else {
                continue;
            };
            let key = format!("{dev}:{inode}");
            let idx = match self.by_inode.get(&key) {
                Some(&i) => i,
                None => {
                    // map_files gives the mapped file itself (another mount namespace, or
                    // deleted since); the path under the target's root is the fallback.
                    let file = File::open(format!("/proc/{pid}/map_files/{range}"))
                        .or_else(|_| File::open(format!("/proc/{pid}/root{path}")));
                    let Some(obj) = file.ok().and_then(Object::open) else {
                        continue;
                    };
                    self.objects.push(obj);
                    self.by_inode.insert(key, self.objects.len() - 1);
                    self.objects.len() - 1
                }
            };
            self.maps.insert(lo, (hi, offset, idx));
        }
        Ok(())
    }

    /// Number of executable mappings known.
    pub fn mappings(&self) -> usize {
        self.maps.len()
    }

    /// Names the code at `addr` (a return address or sampled instruction pointer in the
    /// target), outermost inlined frame first. Empty when the address is in no known mapping
    /// or the file has neither symbols nor debug info for it.
    pub fn resolve(&self, addr: u64) -> Vec<UserFrame> {
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(&addr).cloned()) {
            return hit;
        }
        let frames = self.resolve_uncached(addr);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() < 100_000 {
                c.insert(addr, frames.clone());
            }
        }
        frames
    }

    fn resolve_uncached(&self, addr: u64) -> Vec<UserFrame> {
        let Some((&start, &(end, offset, idx))) = self.maps.range(..=addr).next_back() else {
            return Vec::new();
        };
        if addr >= end {
            return Vec::new();
        }
        let obj = &self.objects[idx];
        let Some(probe) = obj.svma(addr - start + offset) else {
            return Vec::new();
        };
        let Some(loader) = obj.loader() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Ok(mut it) = loader.find_frames(probe) {
            while let Ok(Some(f)) = it.next() {
                let Some(name) = f.function.as_ref().and_then(|n| n.demangle().ok()) else {
                    continue;
                };
                out.push(UserFrame {
                    function: strip_hash(&name),
                    file: f.location.as_ref().and_then(|l| l.file).map(str::to_string),
                    line: f.location.as_ref().and_then(|l| l.line),
                });
            }
        }
        if out.is_empty() {
            if let Some(sym) = loader
                .find_symbol(probe)
                .or_else(|| obj.debug_symbol(probe))
            {
                out.push(UserFrame {
                    function: demangle(sym),
                    file: None,
                    line: None,
                });
            }
        }
        // addr2line yields the innermost (inlined) frame first.
        out.reverse();
        out
    }
}

/// Demangles a symbol name: Rust legacy and v0 (without the hash), else C++, else as is.
pub fn demangle(sym: &str) -> String {
    match rustc_demangle::try_demangle(sym) {
        Ok(d) => format!("{d:#}"),
        Err(_) => addr2line::demangle_auto(sym.into(), None).into_owned(),
    }
}

/// Removes a legacy Rust hash suffix (`::h0123456789abcdef`) a demangler left in place.
fn strip_hash(name: &str) -> String {
    match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => {
            name[..i].to_string()
        }
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_with_a_name_to_find() -> u64 {
        a_function_with_a_name_to_find as fn() -> u64 as usize as u64
    }

    #[test]
    fn this_process_names_its_own_functions_also_through_held_files() {
        let me = std::process::id();
        let syms = TargetSymbols::snapshot(me).unwrap();
        assert!(syms.mappings() > 0);
        let addr = std::hint::black_box(a_function_with_a_name_to_find());
        let frames = syms.resolve(addr + 1);
        assert!(
            frames
                .iter()
                .any(|f| f.function.ends_with("a_function_with_a_name_to_find")),
            "{frames:?}"
        );
        assert!(syms.resolve(8).is_empty(), "no mapping there");
    }

    #[test]
    fn both_rust_manglings_demangle() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(demangle("memcpy"), "memcpy");
        assert_eq!(strip_hash("a::b::h0123456789abcdef"), "a::b");
    }
}
