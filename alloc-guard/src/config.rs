//! The variables `freezetrap-alloc-guard` reads (the README's table is checked against
//! [`ENV_VARS`]), and [`EnvSettings`], what `init_from_env` makes of the ones for reporting.

use crate::writer::{ReportSink, ReportWriter};
pub use base::env::EnvVar;
use std::path::PathBuf;
use std::sync::Arc;

/// The open, checked `FREEZETRAP_OUT`: a directory handle everything inside is made through.
#[cfg(ft_linux)]
pub type OutDir = base::dirs::Dir;

/// The checked `FREEZETRAP_OUT` (elsewhere than Linux: by path; captures are Linux-only).
#[cfg(not(ft_linux))]
#[derive(Debug)]
pub struct OutDir {
    path: PathBuf,
}

#[cfg(not(ft_linux))]
impl OutDir {
    /// Creates (0700) and checks the directory: owned by this user, not writable by others.
    pub fn open_private(path: &std::path::Path) -> Result<OutDir, String> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path);
        let md = std::fs::symlink_metadata(path).map_err(|e| format!("it cannot be read ({e})"))?;
        if !md.is_dir() {
            return Err("it is a symbolic link or not a directory".into());
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if md.uid() != me {
            return Err(format!(
                "it is owned by uid {}, not by this process's user (uid {me})",
                md.uid()
            ));
        }
        if md.mode() & 0o022 != 0 {
            return Err(format!(
                "it is writable by group or others (mode {:o})",
                md.mode() & 0o7777
            ));
        }
        Ok(OutDir {
            path: path.to_path_buf(),
        })
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Variables read by `alloc-guard`.
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "FREEZETRAP_ALLOC_THRESHOLD",
        value: "size: `67108864`, `64MiB`, `1GiB`, `512MB` (below 64KiB: accepted, said once)",
        default: "off",
        effect: "record every allocation / reallocation of at least this size (backtrace, USDT probe, report line)",
    },
    EnvVar {
        name: "FREEZETRAP_REPORT",
        value: "a file path, `stderr`, or `off`",
        default: "off",
        effect: "where the JSON-lines report goes (appended; created 0600, never through a symlink, and only a regular file owned by this user); a relative path is taken under `FREEZETRAP_OUT` when that is set (and the report is off, said in one line, when that directory is refused)",
    },
    EnvVar {
        name: "FREEZETRAP_OUT",
        value: "directory",
        default: "none",
        effect: "where reports and captures go (created 0700 if missing; refused with one line unless owned by this process's user and not writable by group or others; without it captures stay off)",
    },
    EnvVar {
        name: "FREEZETRAP_BACKTRACE_DEPTH",
        value: "integer 1..=32",
        default: "32",
        effect: "raw frames captured per oversized allocation (fewer = cheaper event)",
    },
    EnvVar {
        name: "FREEZETRAP_UNWIND",
        value: "`auto`, `fp` or `dwarf`",
        default: "auto",
        effect: "how backtraces are taken: frame pointers (~1 µs an event) or DWARF (~10 µs, works without frame pointers); `auto` checks the first stack both ways and keeps frame pointers if they agree",
    },
    EnvVar {
        name: "FREEZETRAP_QUIET",
        value: "`1` or `0`",
        default: "0",
        effect: "with `1`, no human line per large allocation on stderr (stall summaries and errors still print)",
    },
];

/// Settings read from the environment by [`crate::init_from_env`].
#[derive(Debug, Clone)]
pub struct EnvSettings {
    /// `FREEZETRAP_OUT`, when it could be used (created 0700 if missing; refused unless owned by
    /// this process's user and not writable by group or others).
    pub out_dir: Option<PathBuf>,
    /// `FREEZETRAP_REPORT`.
    pub report: ReportSink,
    /// `FREEZETRAP_QUIET=1`: no human line per large allocation.
    pub quiet: bool,
    /// The open handle on `out_dir`: everything written there goes through it.
    out: Option<Arc<OutDir>>,
}

impl EnvSettings {
    /// Reads `FREEZETRAP_OUT`, `FREEZETRAP_REPORT` and `FREEZETRAP_QUIET`. Problems print one line
    /// each and fall back to a safe default (no directory, report off, not quiet).
    pub fn from_env() -> EnvSettings {
        let out = std::env::var_os("FREEZETRAP_OUT").and_then(|d| {
            let d = PathBuf::from(d);
            match OutDir::open_private(&d) {
                Ok(dir) => Some(Arc::new(dir)),
                Err(why) => {
                    eprintln!(
                        "freezetrap: FREEZETRAP_OUT={} is refused: {why}: reports and captures will not be written there",
                        d.display()
                    );
                    None
                }
            }
        });
        let out_dir = out.as_ref().map(|d| d.path().to_path_buf());
        let mut report = match std::env::var("FREEZETRAP_REPORT") {
            Ok(v) => ReportSink::parse(&v, out_dir.as_deref()),
            Err(std::env::VarError::NotPresent) => ReportSink::Off,
            Err(std::env::VarError::NotUnicode(v)) => ReportSink::File(match &out_dir {
                Some(dir) if std::path::Path::new(&v).is_relative() => dir.join(v),
                _ => PathBuf::from(v),
            }),
        };
        // A relative report path meant "under FREEZETRAP_OUT": with that directory refused it
        // would land in whatever the working directory is (a service's, a test's source tree).
        if std::env::var_os("FREEZETRAP_OUT").is_some() && out_dir.is_none() {
            if let ReportSink::File(p) = &report {
                if p.is_relative() {
                    eprintln!(
                        "freezetrap: FREEZETRAP_REPORT={} is relative to FREEZETRAP_OUT, which was refused: the JSON report is off",
                        p.display()
                    );
                    report = ReportSink::Off;
                }
            }
        }
        let quiet = match std::env::var("FREEZETRAP_QUIET") {
            Ok(v) => match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                other => {
                    eprintln!("freezetrap: FREEZETRAP_QUIET=\"{other}\" is not valid: expected 1 or 0; staying verbose");
                    false
                }
            },
            Err(std::env::VarError::NotPresent) => false,
            Err(std::env::VarError::NotUnicode(_)) => {
                eprintln!("freezetrap: FREEZETRAP_QUIET is not valid UTF-8: expected 1 or 0; staying verbose");
                false
            }
        };
        EnvSettings {
            out_dir,
            report,
            quiet,
            out,
        }
    }

    /// The open, checked `FREEZETRAP_OUT` directory.
    pub fn out(&self) -> Option<&Arc<OutDir>> {
        self.out.as_ref()
    }

    /// Opens the report writer these settings name; on failure prints one line and returns a
    /// writer that discards JSON.
    pub fn open_writer(&self) -> Arc<ReportWriter> {
        match ReportWriter::open_in(self.report.clone(), self.out.as_deref()) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                eprintln!("freezetrap: {e}: the JSON report is off; check FREEZETRAP_REPORT");
                Arc::new(ReportWriter::off())
            }
        }
    }
}
