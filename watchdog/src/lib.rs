//! `watchdog`: freezetrap's stall detector (work in progress, see issue #3).
//!
//! This crate will hold the heartbeat registry, the process-hiccup detector, the suspect
//! correlation with `alloc-guard`'s events and the capture trigger. For now it only re-exports
//! what it will build on, so the workspace's dependency direction
//! (probes <- alloc-guard <- watchdog <- freezetrap) is in place.
#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

pub use alloc_guard;
