//! The snapshot on this process's own threads.

use super::*;

#[test]
fn sees_this_thread_with_its_name() {
    let h = std::thread::Builder::new()
        .name("procview-test".into())
        .spawn(|| {
            let mut snap = ProcSnapshot::new_boxed();
            snap.take();
            let me = base::thread::current_tid();
            let t = snap
                .threads()
                .iter()
                .find(|t| t.tid == me)
                .copied()
                .expect("own thread listed");
            (t.name().to_string(), t.state)
        })
        .unwrap();
    let (name, state) = h.join().unwrap();
    assert_eq!(name, "procview-test");
    assert_eq!(state, b'R');
}

#[test]
fn counters_move_with_what_each_thread_does() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let go = Arc::new(AtomicBool::new(false));
    let spin = {
        let go = go.clone();
        std::thread::Builder::new()
            .name("spinner".into())
            .spawn(move || {
                while !go.load(Ordering::Relaxed) {}
                let t = std::time::Instant::now();
                while t.elapsed() < std::time::Duration::from_millis(200) {
                    std::hint::black_box(0u64);
                }
            })
            .unwrap()
    };
    let done = Arc::new(AtomicBool::new(false));
    let fault = {
        let (go, done) = (go.clone(), done.clone());
        std::thread::Builder::new()
            .name("faulter".into())
            .spawn(move || {
                while !go.load(Ordering::Relaxed) {}
                let mut v = vec![0u8; 64 << 20];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                std::hint::black_box(&v);
                // Stay alive until the end counters are read.
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
            .unwrap()
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut snap = ProcSnapshot::new_boxed();
    snap.take();
    go.store(true, Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(150));
    snap.take_end();
    let of = |name: &str| {
        let i = snap
            .threads()
            .iter()
            .position(|t| t.name() == name)
            .unwrap();
        snap.delta(i).unwrap()
    };
    let s = of("spinner");
    assert!(s.cpu_ns >= 60_000_000, "the spinner ran: {s:?}");
    let f = of("faulter");
    assert!(f.minflt >= 10_000, "64 MiB of fresh pages: {f:?}");
    done.store(true, Ordering::Relaxed);
    spin.join().unwrap();
    fault.join().unwrap();
}

#[test]
fn a_thread_that_exits_when_its_stall_ends_keeps_its_latest_reading() {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (faulted_tx, faulted_rx) = std::sync::mpsc::channel::<u64>();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let leaver = std::thread::Builder::new()
        .name("leaver".into())
        .spawn(move || {
            go_rx.recv().unwrap();
            let mut v = vec![0u8; 32 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            std::hint::black_box(&v);
            faulted_tx.send(base::thread::current_tid()).unwrap();
            exit_rx.recv().unwrap();
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut snap = ProcSnapshot::new_boxed();
    snap.take();
    go_tx.send(()).unwrap();
    let tid = faulted_rx.recv().unwrap();
    snap.refresh_end_of(tid); // a tick while the stall is open
    exit_tx.send(()).unwrap();
    leaver.join().unwrap(); // gone before the end is read
    snap.take_end();
    let i = snap.threads().iter().position(|t| t.tid == tid).unwrap();
    let d = snap.delta(i).expect("the latest reading stands in");
    assert!(d.minflt >= 8000, "32 MiB of fresh pages: {d:?}");
    // A fresh snapshot forgets the end readings of the one before.
    snap.take();
    let i = snap.threads().iter().position(|t| t.tid != tid).unwrap();
    assert!(snap.delta(i).is_none(), "no end reading yet");
}

#[test]
fn a_sleeping_thread_shows_its_wait() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::Builder::new()
        .name("sleeper".into())
        .spawn(move || rx.recv().ok())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut snap = ProcSnapshot::new_boxed();
    snap.take();
    let t = snap
        .threads()
        .iter()
        .find(|t| t.name() == "sleeper")
        .expect("sleeper listed");
    assert_eq!(t.state, b'S');
    if unsafe { libc::geteuid() } == 0 {
        let st = t.kernel_stack();
        assert!(st.iter().any(|f| f.contains("futex")), "{st:?}");
    }
    tx.send(()).unwrap();
    h.join().unwrap();
}
