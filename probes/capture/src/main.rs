//! `freezetrap-capture`: records what a frozen process is waiting on, with bpftrace.
//! See [`freezetrap_capture::cli`] for the arguments, outputs and exit codes.

fn main() -> std::process::ExitCode {
    freezetrap_capture::cli::run(std::env::args().skip(1))
}
