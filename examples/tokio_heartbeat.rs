//! Heartbeating a Tokio runtime: one task blocks a worker with synchronous work, the runtime's
//! heartbeat task stops running on time, and the watchdog reports it.
//!
//! ```sh
//! FREEZETRAP_STALL=200ms cargo run --release --example tokio_heartbeat
//! ```

use std::time::Duration;

#[global_allocator]
static GLOBAL: freezetrap::GuardedAlloc<tikv_jemallocator::Jemalloc> =
    freezetrap::GuardedAlloc::new(tikv_jemallocator::Jemalloc);

fn main() {
    let _ft = freezetrap::init_from_env();
    if std::env::var_os("FREEZETRAP_STALL").is_none() {
        eprintln!("tokio_heartbeat: set FREEZETRAP_STALL=200ms to see the stall reported");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _hb = freezetrap::watchdog::tokio::spawn_heartbeat(
        rt.handle(),
        "tokio-runtime",
        Duration::from_millis(20),
    );
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A blocking call inside async code: the classic runtime stall.
        std::thread::sleep(Duration::from_millis(800));
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    eprintln!("tokio_heartbeat: done");
}
