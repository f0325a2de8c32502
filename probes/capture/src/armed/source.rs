//! Where the recorder's events come from: bpftrace running `armed.bt` (its output decoded line
//! by line), or the compiled program, polled on a thread. Both feed one channel of [`Line`]s.

use super::lines::{parse_line, Event};
use crate::compiled::{Recording, Settings};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the compiled program's ring buffer and maps are read: often enough that a stall
/// probe is seen within this, rarely enough to cost nothing (10 wake-ups a second).
const POLL: Duration = Duration::from_millis(100);

/// One event, or the end of the source.
pub(super) enum Line {
    Event(Event),
    Eof,
}

pub(super) enum Source {
    Bpftrace {
        child: Child,
        reader: JoinHandle<()>,
        errors: JoinHandle<String>,
    },
    Compiled {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    },
}

impl Source {
    /// Reads a bpftrace child's output (stdout and stderr piped) on threads.
    pub(super) fn bpftrace(mut child: Child, tx: mpsc::Sender<Line>) -> Self {
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            crate::for_each_line(stdout, |line| {
                tx.send(Line::Event(parse_line(&line))).is_ok()
            });
            let _ = tx.send(Line::Eof);
        });
        let errors = crate::collect_stderr(child.stderr.take().expect("piped"));
        Source::Bpftrace {
            child,
            reader,
            errors,
        }
    }

    /// Loads and attaches the compiled program on its own thread (the loaded program stays
    /// there), then polls it until [`Source::finish`]. Loading errors come back as one line.
    pub(super) fn compiled(
        pid: u32,
        exe: PathBuf,
        min_block_us: u64,
        bucket_ms: u64,
        tx: mpsc::Sender<Line>,
    ) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let settings = Settings {
                pid,
                exe: Some(&exe),
                min_block_us,
                bucket_ms,
                slots: crate::compiled::SLOTS,
            };
            let mut rec = match Recording::start(&settings) {
                Ok(r) => r,
                Err(why) => {
                    let _ = started_tx.send(Err(why));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            let _ = tx.send(Line::Event(Event::Armed));
            loop {
                // Acquire: pairs with the Release store in `finish`; nothing else is published
                // through it, so this is only for clarity.
                let last = stopping.load(Ordering::Acquire);
                let mut send = |e| {
                    let _ = tx.send(Line::Event(e));
                };
                rec.poll(base::clock::monotonic_ns(), last, &mut send);
                if last {
                    break;
                }
                std::thread::sleep(POLL);
            }
            drop(rec);
            let _ = tx.send(Line::Eof);
        });
        match started_rx.recv() {
            Ok(Ok(())) => Ok(Source::Compiled { stop, thread }),
            Ok(Err(why)) => {
                let _ = thread.join();
                Err(why)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the compiled recorder's thread ended while loading".into())
            }
        }
    }

    /// Why the source ended by itself.
    pub(super) fn failure(&mut self) -> String {
        match self {
            Source::Bpftrace { child, .. } => {
                let _ = child.wait();
                "bpftrace exited".into()
            }
            Source::Compiled { .. } => "the compiled recorder's thread ended".into(),
        }
    }

    /// bpftrace's first error line, once it has exited.
    pub(super) fn errors(self) -> Option<String> {
        match self {
            Source::Bpftrace {
                mut child,
                reader,
                errors,
            } => {
                crate::stop_bpftrace(&mut child, Duration::from_secs(2));
                let _ = reader.join();
                let text = errors.join().unwrap_or_default();
                crate::first_error(&text).map(str::to_string)
            }
            Source::Compiled { stop, thread } => {
                stop.store(true, Ordering::Release);
                let _ = thread.join();
                None
            }
        }
    }

    /// Asks for the last data: bpftrace prints its maps on SIGINT; the compiled thread hands on
    /// every bucket it holds. Either then ends with [`Line::Eof`].
    pub(super) fn finish(&mut self) {
        match self {
            Source::Bpftrace { child, .. } => crate::interrupt(child),
            Source::Compiled { stop, .. } => stop.store(true, Ordering::Release),
        }
    }

    /// Stops a hung source at once.
    pub(super) fn kill(&mut self) {
        match self {
            Source::Bpftrace { child, .. } => {
                crate::stop_bpftrace(child, Duration::from_secs(2));
            }
            Source::Compiled { stop, .. } => stop.store(true, Ordering::Release),
        }
    }

    /// Stops the source and waits for its threads.
    pub(super) fn stop(self) {
        let _ = self.errors();
    }

    pub(super) fn is_bpftrace(&self) -> bool {
        matches!(self, Source::Bpftrace { .. })
    }
}
