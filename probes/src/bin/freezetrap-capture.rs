//! `freezetrap-capture`: records what a frozen process is waiting on, with bpftrace.
//! See [`probes::capture::cli`] for the arguments, outputs and exit codes.

fn main() -> std::process::ExitCode {
    probes::capture::cli::run(std::env::args().skip(1))
}
