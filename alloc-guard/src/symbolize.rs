//! Turning raw return addresses into `function (file:line)` frames, off the hot path.
//!
//! Only the reporter thread and `assert_no_large_allocs` (after its body returned) call this:
//! symbolization allocates heavily and reads `/proc/self/maps`, which is forbidden inside the
//! allocator and during a freeze. Results are cached by address, so a call site that allocates
//! big blocks repeatedly is resolved once.

use serde::Serialize;
use std::collections::HashMap;
use std::fmt;

/// One resolved frame. Inlined calls resolve to several frames for one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Demangled function name without the hash suffix; `"??"` when unknown.
    pub function: String,
    /// Source file, when the binary has line info.
    pub file: Option<String>,
    /// Source line, when the binary has line info.
    pub line: Option<u32>,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => {
                write!(f, "{} ({}:{})", self.function, short_path(file), line)
            }
            (Some(file), None) => write!(f, "{} ({})", self.function, short_path(file)),
            _ => write!(f, "{}", self.function),
        }
    }
}

/// Shortens an absolute source path to what a reader recognises: the part from `src/`,
/// `tests/`, `examples/` or `benches/` on, keeping the crate directory in front of it.
pub fn short_path(path: &str) -> &str {
    for marker in ["/src/", "/tests/", "/examples/", "/benches/"] {
        if let Some(i) = path.rfind(marker) {
            // Keep one directory before the marker (the crate), e.g. "alloc-guard/src/lib.rs".
            let head = &path[..i];
            let start = head.rfind('/').map(|j| j + 1).unwrap_or(0);
            return &path[start..];
        }
    }
    path
}

/// Function-name prefixes of freezetrap's own machinery and the allocation shims: frames that
/// are the allocator, not its caller. Trimmed from the top of every stack.
const ALLOCATOR_PREFIXES: &[&str] = &[
    "backtrace::",
    "_Unwind_",
    "freezetrap_alloc_guard::",
    "<freezetrap_alloc_guard::",
    "alloc_guard::",
    "<alloc_guard::",
    "freezetrap::GuardedAlloc",
    "__rustc::",
    "__rust_alloc",
    "__rust_realloc",
    "__rust_alloc_zeroed",
    "__rg_",
    "__rdl_",
    "__rust_no_alloc_shim_is_unstable",
    "alloc::alloc::",
    "<alloc::alloc::",
    "std::alloc::",
    "<std::alloc::System",
    "<tikv_jemallocator::",
    "tikv_jemallocator::",
];

/// Prefixes of standard-library code: skipped when naming "the first caller frame outside the
/// allocator", so that `Vec::with_capacity` points at the code that called it.
const LIBRARY_PREFIXES: &[&str] = &[
    "alloc::",
    "<alloc::",
    "core::",
    "<core::",
    "std::",
    "<std::",
    "hashbrown::",
    "<hashbrown::",
    "<T as ",
    "<[T] as ",
];

fn starts_with_any(s: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| s.starts_with(p))
}

/// True if `function` belongs to the allocator machinery (trimmed from stacks).
pub fn is_allocator_frame(function: &str) -> bool {
    starts_with_any(function, ALLOCATOR_PREFIXES)
}

/// Removes the allocator's own frames from the top of a stack (innermost first).
///
/// Only the leading run counts: the top frames that are allocator machinery or unnamed. The cut
/// is after the last allocator frame of that run, so an allocator-named frame deeper down (the
/// `assert_no_large_allocs` frame under a test body, say) never swallows the real caller.
pub fn trim_allocator_frames(frames: &mut Vec<Frame>) {
    let mut cut = 0;
    for (i, f) in frames.iter().enumerate() {
        if is_allocator_frame(&f.function) {
            cut = i + 1;
        } else if !(f.function == "??" || f.function.starts_with("0x")) {
            break;
        }
    }
    frames.drain(..cut);
}

/// True for frames of the standard library (and its vendored dependencies such as hashbrown).
///
/// Decided by source path when there is one (std's debug info points under `/rustc/<hash>/`, its
/// dependencies under `/rust/deps/`), so `<u8 as SpecFromElem>::from_elem` counts as library while
/// a user's `<MyType as Clone>::clone` does not; by name prefix otherwise.
pub fn is_library_frame(frame: &Frame) -> bool {
    match &frame.file {
        Some(file) => file.starts_with("/rustc/") || file.contains("/rust/deps/"),
        None => starts_with_any(&frame.function, LIBRARY_PREFIXES),
    }
}

