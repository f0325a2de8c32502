//! Heartbeating a plain worker loop. Run with a stall threshold and watch the watchdog name the
//! slow iteration:
//!
//! ```sh
//! FREEZETRAP_STALL=200ms cargo run --release --example heartbeat_loop
//! ```

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

fn main() {
    let _ft = freezetrap::init_from_env();
    if std::env::var_os("FREEZETRAP_STALL").is_none() {
        eprintln!("heartbeat_loop: set FREEZETRAP_STALL=200ms to see the stall reported");
    }
    let worker = std::thread::Builder::new()
        .name("worker".into())
        .spawn(|| {
            let mut iteration = 0;
            // One beat per iteration; iteration 5 takes 600 ms.
            freezetrap::watchdog::heartbeat::beat_loop("worker", || {
                iteration += 1;
                let work = if iteration == 5 { 600 } else { 20 };
                std::thread::sleep(Duration::from_millis(work));
                iteration < 10
            });
        })
        .unwrap();
    worker.join().unwrap();
    eprintln!("heartbeat_loop: done");
}
