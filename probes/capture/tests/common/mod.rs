//! What the eBPF tests of this crate share: the skip rule and the target's ingredients.
#![allow(dead_code)] // each test file uses its part

use std::time::Duration;

/// True when the test can use eBPF (root and bpftrace on PATH). Otherwise prints why and skips,
/// or panics when `FREEZETRAP_REQUIRE_EBPF=1` (CI) forbids skipping.
pub fn ebpf_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let bpftrace = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bpftrace").is_file()))
        .unwrap_or(false);
    if root && bpftrace {
        return true;
    }
    let why = if !root {
        "not root"
    } else {
        "bpftrace not installed (apt-get install bpftrace)"
    };
    if std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() == Ok("1") {
        panic!("freezetrap: {test} needs eBPF but {why}, and FREEZETRAP_REQUIRE_EBPF=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why} (set FREEZETRAP_REQUIRE_EBPF=1 to make this a failure)");
    false
}

/// 1 GiB, every page touched: enough resident memory that a fork holds mmap_lock for
/// milliseconds.
pub fn resident_gib() -> Vec<u8> {
    let mut big = vec![0u8; 1 << 30];
    for i in (0..big.len()).step_by(4096) {
        big[i] = 1;
    }
    big
}

/// `n` threads named `mmapper-N` that map, touch and unmap 64 KiB in a loop: each mmap takes
/// mmap_lock for write, so they wait whenever a fork holds it.
pub fn start_mmappers(n: usize) {
    for i in 0..n {
        std::thread::Builder::new()
            .name(format!("mmapper-{i}"))
            .spawn(|| loop {
                // SAFETY: a fresh private anonymous mapping, touched and unmapped.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        1 << 16,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    *(p as *mut u8) = 1;
                    libc::munmap(p, 1 << 16);
                }
                std::thread::sleep(Duration::from_micros(200));
            })
            .unwrap();
    }
}

/// Forks (the child exits at once) and waits for the child: one real mmap_lock write hold.
pub fn fork_once() {
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    // SAFETY: waiting for our own child; a null status pointer is allowed.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
}

/// CLOCK_MONOTONIC in ns: the clock bpftrace's nsecs and the probes use.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Panics unless `path` is a non-trivial, well-formed SVG.
pub fn assert_svg(path: &std::path::Path) {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(svg.contains("<svg") && svg.len() > 1000);
    let mut reader = quick_xml::Reader::from_str(&svg);
    let mut elements = 0;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(quick_xml::events::Event::Start(_)) => elements += 1,
            Ok(_) => {}
            Err(e) => panic!(
                "{} is not well-formed XML at {}: {e}",
                path.display(),
                reader.buffer_position()
            ),
        }
    }
    assert!(elements > 10);
}