/// The first frame outside the allocator and the standard library, or the first frame at all.
pub fn first_user_frame(frames: &[Frame]) -> Option<&Frame> {
    frames
        .iter()
        .find(|f| f.function != "??" && !is_library_frame(f))
        .or_else(|| frames.first())
}

/// An address-to-frames resolver with a cache.
#[derive(Default)]
pub struct Symbolizer {
    cache: HashMap<usize, Vec<Frame>>,
}

impl Symbolizer {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves raw return addresses (innermost first) into frames, expands inlined calls, and
    /// trims the allocator's own frames from the top.
    pub fn resolve(&mut self, ips: &[usize]) -> Vec<Frame> {
        let mut out = self.resolve_raw(ips);
        trim_allocator_frames(&mut out);
        out
    }

    /// Like [`Symbolizer::resolve`] without trimming anything.
    pub fn resolve_raw(&mut self, ips: &[usize]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(ips.len() * 2);
        for (i, &ip) in ips.iter().enumerate() {
            if ip == 0 {
                continue;
            }
            // A return address points after the call; look up the call instruction itself
            // (except for the innermost frame, which is an exact ip).
            let lookup = if i == 0 { ip } else { ip - 1 };
            let frames = self
                .cache
                .entry(lookup)
                .or_insert_with(|| resolve_one(lookup));
            out.extend(frames.iter().cloned());
        }
        out
    }
}

fn resolve_one(addr: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    backtrace::resolve(addr as *mut std::ffi::c_void, |sym| {
        let function = sym
            .name()
            .map(|n| format!("{n:#}"))
            .unwrap_or_else(|| "??".to_string());
        frames.push(Frame {
            function,
            file: sym.filename().map(|p| p.display().to_string()),
            line: sym.lineno(),
        });
    });
    if frames.is_empty() {
        frames.push(Frame {
            function: format!("{addr:#x}"),
            file: None,
            line: None,
        });
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> Frame {
        Frame {
            function: name.into(),
            file: None,
            line: None,
        }
    }

    #[test]
    fn trims_machinery_and_finds_the_caller() {
        let mut st = vec![
            f("backtrace::backtrace::libunwind::trace"),
            f("alloc_guard::record::capture_frames"),
            f("alloc_guard::record::slow_path"),
            f("<alloc_guard::GuardedAlloc<A> as core::alloc::global::GlobalAlloc>::alloc"),
            f("__rust_alloc"),
            f("alloc::alloc::alloc"),
            f("alloc::raw_vec::RawVecInner<A>::try_allocate_in"),
            f("alloc::vec::Vec<T>::with_capacity"),
            f("my_service::index::insert"),
            f("alloc_guard::scope::assert_no_large_allocs"),
            f("main"),
        ];
        trim_allocator_frames(&mut st);
        assert_eq!(
            st[0].function,
            "alloc::raw_vec::RawVecInner<A>::try_allocate_in"
        );
        assert_eq!(
            first_user_frame(&st).unwrap().function,
            "my_service::index::insert"
        );
        assert_eq!(
            st.len(),
            5,
            "a deeper allocator-named frame must not be trimmed"
        );
    }

    #[test]
    fn short_paths() {
        assert_eq!(short_path("/home/u/svc/src/index.rs"), "svc/src/index.rs");
        assert_eq!(
            short_path("/rustc/abc/library/alloc/src/vec.rs"),
            "alloc/src/vec.rs"
        );
        assert_eq!(short_path("lib.rs"), "lib.rs");
    }

    #[test]
    fn resolves_a_real_function() {
        #[inline(never)]
        fn here() -> usize {
            let mut ips = [0usize; 4];
            let mut n = 0;
            backtrace::trace(|fr| {
                ips[n] = fr.ip() as usize;
                n += 1;
                n < 4
            });
            ips[..n]
                .iter()
                .copied()
                .find(|&ip| {
                    let mut hit = false;
                    backtrace::resolve(ip as *mut _, |s| {
                        hit |= s
                            .name()
                            .map(|n| format!("{n:#}").contains("here"))
                            .unwrap_or(false)
                    });
                    hit
                })
                .unwrap_or(0)
        }
        let ip = here();
        assert_ne!(
            ip, 0,
            "could not resolve a frame of this test: no debug info?"
        );
        let frames = Symbolizer::new().resolve_raw(&[ip]);
        assert!(
            frames.iter().any(|f| f.function.contains("here")),
            "{frames:?}"
        );
    }
}
