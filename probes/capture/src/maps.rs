//! bpftrace's map dumps as stacks: parsing its `-f json` output, splitting `comm, kstack,
//! ustack` keys into frames, naming user frames ourselves ([`resymbolize`]), and Brendan Gregg's
//! folded format.

use crate::symbols;
use std::collections::BTreeMap;

/// The maps bpftrace printed, by name (`@off` ...), each a map from its key text to a value.
pub type Maps = BTreeMap<String, BTreeMap<String, u64>>;

/// Parses bpftrace `-f json` output: one JSON object per line; keeps `{"type":"map"}` lines.
pub fn parse_maps(output: &str) -> Maps {
    let mut maps = Maps::new();
    for line in output.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["type"] != "map" {
            continue;
        }
        if let Some(data) = v["data"].as_object() {
            for (name, entries) in data {
                let m = maps.entry(name.clone()).or_default();
                if let Some(obj) = entries.as_object() {
                    for (k, val) in obj {
                        if let Some(n) = val.as_u64() {
                            *m.entry(k.clone()).or_insert(0) += n;
                        }
                    }
                } else if let Some(n) = entries.as_u64() {
                    m.insert(String::new(), n);
                }
            }
        }
    }
    maps
}

/// A symbol as bpftrace printed it, made readable: mangled Rust (v0 `_R...`, legacy `_ZN...`)
/// demangled, legacy escapes bpftrace's C++ demangler left (`$u7b$`, `$LT$`, ...) decoded,
/// the legacy hash (`::h0123456789abcdef`) and the `+offset` removed.
fn clean_symbol(sym: &str) -> String {
    let sym = sym.split('+').next().unwrap_or(sym);
    let demangled;
    let sym = if sym.starts_with("_R") || sym.starts_with("_ZN") {
        demangled = symbols::demangle(sym);
        demangled.as_str()
    } else {
        sym
    };
    let unescaped;
    let sym = if sym.contains('$') {
        unescaped = unescape_legacy(sym);
        unescaped.as_str()
    } else {
        sym
    };
    let sym = match sym.rfind("::h") {
        Some(i) if sym.len() - i == 19 && sym[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => {
            &sym[..i]
        }
        _ => sym,
    };
    sym.replace(';', ":")
}

/// Decodes the escapes of legacy Rust mangling (`$LT$` for `<`, `$u7b$` for `{`, ...).
fn unescape_legacy(sym: &str) -> String {
    const ESCAPES: [(&str, &str); 13] = [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$C$", ","),
        ("$SP$", "@"),
        ("$u20$", " "),
        ("$u27$", "'"),
        ("$u5b$", "["),
        ("$u5d$", "]"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$u7e$", "~"),
    ];
    ESCAPES
        .iter()
        .fold(sym.to_string(), |s, (from, to)| s.replace(from, to))
}

/// Kernel frames of a bpftrace kstack text, innermost first (`func+off` per line).
pub fn kernel_frames(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(clean_symbol)
        .collect()
}

/// User frames of a `ustack(perf)` text (`addr sym+off (module)` per line), innermost first.
/// Unresolved frames keep their address.
pub fn user_frames(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.splitn(2, ' ');
            let addr = parts.next().unwrap_or("");
            let rest = parts.next().unwrap_or("");
            let sym = rest
                .rsplit_once(" (")
                .map(|(s, _)| s)
                .unwrap_or(rest)
                .trim();
            if sym.is_empty() || sym == "[unknown]" {
                format!("0x{addr}")
            } else {
                clean_symbol(sym)
            }
        })
        .collect()
}

