//! The recorder itself: finding the target, recording it (the compiled program, or `armed.bt`
//! under bpftrace), feeding the rolling window, and writing a capture when a stall comes due.

use super::lines::{Event, StallSeen};
use super::source::{Line, Source};
use super::window::{Ready, Window};
use super::{disk, ns, program, Args, BUCKET_MS, MAX_ENTRIES};
use crate::cli::Engine;
use crate::preflight::{self, Refusal};
use crate::symbols::TargetSymbols;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) enum Outcome {
    TargetExited,
    Stopped,
    /// Time for a fresh bpftrace: its stack maps are never emptied, and once they fill, new
    /// stacks are lost (bpftrace 0.17 does not ask the kernel to reuse stack ids).
    Rearm,
}

pub(crate) struct Recorder<'a> {
    pub(crate) args: &'a Args,
    /// bpftrace, or why it cannot be used (said only if it is needed).
    pub(crate) bpftrace: Result<PathBuf, Refusal>,
    /// Whether to try the compiled program (false after it failed to load under `auto`).
    pub(crate) compiled: bool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) captures: u64,
    pub(crate) skipped: u64,
    pub(crate) last_capture_end_ns: u64,
}

/// What one bpftrace run on one target has gathered.
pub(crate) struct Session {
    pid: u32,
    window: Window,
    lost: u64,
    armed: bool,
    /// The target's user-frame names, from files held open while it runs (taken on a thread:
    /// reading its maps waits out a freeze).
    symbols: Option<TargetSymbols>,
    symbols_rx: Option<mpsc::Receiver<TargetSymbols>>,
}

impl Session {
    /// The symbol snapshot, once its thread has delivered it.
    fn symbols(&mut self) -> Option<&TargetSymbols> {
        if let Some(rx) = &self.symbols_rx {
            if let Ok(s) = rx.try_recv() {
                self.symbols = Some(s);
                self.symbols_rx = None;
            }
        }
        self.symbols.as_ref()
    }
}

