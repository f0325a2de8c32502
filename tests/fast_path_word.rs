//! The fast path compares against a word inside the `#[global_allocator]` static itself (a
//! direct load, not another crate's symbol through the GOT). That word must follow every change
//! of the threshold — start-up, `set_threshold`, `assert_no_large_allocs` scopes — or the fast
//! path would let a recorded size through. An instance that is not a static is never written
//! and serves everything through the slow path, still correctly.

use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

#[test]
fn the_static_word_follows_the_threshold_and_scopes_and_a_local_instance_is_never_written() {
    // Allocations have happened (the test harness), so the static is registered.
    std::hint::black_box(vec![0u8; 64]);
    freezetrap::alloc_guard::set_threshold(None);
    assert_eq!(GLOBAL.fast_path_limit(), usize::MAX, "off");
    freezetrap::alloc_guard::set_threshold(Some(8 << 20));
    assert_eq!(GLOBAL.fast_path_limit(), 8 << 20);
    let inside = freezetrap::assert_no_large_allocs(1 << 20, || GLOBAL.fast_path_limit());
    assert_eq!(inside, 1 << 20, "a scope lowers it");
    assert_eq!(GLOBAL.fast_path_limit(), 8 << 20, "and its end restores it");
    freezetrap::alloc_guard::set_threshold(None);
    assert_eq!(GLOBAL.fast_path_limit(), usize::MAX);

    let local = freezetrap::GuardedAlloc::new(std::alloc::System);
    let layout = Layout::from_size_align(4096, 8).unwrap();
    // SAFETY: a fresh allocation from `local`, freed by `local` with its layout.
    unsafe {
        let p = local.alloc(layout);
        assert!(!p.is_null());
        local.dealloc(p, layout);
    }
    assert_eq!(
        local.fast_path_limit(),
        0,
        "a local instance is never registered or written"
    );
}