/// Renames the user frames in every key of `maps` with `syms` (see [`symbols`]): each
/// `ustack(perf)` line `\t<addr> <name>+<off> (<module>)` becomes one line per (inlined) frame
/// at that address, innermost first, named by our own symbolizer — demangled, and named even
/// when the target had exited before bpftrace printed. Lines it cannot name are kept as
/// bpftrace printed them.
pub fn resymbolize(maps: &mut Maps, syms: &symbols::TargetSymbols) {
    for entries in maps.values_mut() {
        let old = std::mem::take(entries);
        for (key, v) in old {
            let mut out = String::with_capacity(key.len());
            // The innermost user frame is where the thread was; the others are return
            // addresses, named by the call before them (`addr - 1`), as perf and gdb do.
            let mut user_index = 0;
            for (i, line) in key.split('\n').enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let Some(frame) = line.strip_prefix('\t') else {
                    out.push_str(line);
                    continue;
                };
                let mut parts = frame.splitn(2, ' ');
                let addr = parts.next().unwrap_or("");
                let module = parts
                    .next()
                    .and_then(|r| r.rsplit_once(" ("))
                    .map(|(_, m)| m.trim_end_matches(')'))
                    .unwrap_or("");
                let named = u64::from_str_radix(addr, 16)
                    .map(|a| {
                        syms.resolve(if user_index == 0 {
                            a
                        } else {
                            a.saturating_sub(1)
                        })
                    })
                    .unwrap_or_default();
                user_index += 1;
                if named.is_empty() {
                    out.push_str(line);
                    continue;
                }
                for (j, f) in named.iter().rev().enumerate() {
                    if j > 0 {
                        out.push('\n');
                    }
                    out.push_str(&format!("\t{addr} {} ({module})", f.function));
                }
            }
            *entries.entry(out).or_insert(0) += v;
        }
    }
}

/// One map key, split: `tid, comm[, kstack[, ustack]]` as both recording programs write them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Key {
    /// The thread (its kernel id); 0 when the key has none.
    pub tid: u64,
    /// The thread's name.
    pub comm: String,
    /// Kernel frames, innermost first.
    pub kernel: Vec<String>,
    /// User frames, innermost first.
    pub user: Vec<String>,
}

/// Splits a `tid, comm, kstack[, ustack]` map key. bpftrace joins key parts with `,`; the
/// thread id is digits; a stack is empty or `\n` plus one line per frame, kernel frames
/// indented with spaces and `ustack(perf)` frames with a tab. A thread name cannot hold a
/// newline, so the first `,\n` after it ends it. A key without a leading thread id (a map
/// printed by hand-written programs) gets tid 0.
pub fn split_key(key: &str) -> Key {
    let (tid, rest) = match key.split_once(',') {
        Some((t, rest)) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            (t.parse().unwrap_or(0), rest)
        }
        _ => (0, key),
    };
    let first_stack = rest.find(",\n").unwrap_or(rest.len());
    let comm = rest[..first_stack].trim_end_matches(',').trim().to_string();
    let stacks = &rest[first_stack..];
    let (k, u) = match stacks.find(",\n\t") {
        Some(i) => (&stacks[..i], &stacks[i..]),
        None => (stacks, ""),
    };
    Key {
        tid,
        comm,
        kernel: kernel_frames(k.trim_matches(',')),
        user: user_frames(u.trim_start_matches(',')),
    }
}

/// One stack in folded form: `comm;user outermost..innermost;kernel outer..inner_[k]`.
pub fn fold(key: &Key) -> String {
    let mut frames = vec![if key.comm.is_empty() {
        "?".to_string()
    } else {
        key.comm.replace(' ', "_")
    }];
    frames.extend(key.user.iter().rev().cloned());
    frames.extend(key.kernel.iter().rev().map(|f| format!("{f}_[k]")));
    frames.join(";")
}

