//! Whether a binary keeps frame pointers, judged from the outside before recording it: eBPF
//! walks user stacks by frame pointer, so a service built without them gives stacks cut short
//! after a frame or two — a capture that looks fine and says little.
//!
//! The test: the share of the binary's functions whose first instructions set up a frame
//! (x86-64: `push rbp; mov rbp, rsp`, after an optional `endbr64`). Code built with
//! `-C force-frame-pointers=yes` has nearly all of them; optimized code without it, few.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Below this share of frame-setting functions, the binary is said to lack frame pointers.
pub const MIN_SHARE: f64 = 0.5;

/// The share (0..=1) of the functions in `path` that set up a frame pointer, from up to 4000
/// of its function symbols of at least 16 bytes. `None` when it cannot tell: not x86-64, no
/// symbol table, or too few functions.
pub fn share(path: &Path) -> Option<f64> {
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    let file = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(&file);
    let obj = object::File::parse(&cache).ok()?;
    if obj.architecture() != object::Architecture::X86_64 {
        return None;
    }
    let (mut with, mut total) = (0u32, 0u32);
    for sym in obj.symbols() {
        if total >= 4000 {
            break;
        }
        if sym.kind() != SymbolKind::Text || sym.size() < 16 {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| obj.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((off, _)) = section.file_range() else {
            continue;
        };
        let at = off + (sym.address() - section.address());
        let mut head = [0u8; 8];
        if file.read_exact_at(&mut head, at).is_err() {
            continue;
        }
        total += 1;
        let body = if head.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
            &head[4..] // endbr64
        } else {
            &head[..]
        };
        // push rbp; mov rbp, rsp (either encoding of the move).
        if body.starts_with(&[0x55, 0x48, 0x89, 0xe5])
            || body.starts_with(&[0x55, 0x48, 0x8b, 0xec])
        {
            with += 1;
        }
    }
    (total >= 20).then(|| f64::from(with) / f64::from(total))
}

/// The one line said when `path` seems built without frame pointers, or `None`.
pub fn warning(path: &Path) -> Option<String> {
    let s = share(path)?;
    (s < MIN_SHARE).then(|| {
        format!(
            "freezetrap-capture: {} seems built without frame pointers (only {:.0}% of its functions set one up): user stacks will be cut short; build it with {} in .cargo/config.toml (a RUSTFLAGS variable, when set, replaces that list)",
            path.display(),
            s * 100.0,
            r#"[build] rustflags = ["-C", "force-frame-pointers=yes"]"#
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_workspace_keeps_frame_pointers_and_a_distribution_binary_does_not() {
        let me = share(&std::env::current_exe().unwrap()).expect("a symbol table");
        assert!(me > 0.8, "this test binary: {me}");
        assert!(warning(&std::env::current_exe().unwrap()).is_none());
        // Stripped binaries have no symbol table to judge from: nothing is said.
        assert_eq!(
            share(Path::new("/usr/bin/true")),
            None,
            "Debian strips coreutils"
        );
        // Rust's own release binaries (the rustup proxies on PATH) keep their symbol table and
        // are built without frame pointers.
        let rustc = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("rustc"))
                .find(|p| p.is_file())
        });
        let rustc = rustc.expect("rustc on PATH (the machine builds with it)");
        let s = share(&rustc).expect("rustc has a symbol table");
        assert!(s < MIN_SHARE, "{}: {s}", rustc.display());
        let line = warning(&rustc).unwrap();
        assert!(
            line.contains("seems built without frame pointers")
                && line.contains("force-frame-pointers=yes"),
            "{line}"
        );
    }
}