impl Recorder<'_> {
    fn should_stop(&self) -> bool {
        crate::stop_requested()
            || self.deadline.is_some_and(|d| Instant::now() >= d)
            || self
                .args
                .max_captures
                .is_some_and(|max| self.captures >= max)
    }

    /// Polls /proc for a live process whose executable is `path` (same device and inode).
    pub(crate) fn wait_for_process(&self, path: &Path) -> Option<u32> {
        let want = std::fs::metadata(path).ok()?;
        let mut said = false;
        while !self.should_stop() {
            let found = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
                (m.dev() == want.dev() && m.ino() == want.ino() && preflight::pid_alive(pid))
                    .then_some(pid)
            });
            if found.is_some() {
                return found;
            }
            if !said {
                eprintln!(
                    "freezetrap-capture: waiting for a process running {}",
                    path.display()
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        None
    }

    fn spawn_bpftrace(&self, pid: u32, exe: &Path, program: &str) -> Result<Child, Refusal> {
        let bpftrace = self.bpftrace.as_ref().map_err(Clone::clone)?;
        // Maps are printed (and user stacks symbolized) four times a second: the symbol
        // cache that bpftrace_command turns on is what keeps that cheap (uncached, one print of
        // 100 stacks took 3.5 s on the demo binary, and blocked while the target's mmap_lock
        // was held).
        let mut args: Vec<std::ffi::OsString> = vec![
            pid.to_string().into(),
            exe.as_os_str().to_owned(),
            self.args.min_block_us.to_string().into(),
            BUCKET_MS.to_string().into(),
        ];
        args.extend(
            preflight::FieldOffsets::from_tracefs_or_default()
                .args()
                .map(Into::into),
        );
        crate::bpftrace_command(bpftrace, program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Refusal::new(
                    preflight::EXIT_NO_BPFTRACE,
                    format!("cannot run {}: {e}", bpftrace.display()),
                )
            })
    }

    /// The compiled program when it is wanted and loads; otherwise bpftrace (under `auto`, the
    /// reason is said once, and later sessions go straight to bpftrace).
    fn start_source(
        &mut self,
        pid: u32,
        exe: &Path,
        program: &str,
        tx: mpsc::Sender<Line>,
    ) -> Result<Source, Refusal> {
        if self.compiled {
            match Source::compiled(
                pid,
                exe.to_path_buf(),
                self.args.min_block_us,
                BUCKET_MS,
                tx.clone(),
            ) {
                Ok(source) => return Ok(source),
                Err(why) if self.args.engine == Engine::Compiled => {
                    return Err(Refusal::new(preflight::EXIT_BPFTRACE_FAILED, why))
                }
                Err(why) => {
                    eprintln!("freezetrap-capture: {why}; recording with bpftrace instead");
                    self.compiled = false;
                }
            }
        }
        let child = self.spawn_bpftrace(pid, exe, program)?;
        Ok(Source::bpftrace(child, tx))
    }

    /// Records `pid` until it exits, the recorder is told to stop, or bpftrace fails.
    pub(crate) fn new_session(&self, pid: u32) -> Session {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(s) = TargetSymbols::snapshot(pid) {
                let _ = tx.send(s);
            }
        });
        Session {
            pid,
            window: Window::new(
                BUCKET_MS * 1_000_000,
                ns(self.args.window),
                ns(self.args.after),
                MAX_ENTRIES,
            ),
            lost: 0,
            armed: false,
            symbols: None,
            symbols_rx: Some(rx),
        }
    }

    /// Runs one bpftrace on `state.pid` until the target exits, the recorder is told to stop,
    /// it is time to re-arm, or bpftrace fails.
    pub(crate) fn record(&mut self, state: &mut Session) -> Result<Outcome, Refusal> {
        let pid = state.pid;
        let started = Instant::now();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| {
            Refusal::new(
                preflight::EXIT_TARGET_GONE,
                format!("target pid {pid} is gone ({e})"),
            )
        })?;
        if exe.to_string_lossy().ends_with(" (deleted)") {
            return Err(Refusal::new(
                preflight::EXIT_TARGET_GONE,
                format!("the executable of pid {pid} was deleted or replaced ({}): the USDT probes cannot be attached; restart the target", exe.display()),
            ));
        }
        let exe = reachable_exe(pid, exe);
        let program = program::for_binary(&exe)?;
        if !state.armed {
            if let Some(line) = crate::frame_pointers::warning(&exe) {
                eprintln!("{line}");
            }
        }
        let (tx, rx) = mpsc::channel();
        let mut source = self.start_source(pid, &exe, &program, tx)?;

        let mut last_line = Instant::now();
        let outcome = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Line::Event(e)) => {
                    last_line = Instant::now();
                    self.handle(state, e, &exe, started);
                }
                Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let who = if source.is_bpftrace() {
                        "bpftrace"
                    } else {
                        "the compiled recorder"
                    };
                    let why = source.failure();
                    let why = source.errors().unwrap_or(why);
                    return Err(Refusal::new(
                        preflight::EXIT_BPFTRACE_FAILED,
                        format!("{who} stopped recording pid {pid}: {why}"),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if last_line.elapsed() > self.args.silence_limit {
                        // The source sends a tick four times a second once attached. Silence
                        // this long is a hang (a freeze of the target delays prints only by its
                        // length, and the buckets keep their own times, so a late print loses
                        // nothing).
                        source.kill();
                        break Err(Refusal::new(
                            preflight::EXIT_BPFTRACE_FAILED,
                            format!(
                                "{} {} for {} s; stopped it",
                                if source.is_bpftrace() {
                                    "bpftrace"
                                } else {
                                    "the compiled recorder"
                                },
                                match (state.armed, source.is_bpftrace()) {
                                    (true, true) => "printed nothing",
                                    (true, false) => "sent nothing",
                                    (false, _) => "did not attach",
                                },
                                self.args.silence_limit.as_secs()
                            ),
                        ));
                    }
                }
            }
            if self.should_stop() {
                break Ok(Outcome::Stopped);
            }
            if !preflight::pid_alive(pid) {
                eprintln!("freezetrap-capture: pid {pid} exited");
                break Ok(Outcome::TargetExited);
            }
            // Only bpftrace's stack maps fill; the compiled program needs no re-arming.
            if source.is_bpftrace()
                && started.elapsed() >= self.args.rearm_every
                && !state.window.has_pending()
            {
                break Ok(Outcome::Rearm);
            }
        };
        if outcome.is_ok() {
            // The last buckets before the end are still in the kernel's maps: the source hands
            // them all on, and everything it sends until it ends (5 s at most) still counts.
            source.finish();
            let until = Instant::now() + Duration::from_secs(5);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(Line::Event(e)) => self.handle(state, e, &exe, started),
                    _ => break,
                }
            }
        }
        // Whatever is pending gets written with the data that is in.
        for ready in state.window.flush() {
            self.write(state, ready);
        }
        drop(rx);
        source.stop();
        let (late, dropped) = (state.window.late_entries, state.window.dropped_entries);
        if !matches!(outcome, Ok(Outcome::Rearm)) && late + dropped + state.lost > 0 {
            eprintln!(
                "freezetrap-capture: pid {pid}: {late} late and {dropped} dropped map entries, {} lost perf events",
                state.lost
            );
        }
        outcome
    }

    /// One line of bpftrace's output.
    fn handle(&mut self, state: &mut Session, event: Event, exe: &Path, started: Instant) {
        match event {
            Event::Armed if state.armed => {
                eprintln!(
                    "freezetrap-capture: re-armed on pid {} in {:.2} s (a fresh bpftrace every {} s keeps its stack maps from filling)",
                    state.pid,
                    started.elapsed().as_secs_f64(),
                    self.args.rearm_every.as_secs()
                );
            }
            Event::Armed => {
                state.armed = true;
                eprintln!(
                    "freezetrap-capture: armed on pid {} ({}) with {} in {:.2} s: keeping {:?} before a stall and {:?} after; captures go to {}",
                    state.pid,
                    exe.display(),
                    if self.compiled {
                        "the compiled program"
                    } else {
                        "bpftrace"
                    },
                    started.elapsed().as_secs_f64(),
                    self.args.window,
                    self.args.after,
                    self.args.out.path().display()
                );
            }
            Event::StallBegin(stall) => self.stall_begin(&mut state.window, state.pid, stall),
            Event::StallEnd { id, duration_ns } => state.window.stall_end(id, duration_ns),
            Event::Map { name, entries } => state.window.add_map(&name, entries),
            Event::Tick(b) => {
                for ready in state.window.tick(b) {
                    self.write(state, ready);
                }
            }
            Event::Lost(n) => state.lost += n,
            Event::Other => {}
        }
    }

    fn stall_begin(&mut self, window: &mut Window, pid: u32, stall: StallSeen) {
        let now = base::clock::monotonic_ns();
        let seen_ms = now.saturating_sub(stall.probe_ns) as f64 / 1e6;
        let cooldown_ns = ns(self.args.cooldown);
        if self.last_capture_end_ns > 0
            && stall.probe_ns < self.last_capture_end_ns.saturating_add(cooldown_ns)
            && stall.probe_ns > self.last_capture_end_ns
        {
            self.skipped += 1;
            eprintln!(
                "freezetrap-capture: stall {} of pid {pid} not captured: within the {:?} cooldown",
                stall.id, self.args.cooldown
            );
            return;
        }
        let id = stall.id;
        let probe_ns = stall.probe_ns;
        if window.stall_begin(stall) {
            self.last_capture_end_ns = probe_ns.saturating_add(ns(self.args.after));
            eprintln!(
                "freezetrap-capture: stall {id} began in pid {pid} (seen {seen_ms:.1} ms after the probe); writing {:?} before and {:?} after it",
                self.args.window, self.args.after
            );
        }
    }

    fn write(&mut self, state: &mut Session, mut ready: Ready) {
        if self
            .args
            .max_captures
            .is_some_and(|max| self.captures >= max)
        {
            eprintln!(
                "freezetrap-capture: stall {} not written: --max-captures reached",
                ready.stalls[0].id
            );
            return;
        }
        let counts = disk::Counts {
            late_entries: state.window.late_entries,
            dropped_entries: state.window.dropped_entries,
            lost_events: state.lost,
            lost_stacks: state.window.lost_stacks,
        };
        // Name the user frames ourselves (demangled, and still named if the target has exited
        // since): refresh the snapshot first while the target is alive, for libraries it
        // loaded after we armed.
        let pid = state.pid;
        if preflight::pid_alive(pid) {
            if let Some(syms) = state.symbols.as_mut() {
                let _ = syms.refresh(pid);
            }
        }
        let pid = state.pid;
        let syms = state.symbols();
        if let Some(syms) = syms {
            crate::resymbolize(&mut ready.maps, syms);
            crate::resymbolize(&mut ready.stall_maps, syms);
        }
        let written = disk::write(&self.args.out, pid, &ready, counts, syms);
        match written {
            Ok((dir, line)) => {
                self.captures += 1;
                println!("{line}");
                disk::enforce_byte_cap(&self.args.out, self.args.max_bytes, Some(&dir));
            }
            Err(e) => {
                eprintln!("freezetrap-capture: {e}");
                // A full disk: make room for the next one.
                disk::enforce_byte_cap(&self.args.out, self.args.max_bytes, None);
            }
        }
    }
}

/// The target's executable as a path this process can open: the link's own path, or, when
/// the target lives in another mount namespace (a container) where that path means another
/// file or none, the same path under `/proc/PID/root`.
fn reachable_exe(pid: u32, exe: PathBuf) -> PathBuf {
    let target = std::fs::metadata(format!("/proc/{pid}/exe")).ok();
    let same = |p: &Path| {
        let m = std::fs::metadata(p).ok();
        matches!((&m, &target), (Some(a), Some(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    };
    if same(&exe) {
        return exe;
    }
    let inside =
        Path::new(&format!("/proc/{pid}/root")).join(exe.strip_prefix("/").unwrap_or(&exe));
    if same(&inside) {
        inside
    } else {
        exe
    }
}