/// Brendan Gregg's folded format: `comm;user outermost..innermost;kernel outer..inner_[k] value`,
/// one line per stack, sorted, equal stacks merged (threads of one name merge: a flame graph
/// reads by name).
pub fn folded(map: Option<&BTreeMap<String, u64>>) -> Vec<String> {
    let mut acc: BTreeMap<String, u64> = BTreeMap::new();
    for (key, v) in map.into_iter().flatten() {
        *acc.entry(fold(&split_key(key))).or_insert(0) += v;
    }
    acc.into_iter().map(|(s, v)| format!("{s} {v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"type": "attached_probes", "data": {"probes": 6}}
{"type": "map", "data": {"@off": {"101,mmapper-0,\n    __schedule+1576\n    schedule+35\n    rwsem_down_write_slowpath+600\n    vm_mmap_pgoff+200\n,\n\t7f00 mmap64+20 (/usr/lib/libc.so.6)\n\t5600 my_app::worker::h0123456789abcdef+40 (/bin/app)\n": 48000, "100,main,\n    __schedule+1\n,\n\t7f01 [unknown] (/x)\n": 10, "102,sleeper,\n    __schedule+1\n    schedule+2\n    do_nanosleep+3\n    hrtimer_nanosleep+4\n,": 90000}}}
{"type": "map", "data": {"@lock_wait_max_us": {"101,mmapper-0": 50400, "103,mmapper-1": 900}}}
{"type": "map", "data": {"@write_hold_us": {"100,app,\n    mmap_write_unlock+10\n    dup_mmap+900\n    copy_process+2000\n    kernel_clone+100\n": 48800}}}
{"type": "map", "data": {"@on": {"100,app,\n    x+1\n,\n": 7}}}
"#;

    #[test]
    fn folded_lines_go_outermost_first_with_kernel_marks() {
        let maps = parse_maps(SAMPLE);
        let f = folded(maps.get("@off"));
        assert_eq!(f.len(), 3);
        assert!(f.contains(&"mmapper-0;my_app::worker;mmap64;vm_mmap_pgoff_[k];rwsem_down_write_slowpath_[k];schedule_[k];__schedule_[k] 48000".to_string()), "{f:#?}");
        assert!(
            f.iter()
                .any(|l| l.starts_with("main;0x7f01;__schedule_[k] ")),
            "{f:#?}"
        );
    }

    #[test]
    fn keys_with_an_empty_stack_split_cleanly() {
        let frames = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // A sample taken in user mode has no kernel stack.
        let k = split_key("77,bash,,\n\t5555 find_child+0 (/usr/bin/bash)\n");
        assert_eq!((k.tid, k.comm.as_str(), k.kernel.len()), (77, "bash", 0));
        assert_eq!(k.user, frames(&["find_child"]));
        // A kernel thread has no user stack.
        let k = split_key("9,kworker/0:1,\n    worker_thread+1\n,");
        assert_eq!(
            (k.comm.as_str(), k.kernel, k.user.len()),
            ("kworker/0:1", frames(&["worker_thread"]), 0)
        );
        // Three parts (the write-hold map), two (the run-queue map), and a name with a comma
        // and digits.
        let k = split_key("5,app,\n    dup_mmap+9\n    copy_process+2\n");
        assert_eq!((k.tid, k.comm.as_str()), (5, "app"));
        assert_eq!(k.kernel, frames(&["dup_mmap", "copy_process"]));
        let k = split_key("12,w,1");
        assert_eq!((k.tid, k.comm.as_str(), k.kernel.len()), (12, "w,1", 0));
        let k = split_key("3,idle,,");
        assert_eq!(
            (k.tid, k.comm.as_str(), k.kernel.len(), k.user.len()),
            (3, "idle", 0, 0)
        );
        // No thread id: a hand-written program's map.
        let k = split_key("idle,,");
        assert_eq!((k.tid, k.comm.as_str()), (0, "idle"));
    }

    #[test]
    fn names_bpftrace_left_mangled_are_demangled() {
        let f = user_frames(concat!(
            "\t7f00 _RNvNvMs0_NtNtNtCsjrHSEGnQ3l9_3std3sys6thread4unixNtB7_6Thread3new12thread_start+17 (/bin/app)\n",
            "\t7f01 core::ops::function::FnOnce::call_once$u7b$$u7b$vtable.shim$u7d$$u7d$::h0123456789abcdef+9 (/bin/app)\n",
            "\t7f02 _ZN4core3ptr13drop_in_place17h0123456789abcdefE+1 (/bin/app)\n",
        ));
        assert_eq!(
            f,
            [
                "<std::sys::thread::unix::Thread>::new::thread_start",
                "core::ops::function::FnOnce::call_once{{vtable.shim}}",
                "core::ptr::drop_in_place",
            ]
        );
    }

    #[inline(never)]
    fn a_frame_to_rename() -> u64 {
        std::hint::black_box(a_frame_to_rename as fn() -> u64 as usize as u64)
    }

    #[test]
    fn user_frames_are_renamed_with_return_addresses_looked_up_at_the_call() {
        let syms = symbols::TargetSymbols::snapshot(std::process::id()).unwrap();
        let f = a_frame_to_rename();
        // Two frames: the innermost at the function's first byte, then a return address just
        // past it (looked up at `addr - 1`, still inside the function).
        let key = format!(
            "1,t,\n    x+1\n,\n\t{f:x} [unknown] (/x)\n\t{:x} [unknown] (/x)\n",
            f + 1
        );
        let mut maps = Maps::new();
        maps.entry("@off".into()).or_default().insert(key, 7);
        resymbolize(&mut maps, &syms);
        let (key, v) = maps["@off"].iter().next().unwrap();
        assert_eq!(*v, 7);
        let user = split_key(key).user;
        assert_eq!(user.len(), 2, "{key}");
        assert!(
            user.iter().all(|u| u.ends_with("a_frame_to_rename")),
            "{user:?}"
        );
    }
}
