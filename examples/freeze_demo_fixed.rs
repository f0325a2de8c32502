//! The fix, as the incident write-up describes it: the same service with the index reserved up
//! front (`HashMap::with_capacity`). The 1 GiB table is still allocated (and recorded), once, at
//! start; there is no resize, so no resize stall.
//!
//! ```sh
//! cargo run --release --example freeze_demo_fixed
//! ```

#[path = "freeze_demo.rs"]
mod demo;

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--pid") {
        return freezetrap_capture::cli::run(std::env::args().skip(1));
    }
    demo::run(true)
}
