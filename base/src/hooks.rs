//! Callbacks a service registers for freezetrap's typed events (`on_stall`, `on_large_alloc`).
//!
//! They run on freezetrap's report threads — never inside the allocator or the stall detector —
//! one after the other, in the order they were registered. A callback that panics is caught: its
//! first panic is said on stderr in one line, it is still called for later events, and
//! reporting goes on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

type Callback<T> = dyn Fn(&T) + Send + Sync + 'static;

struct Hook<T: 'static> {
    f: Box<Callback<T>>,
    /// Set at its first panic (Relaxed: only decides whether a line is printed).
    panicked: AtomicBool,
}

/// A list of callbacks for events of type `T`.
pub struct Hooks<T: 'static> {
    /// What the callbacks are for, for the panic line (`on_stall`).
    name: &'static str,
    list: RwLock<Vec<Arc<Hook<T>>>>,
}

impl<T: 'static> Hooks<T> {
    /// An empty list; `name` is the registering function's name, for messages.
    pub const fn new(name: &'static str) -> Self {
        Hooks {
            name,
            list: RwLock::new(Vec::new()),
        }
    }

    /// Adds a callback.
    pub fn add(&self, f: impl Fn(&T) + Send + Sync + 'static) {
        let hook = Arc::new(Hook {
            f: Box::new(f),
            panicked: AtomicBool::new(false),
        });
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// True when no callback is registered (the caller can skip building the event).
    pub fn is_empty(&self) -> bool {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Calls every callback with `event`. The list is copied first, so a callback may register
    /// another without deadlocking; panics are caught (see the module docs).
    pub fn run(&self, event: &T) {
        let hooks: Vec<Arc<Hook<T>>> = self.list.read().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (hook.f)(event))) {
                if !hook.panicked.swap(true, Ordering::Relaxed) {
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string panic".into());
                    eprintln!(
                        "freezetrap: an {} callback panicked ({why}); it is still called for later events and reporting goes on (said once)",
                        self.name
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn callbacks_run_in_order_and_a_panicking_one_does_not_stop_the_others() {
        static HOOKS: Hooks<u64> = Hooks::new("on_test");
        static SEEN: AtomicU64 = AtomicU64::new(0);
        assert!(HOOKS.is_empty());
        HOOKS.add(|v| {
            if *v == 2 {
                panic!("two");
            }
        });
        HOOKS.add(|v| {
            SEEN.fetch_add(*v, Ordering::Relaxed);
        });
        for v in 1..=3 {
            HOOKS.run(&v);
        }
        assert_eq!(
            SEEN.load(Ordering::Relaxed),
            6,
            "every event reached the second"
        );
        assert!(HOOKS.list.read().unwrap()[0]
            .panicked
            .load(Ordering::Relaxed));
        // A callback that registers another does not deadlock.
        HOOKS.add(|_| HOOKS.add(|_| {}));
        HOOKS.run(&0);
        assert_eq!(HOOKS.list.read().unwrap().len(), 4);
    }
}
