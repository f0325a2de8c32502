//! Heartbeating a Tokio runtime (feature `tokio`).
//!
//! A task on the runtime beats every `period`. If the runtime's workers are all blocked (a
//! synchronous call in an async fn, a huge allocation that stalls in the kernel), the task
//! cannot run, its heartbeat goes stale, and the watchdog reports a stall of the runtime.
//!
//! ```
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! let guard = freezetrap_watchdog::tokio::spawn_heartbeat(rt.handle(), "tokio-runtime", std::time::Duration::from_millis(10));
//! // ... run the service on `rt` ...
//! drop(guard); // stops the beating task and unregisters the heartbeat
//! ```

use crate::Heartbeat;
use std::time::Duration;

/// Stops the heartbeat task when dropped.
#[derive(Debug)]
pub struct TokioHeartbeat {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokioHeartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Spawns a task on `handle` that beats a heartbeat named `name` every `period`. Pick `period`
/// well below the stall threshold (a tenth is a good start). The runtime needs its time driver.
pub fn spawn_heartbeat(
    handle: &tokio::runtime::Handle,
    name: &str,
    period: Duration,
) -> TokioHeartbeat {
    let name = name.to_string();
    let task = handle.spawn(async move {
        let hb = Heartbeat::new(&name);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            hb.beat();
        }
    });
    TokioHeartbeat { task }
}
