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

/// Spins on CPU in this one function until `until`: a stall that is the thread's own work.
#[inline(never)]
pub fn spin_in_one_function(until: std::time::Instant) -> u64 {
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    x
}

/// The calling thread's kernel id.
pub fn gettid() -> u64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u64 }
}

/// Threads a capture must not put in its headline: `parked`, waiting on a condvar with a
/// 50 ms timeout all along (a worker idle on its queue), and `freezetrap-watchdog`, half
/// waiting and half working (freezetrap's own; a real service has one of that name).
pub fn start_headline_decoys() {
    let spawn = |name: &str, wait_ms: u64, work_ms: u64| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let m = std::sync::Mutex::new(());
                let cv = std::sync::Condvar::new();
                loop {
                    let g = m.lock().unwrap();
                    drop(cv.wait_timeout(g, Duration::from_millis(wait_ms)).unwrap());
                    if work_ms > 0 {
                        spin_in_one_function(
                            std::time::Instant::now() + Duration::from_millis(work_ms),
                        );
                    }
                }
            })
            .unwrap();
    };
    spawn("parked", 50, 0);
    spawn("freezetrap-watchdog", 20, 20);
}

/// Lines of `reader` on a channel, so a test can wait for one with a timeout.
/// A command that re-runs this test binary, executing only the test `test` in role `role`
/// (`FREEZETRAP_TEST_ROLE`).
#[allow(dead_code)] // not every test binary spawns children
pub fn child(test: &str, role: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("FREEZETRAP_TEST_ROLE", role);
    c
}

pub fn lines_of(reader: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(reader)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits up to `secs` for a line containing `what`; every line seen is kept in `seen`.
pub fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    what: &str,
    secs: u64,
    seen: &mut String,
) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push_str(&l);
                seen.push('\n');
                if l.contains(what) {
                    return l;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {what:?} within {secs} s; saw:\n{seen}");
}

/// Panics unless `summary.json`'s stalled thread is `tid`, on CPU in [`spin_in_one_function`]
/// with a verdict saying so, its frames named and demangled, and the headline free of the
/// [`start_headline_decoys`].
pub fn assert_concluded_on_cpu_in_the_spin(summary: &serde_json::Value, tid: u64) {
    let v = &summary["verdict"];
    assert_eq!(v["cause"], "on_cpu", "{summary:#}");
    assert_eq!(v["culprit"]["thread_id"], tid, "{summary:#}");
    assert!(
        v["culprit"]["what"]
            .as_str()
            .unwrap()
            .contains("spin_in_one_function"),
        "the function it spun in: {summary:#}"
    );
    let st = &summary["stalled_thread"];
    assert_eq!(st["tid"], tid, "{summary:#}");
    assert_eq!(st["name"], "spinner", "{summary:#}");
    let on = st["oncpu_us"].as_u64().unwrap();
    let off = st["offcpu_us"].as_u64().unwrap();
    assert!(
        on > 500_000 && on > 4 * off,
        "on CPU most of the stall: {st:#}"
    );
    let top = st["top_oncpu"][0]["stack"].as_str().unwrap();
    assert!(top.contains("spin_in_one_function"), "{st:#}");
    for frame in top.split(';') {
        assert!(
            !frame.starts_with("0x") && !frame.starts_with("_ZN") && !frame.starts_with("_RN"),
            "every user frame named and demangled: {frame} in {top}"
        );
    }
    for w in summary["top_waits"].as_array().unwrap() {
        let s = w["stack"].as_str().unwrap();
        assert!(
            !s.starts_with("freezetrap-") && !s.starts_with("parked;"),
            "freezetrap's own threads and parked waits stay out of the headline: {s}"
        );
    }
}

/// `go tool pprof <args> <profile>`'s output: a real consumer reading a capture's pprof file.
/// `None` (with a message) when Go is not installed; under CI (`CI=true`) or
/// `FREEZETRAP_REQUIRE_EBPF=1` a missing Go is a failure (`.ci/run` installs golang-go).
pub fn go_pprof(args: &[&str], profile: &std::path::Path) -> Option<String> {
    let go = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("go"))
            .find(|g| g.is_file())
    });
    let Some(go) = go else {
        let strict = std::env::var("CI").as_deref() == Ok("true")
            || std::env::var("FREEZETRAP_REQUIRE_EBPF").as_deref() == Ok("1");
        assert!(!strict, "go is not installed (apt-get install golang-go), and CI needs it to read the pprof files");
        eprintln!(
            "SKIPPED reading {} with go tool pprof: go not installed (apt-get install golang-go)",
            profile.display()
        );
        return None;
    };
    let home = std::env::temp_dir();
    let out = std::process::Command::new(go)
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("HOME", &home)
        .env("GOCACHE", home.join("freezetrap-test-gocache"))
        .output()
        .expect("run go tool pprof");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} {} failed:\n{stdout}\n{}",
        profile.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// Panics unless `go tool pprof` finds the spinner in `dir`'s on-CPU profile, with the file and
/// line of the function it spun in and its thread label, and reads the off-CPU profile.
pub fn assert_pprof_shows_the_spin(dir: &std::path::Path) {
    let Some(top) = go_pprof(&["-top", "-lines"], &dir.join("oncpu.pb.gz")) else {
        return;
    };
    assert!(
        top.lines()
            .any(|l| l.contains("spin_in_one_function") && l.contains("common/mod.rs:")),
        "go tool pprof -top -lines oncpu.pb.gz names the spin with its file and line:\n{top}"
    );
    let tags = go_pprof(&["-tags"], &dir.join("oncpu.pb.gz")).unwrap();
    assert!(tags.contains("spinner"), "the thread label:\n{tags}");
    let off = go_pprof(&["-top"], &dir.join("offcpu.pb.gz")).unwrap();
    assert!(off.contains("Type: offcpu"), "{off}");
}
