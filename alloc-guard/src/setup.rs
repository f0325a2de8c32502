//! The mistakes that would otherwise make freezetrap silently useless, said once at start, one
//! line each: `GuardedAlloc` is not the program's global allocator, or the binary was built
//! without frame pointers.

use std::sync::Once;

/// The `.cargo/config.toml` lines a service needs for frame pointers.
pub const FRAME_POINTER_CONFIG: &str = r#"[build] rustflags = ["-C", "force-frame-pointers=yes"]"#;

/// Whether any `FREEZETRAP_*` setting is present (test-harness variables aside): only then is
/// anything said.
fn configured() -> bool {
    base::env::any_name(|k| {
        k.starts_with(b"FREEZETRAP_")
            && !k.starts_with(b"FREEZETRAP_TEST_")
            && k != b"FREEZETRAP_REQUIRE_EBPF"
    })
}

/// The line for a program whose global allocator is not `GuardedAlloc`.
pub fn not_installed_line() -> String {
    "freezetrap: FREEZETRAP_* is set but freezetrap::GuardedAlloc is not this program's #[global_allocator]: large allocations are not recorded and stalls name no suspect; add `#[global_allocator] static GLOBAL: freezetrap::GuardedAlloc<std::alloc::System> = freezetrap::GuardedAlloc::new(std::alloc::System);` (or wrap your allocator)".to_string()
}

/// The line for a binary built without frame pointers.
pub fn no_frame_pointers_line() -> String {
    format!(
        "freezetrap: this binary seems built without frame pointers (a frame-pointer walk of this stack disagrees with DWARF): backtraces use the DWARF unwinder (~10 µs an event) and eBPF user stacks are cut short; add to .cargo/config.toml: {FRAME_POINTER_CONFIG} (a RUSTFLAGS variable, when set, replaces that list)"
    )
}

/// Says, once per process and only when a `FREEZETRAP_*` variable is set, what is wrong with
/// the setup. Called by `init_from_env`.
///
/// With a threshold set, the frame-pointer check is left to the reporter thread, which makes it
/// as it starts (`say_frame_pointer_problem_once`): its first DWARF unwind (~70 µs here, most
/// of it faulting in unwind tables) would otherwise be paid by the caller's start. A stack
/// through freezetrap's own code tells as well as any: it is built with the service's flags.
pub fn say_problems_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !configured() {
            return;
        }
        if !crate::is_installed() {
            eprintln!("{}", not_installed_line());
        } else if crate::threshold().is_none() {
            say_frame_pointer_problem_once();
        }
    });
}

/// Says, once per process and only when a `FREEZETRAP_*` variable is set and the guard is
/// installed, that this binary seems built without frame pointers.
pub(crate) fn say_frame_pointer_problem_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if configured()
            && crate::is_installed()
            && crate::unwind::frame_pointers_work_here() == Some(false)
        {
            eprintln!("{}", no_frame_pointers_line());
        }
    });
}
