//! Heartbeating a Tokio runtime (feature `tokio`).
//!
//! Two ways, from coarse to exact:
//!
//! - [`spawn_heartbeat`]: a task on the runtime beats every `period`. If the runtime's workers
//!   are all blocked (a synchronous call in an async fn, a huge allocation that stalls in the
//!   kernel), the task cannot run, its heartbeat goes stale, and the watchdog reports a stall of
//!   the runtime. In a multi-thread runtime one blocked worker is usually missed: another worker
//!   polls the task.
//! - [`worker_heartbeats`] (needs `--cfg tokio_unstable`, for Tokio's task-poll hooks): every
//!   worker thread gets a heartbeat that is active only while the worker polls a task, so one
//!   poll that runs longer than the stall threshold — a `std::thread::sleep`, a long synchronous
//!   loop, a blocking lock — is a stall *of that worker thread*, named by its own thread id,
//!   while busy workers (many short polls) and idle ones (parked) never are. Cost: one clock read
//!   and two relaxed stores per task poll (~25 ns).
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

#[cfg(tokio_unstable)]
mod per_worker {
    use crate::Heartbeat;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    thread_local! {
        /// This worker thread's heartbeat, registered at its first task poll.
        static WORKER: RefCell<Option<Heartbeat>> = const { RefCell::new(None) };
    }

    fn before_poll(name: &str, next: &AtomicUsize) {
        WORKER.with(|w| {
            let mut w = w.borrow_mut();
            match w.as_ref() {
                Some(hb) => hb.beat(),
                None => {
                    // Registered lazily: `on_thread_start` also runs on the blocking pool's
                    // threads, whose `spawn_blocking` work is long on purpose and never polled
                    // through these hooks. Relaxed: a counter for names only.
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    match Heartbeat::try_new(&format!("{name} worker {n}")) {
                        Ok(hb) => *w = Some(hb),
                        Err(e) => eprintln!("{e}: this Tokio worker has no heartbeat"),
                    }
                }
            }
        });
    }

    fn after_poll() {
        WORKER.with(|w| {
            if let Some(hb) = w.borrow().as_ref() {
                hb.idle(); // between polls a worker waits on purpose (or parks)
            }
        });
    }

    /// Gives every worker thread of the runtime `builder` builds a heartbeat named
    /// `"{name} worker {n}"`, active only while that worker polls a task: a poll longer than the
    /// stall threshold is a stall of that worker (its thread id, its kernel stack, a verdict),
    /// and busy or parked workers are never stalled.
    ///
    /// Needs `RUSTFLAGS="--cfg tokio_unstable"` (Tokio's task-poll hooks are unstable). It sets
    /// the builder's `on_before_task_poll`, `on_after_task_poll` and `on_thread_stop` hooks,
    /// replacing any set before (a builder keeps one of each).
    ///
    /// ```
    /// // new_multi_thread() in a service; any runtime flavour polls through the hooks.
    /// let rt = freezetrap_watchdog::tokio::worker_heartbeats(
    ///     tokio::runtime::Builder::new_current_thread().enable_time(),
    ///     "api",
    /// )
    /// .build()
    /// .unwrap();
    /// # drop(rt);
    /// ```
    pub fn worker_heartbeats<'b>(
        builder: &'b mut tokio::runtime::Builder,
        name: &str,
    ) -> &'b mut tokio::runtime::Builder {
        let name: Arc<str> = Arc::from(name);
        let next = Arc::new(AtomicUsize::new(0));
        builder
            .on_before_task_poll(move |_| before_poll(&name, &next))
            .on_after_task_poll(|_| after_poll())
            .on_thread_stop(|| {
                // Unregistered when the worker exits (the runtime shuts down or shrinks).
                let _ = WORKER.try_with(|w| w.borrow_mut().take());
            })
    }
}

#[cfg(tokio_unstable)]
pub use per_worker::worker_heartbeats;
