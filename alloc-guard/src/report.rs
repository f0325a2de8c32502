//! The background reporter: turns recorded events into a human line on stderr and a JSON line in
//! the report, off the allocating threads.
//!
//! It runs on its own thread, marked internal (its allocations are never recorded), polls the
//! ring every [`ReporterConfig::poll_interval`], symbolizes with a cache, and counts every event
//! it could not report (overwritten before it got to it) in [`ReporterStats::lost`], also writing
//! a `{"event":"dropped",...}` line so that nothing is lost silently.

use crate::config::{HumanBytes, HumanNanos};
use crate::ring::{Cursor, RawEvent, RING};
use crate::symbolize::{first_user_frame, Frame, Symbolizer};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
pub struct ReportWriter {
    sink: ReportSink,
    file: parking_lot::Mutex<Option<File>>,
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
    pub fn open_in(sink: ReportSink, out: Option<&crate::dirs::Dir>) -> io::Result<ReportWriter> {
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
            file: parking_lot::Mutex::new(file),
            failures: AtomicU64::new(0),
        })
    }

    /// A writer that discards JSON.
    pub fn off() -> ReportWriter {
        ReportWriter {
            sink: ReportSink::Off,
            file: parking_lot::Mutex::new(None),
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
            ReportSink::File(_) => match self.file.lock().as_mut() {
                Some(f) => f.write_all(&line),
                None => Ok(()),
            },
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
fn open_report_file(path: &Path, out: Option<&crate::dirs::Dir>) -> io::Result<File> {
    let path = std::path::absolute(path)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no UTF-8 file name"))?;
    match out {
        Some(dir) if path.parent() == Some(dir.path()) => dir.open_append(name),
        _ => crate::dirs::Dir::open_parent_of(&path, crate::dirs::Owners::root_or_me())
            .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?
            .open_append(name),
    }
}

/// A `large_alloc` report line, exactly the contract's fields (plus `address`).
#[derive(Debug, Serialize)]
pub struct LargeAllocLine<'a> {
    /// Always `"large_alloc"`.
    pub event: &'static str,
    /// Sequence number.
    pub seq: u64,
    /// `alloc`, `alloc_zeroed` or `realloc`.
    pub kind: &'static str,
    /// Requested size.
    pub size: u64,
    /// Size before a realloc, else 0.
    pub old_size: u64,
    /// Returned address (0 = the inner allocator failed).
    pub address: u64,
    /// Kernel thread id.
    pub thread_id: u64,
    /// Kernel thread name.
    pub thread_name: &'a str,
    /// `CLOCK_MONOTONIC` ns at entry.
    pub ts_ns: u64,
    /// ns inside the inner allocator.
    pub duration_ns: u64,
    /// Caller frames, allocator frames removed.
    pub frames: &'a [Frame],
}

/// The human one-liner for an event, in freezetrap's message grammar.
pub fn human_line(ev: &RawEvent, frames: &[Frame]) -> String {
    let what = if ev.old_size > 0 {
        format!(
            "{} {} (from {})",
            HumanBytes(ev.size),
            ev.kind.as_str(),
            HumanBytes(ev.old_size)
        )
    } else {
        format!("{} {}", HumanBytes(ev.size), ev.kind.as_str())
    };
    let at = first_user_frame(frames)
        .map(|f| f.to_string())
        .unwrap_or_else(|| "<unknown caller>".into());
    let failed = if ev.address == 0 {
        " FAILED (null)"
    } else {
        ""
    };
    format!(
        "freezetrap: large allocation: {what}{failed} on thread '{}' (tid {}) took {} at {at}",
        ev.thread_name(),
        ev.thread_id,
        HumanNanos(ev.duration_ns)
    )
}

/// How the reporter behaves.
#[derive(Clone)]
pub struct ReporterConfig {
    /// Where JSON lines go.
    pub writer: Arc<ReportWriter>,
    /// Print one human line per event on stderr (`FREEZETRAP_QUIET=1` turns it off).
    pub human_lines: bool,
    /// How often the ring is polled. Default 50 ms.
    pub poll_interval: Duration,
}

/// What the reporter did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReporterStats {
    /// Events written.
    pub reported: u64,
    /// Events overwritten or abandoned before the reporter got to them.
    pub lost: u64,
}

struct Shared {
    stop: AtomicBool,
    position: AtomicU64,
    reported: AtomicU64,
    lost: AtomicU64,
}

/// The running reporter thread. Dropping it reports what is left and stops the thread.
pub struct Reporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts the reporter thread (`freezetrap-report`). It reports events recorded from now on
    /// and those still in the ring from before.
    pub fn start(cfg: ReporterConfig) -> io::Result<Reporter> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            position: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("freezetrap-report".into())
            .spawn(move || run(cfg, sh))?;
        Ok(Reporter {
            shared,
            thread: Some(thread),
        })
    }

    /// Tallies so far.
    pub fn stats(&self) -> ReporterStats {
        ReporterStats {
            reported: self.shared.reported.load(Ordering::Acquire),
            lost: self.shared.lost.load(Ordering::Acquire),
        }
    }

    /// Waits until every event recorded before this call has been reported or counted lost, or
    /// `timeout` passes. Returns whether it caught up.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = RING.recorded();
        let deadline = Instant::now() + timeout;
        while self.shared.position.load(Ordering::Acquire) < target {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(cfg: ReporterConfig, sh: Arc<Shared>) {
    crate::record::mark_current_thread_internal();
    let mut sym = Symbolizer::new();
    let mut cursor = Cursor::new(&RING, true);
    let mut lost_announced = 0;
    loop {
        let stopping = sh.stop.load(Ordering::Acquire);
        let stats = cursor.poll(|ev| {
            let frames = sym.resolve(ev.frames());
            if cfg.human_lines {
                eprintln!("{}", human_line(ev, &frames));
            }
            cfg.writer.write_json(&LargeAllocLine {
                event: "large_alloc",
                seq: ev.seq,
                kind: ev.kind.as_str(),
                size: ev.size,
                old_size: ev.old_size,
                address: ev.address,
                thread_id: ev.thread_id,
                thread_name: ev.thread_name(),
                ts_ns: ev.ts_ns,
                duration_ns: ev.duration_ns,
                frames: &frames,
            });
        });
        if stats.lost > lost_announced {
            let n = stats.lost - lost_announced;
            eprintln!(
                "freezetrap: {n} large-allocation event(s) dropped before they could be reported ({} in total): the ring holds the last {}",
                stats.lost,
                crate::ring::CAPACITY
            );
            cfg.writer.write_json(&serde_json::json!({
                "event": "dropped", "count": n, "total": stats.lost,
            }));
            lost_announced = stats.lost;
        }
        // Release: `flush` Acquire-loads position and then reads the counters.
        sh.reported.store(stats.read, Ordering::Release);
        sh.lost.store(stats.lost, Ordering::Release);
        sh.position.store(cursor.position(), Ordering::Release);
        if stopping {
            break;
        }
        std::thread::park_timeout(cfg.poll_interval);
    }
}
