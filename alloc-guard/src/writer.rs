//! Where JSON report lines go: a file appended to (opened by handle, never through a symlink),
//! stderr, or nowhere. Shared by the allocation reporter and the watchdog; write failures are
//! counted and said once, and the service keeps running.

use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Where the JSON-lines report goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportSink {
    /// No JSON report (the default). Human lines still go to stderr.
    Off,
    /// JSON lines on stderr, after the human lines.
    Stderr,
    /// JSON lines appended to this file.
    File(PathBuf),
}

impl ReportSink {
    /// Parses `FREEZETRAP_REPORT`'s value: `off`, `stderr` or a path; a relative path is taken
    /// under `out_dir` when one is given.
    pub fn parse(value: &str, out_dir: Option<&Path>) -> ReportSink {
        match value.trim() {
            "" | "off" | "OFF" | "0" => ReportSink::Off,
            "stderr" | "STDERR" => ReportSink::Stderr,
            p => {
                let p = Path::new(p);
                match out_dir {
                    Some(dir) if p.is_relative() => ReportSink::File(dir.join(p)),
                    _ => ReportSink::File(p.to_path_buf()),
                }
            }
        }
    }
}

/// A JSON-lines writer shared by the reporter and the watchdog. Write failures (a full disk, a
/// deleted directory) are counted and announced once on stderr; the service keeps running.
#[derive(Debug)]
pub struct ReportWriter {
    sink: ReportSink,
    file: Mutex<Option<File>>,
    failures: AtomicU64,
}

impl ReportWriter {
    /// Opens the sink, appending to a file (created 0600 if missing). The file is opened without
    /// following a symbolic link and must be a regular file owned by this process's user; every
    /// directory above it must be owned by root or this user and not writable by others (a
    /// root-owned sticky directory such as `/tmp` excepted). An error names the path and why.
    pub fn open(sink: ReportSink) -> io::Result<ReportWriter> {
        Self::open_in(sink, None)
    }

    /// Like [`ReportWriter::open`]; a report file directly inside `out` (`FREEZETRAP_OUT`,
    /// already opened and checked) is opened through that handle.
    pub fn open_in(
        sink: ReportSink,
        out: Option<&crate::config::OutDir>,
    ) -> io::Result<ReportWriter> {
        let file = match &sink {
            ReportSink::File(p) => Some(open_report_file(p, out).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open report file {}: {e}", p.display()),
                )
            })?),
            _ => None,
        };
        Ok(ReportWriter {
            sink,
            file: Mutex::new(file),
            failures: AtomicU64::new(0),
        })
    }

    /// A writer that discards JSON.
    pub fn off() -> ReportWriter {
        ReportWriter {
            sink: ReportSink::Off,
            file: Mutex::new(None),
            failures: AtomicU64::new(0),
        }
    }

    /// The sink this writer writes to.
    pub fn sink(&self) -> &ReportSink {
        &self.sink
    }

    /// Lines that could not be written.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Appends one JSON value as a line.
    pub fn write_json<T: Serialize>(&self, value: &T) {
        let mut line = match serde_json::to_vec(value) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let res = match &self.sink {
            ReportSink::Off => Ok(()),
            ReportSink::Stderr => io::stderr().lock().write_all(&line),
            ReportSink::File(_) => {
                match self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    Some(f) => f.write_all(&line),
                    None => Ok(()),
                }
            }
        };
        if let Err(e) = res {
            if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!(
                    "freezetrap: writing the report to {:?} failed: {e}: report lines are being lost (counted); free space or fix FREEZETRAP_REPORT",
                    self.sink
                );
            }
        }
    }
}

/// Opens the report file `path` for appending, by handle (see [`ReportWriter::open`]).
#[cfg(ft_linux)]
fn open_report_file(path: &Path, out: Option<&crate::config::OutDir>) -> io::Result<File> {
    let path = std::path::absolute(path)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no UTF-8 file name"))?;
    match out {
        Some(dir) if path.parent() == Some(dir.path()) => dir.open_append(name),
        _ => base::dirs::Dir::open_parent_of(&path, base::dirs::Owners::root_or_me())
            .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?
            .open_append(name),
    }
}

/// Elsewhere: the file is opened without following a symlink at its last component and must be
/// a regular file.
#[cfg(not(ft_linux))]
fn open_report_file(path: &Path, _out: Option<&crate::config::OutDir>) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}
