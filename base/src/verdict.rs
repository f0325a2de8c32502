//! The shape of a verdict — what caused a stall — shared by the watchdog's stall reports and the
//! capture's `summary.json`, so both say it the same way (shared/CONTRACT.md, "Verdicts").

use core::fmt;
use serde::Serialize;

/// The cause classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Cause {
    /// The stalled thread was on CPU faulting in fresh pages (a large allocation being filled
    /// or rehashed).
    FirstTouch,
    /// Threads waited on the process's `mmap_lock`, held for write by another thread.
    MmapLock,
    /// The stalled thread slept on a user-space lock while another thread made progress.
    LockWait,
    /// The stalled thread ran user code the whole time.
    OnCpu,
    /// Runnable but not scheduled: other processes or threads took the CPUs.
    CpuStarvation,
    /// The cgroup's CPU quota was used up.
    CgroupThrottling,
    /// The whole process was stopped (SIGSTOP, ptrace, the freezer) or not scheduled at all.
    Stopped,
    /// Waiting on storage: major faults or I/O waits.
    BlockedIo,
    /// Direct reclaim or compaction under memory pressure.
    Reclaim,
    /// Nothing above fits; the text says what was seen.
    Unknown,
}

impl Cause {
    /// The name used in reports (`first_touch`, `mmap_lock`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::FirstTouch => "first_touch",
            Cause::MmapLock => "mmap_lock",
            Cause::LockWait => "lock_wait",
            Cause::OnCpu => "on_cpu",
            Cause::CpuStarvation => "cpu_starvation",
            Cause::CgroupThrottling => "cgroup_throttling",
            Cause::Stopped => "stopped",
            Cause::BlockedIo => "blocked_io",
            Cause::Reclaim => "reclaim",
            Cause::Unknown => "unknown",
        }
    }

    /// Every class, in the contract's order.
    pub const ALL: [Cause; 10] = [
        Cause::FirstTouch,
        Cause::MmapLock,
        Cause::LockWait,
        Cause::OnCpu,
        Cause::CpuStarvation,
        Cause::CgroupThrottling,
        Cause::Stopped,
        Cause::BlockedIo,
        Cause::Reclaim,
        Cause::Unknown,
    ];
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How sure the verdict is: `high` when the evidence is direct (a holder's kernel stack, a
/// counter that grew by about the stall), `medium` when one piece is missing, `low` when it is
/// a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// A guess.
    Low,
    /// One piece of the evidence is missing.
    Medium,
    /// Direct evidence.
    High,
}

impl Confidence {
    /// The name used in reports (`high`, `medium`, `low`).
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }
}

impl fmt::Display for Confidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who did it, when someone did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Culprit {
    /// Kernel thread id (0 when it is the whole process or another process).
    pub thread_id: u64,
    /// Its name.
    pub thread_name: String,
    /// What it did, e.g. `fork (dup_mmap)` or `filling a 1.00 GiB allocation`.
    pub what: String,
}

/// A verdict: the cause, how sure, one line a person can act on, the culprit, and the evidence
/// it rests on (each piece one short phrase, including what could not be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The cause class.
    pub cause: Cause,
    /// How sure.
    pub confidence: Confidence,
    /// One line a person can act on.
    pub text: String,
    /// Who did it, when known.
    pub culprit: Option<Culprit>,
    /// What it rests on.
    pub evidence: Vec<String>,
}

impl Verdict {
    /// A verdict with no culprit and no evidence yet.
    pub fn new(cause: Cause, confidence: Confidence, text: impl Into<String>) -> Verdict {
        Verdict {
            cause,
            confidence,
            text: text.into(),
            culprit: None,
            evidence: Vec::new(),
        }
    }

    /// The same with a culprit.
    pub fn with_culprit(
        mut self,
        thread_id: u64,
        thread_name: &str,
        what: impl Into<String>,
    ) -> Verdict {
        self.culprit = Some(Culprit {
            thread_id,
            thread_name: thread_name.to_string(),
            what: what.into(),
        });
        self
    }
}

/// The operation that holds `mmap_lock` for write, named from a kernel stack (innermost first):
/// `fork (dup_mmap)`, `munmap`, `mmap`, `mprotect`, `brk`, `mremap`, `madvise`. `None` when the
/// stack shows none of them.
pub fn mmap_lock_holder_op(kernel_stack: &[impl AsRef<str>]) -> Option<&'static str> {
    const OPS: &[(&str, &str)] = &[
        ("dup_mmap", "fork (dup_mmap)"),
        ("copy_page_range", "fork (dup_mmap)"),
        ("copy_process", "fork (dup_mmap)"),
        ("do_vmi_munmap", "munmap"),
        ("__vm_munmap", "munmap"),
        ("__do_munmap", "munmap"),
        ("mprotect_fixup", "mprotect"),
        ("do_mprotect_pkey", "mprotect"),
        ("do_brk_flags", "brk"),
        ("__do_sys_brk", "brk"),
        ("__do_sys_mremap", "mremap"),
        ("do_madvise", "madvise"),
        ("do_mmap", "mmap"),
        ("vm_mmap_pgoff", "mmap"),
    ];
    OPS.iter()
        .find(|(f, _)| kernel_stack.iter().any(|s| s.as_ref() == *f))
        .map(|(_, op)| *op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_serialize_as_the_contract_names() {
        for c in Cause::ALL {
            assert_eq!(serde_json_like(c), c.as_str());
        }
        assert!(Confidence::High > Confidence::Medium && Confidence::Medium > Confidence::Low);
    }

    fn serde_json_like(c: Cause) -> String {
        // serde's snake_case renaming, checked without a serializer dependency here.
        format!("{c:?}")
            .chars()
            .enumerate()
            .flat_map(|(i, ch)| {
                if ch.is_uppercase() && i > 0 {
                    vec!['_', ch.to_ascii_lowercase()]
                } else {
                    vec![ch.to_ascii_lowercase()]
                }
            })
            .collect()
    }

    #[test]
    fn the_holders_operation_comes_from_its_stack() {
        let fork = [
            "copy_pte_range",
            "copy_page_range",
            "dup_mmap",
            "copy_process",
        ];
        assert_eq!(mmap_lock_holder_op(&fork), Some("fork (dup_mmap)"));
        assert_eq!(
            mmap_lock_holder_op(&["unmap_region", "do_vmi_munmap"]),
            Some("munmap")
        );
        assert_eq!(mmap_lock_holder_op(&["schedule", "futex_wait"]), None);
    }
}
