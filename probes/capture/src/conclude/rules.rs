//! The rules: what the stalled thread's time (or, with no thread named, the process's) says
//! caused the stall, mirroring the watchdog's rules with the eBPF evidence.

use super::*;

/// What a blocking kernel stack waits on.
fn blocked_cause(stack: &str) -> (Cause, &'static str) {
    let has = |f: &str| stack.contains(&format!(";{f}_[k]"));
    let has_prefix = |p: &str| {
        stack
            .split(';')
            .any(|f| f.starts_with(p) && f.ends_with("_[k]"))
    };
    if has("do_signal_stop") || has("ptrace_stop") {
        (Cause::Stopped, "stopped (SIGSTOP or a debugger)")
    } else if has_prefix("try_to_free_pages")
        || has_prefix("__alloc_pages_direct_reclaim")
        || has_prefix("__alloc_pages_direct_compact")
        || has_prefix("shrink_")
    {
        (Cause::Reclaim, "reclaiming memory")
    } else if has_prefix("rwsem_down_")
        && (has("lock_mm_and_find_vma")
            || has("vm_mmap_pgoff")
            || has("__vm_munmap")
            || has("do_madvise")
            || has("do_mprotect_pkey")
            || has_prefix("mmap_read_lock")
            || has_prefix("mmap_write_lock"))
    {
        (Cause::MmapLock, "waiting for mmap_lock")
    } else if has_prefix("io_schedule")
        || has_prefix("folio_wait")
        || has("filemap_fault")
        || has_prefix("blk_")
        || has_prefix("wait_on_page")
    {
        (Cause::BlockedIo, "waiting on storage")
    } else if has_prefix("futex_wait") || has("futex_do_wait") {
        (Cause::LockWait, "waiting on a lock (futex)")
    } else {
        (Cause::Unknown, "blocked")
    }
}

fn is_own(name: &str) -> bool {
    name.starts_with("freezetrap-")
}

/// The verdict for the window.
pub fn verdict(window: &StallWindow) -> Verdict {
    let threads = per_thread(window.maps);
    let hold = longest_hold(window.maps);
    let waiters: Vec<(&u64, &ThreadTime)> = threads
        .iter()
        .filter(|(_, t)| t.lock_wait_us >= 1000)
        .collect();
    let max_wait = waiters
        .iter()
        .map(|(_, t)| t.lock_wait_us)
        .max()
        .unwrap_or(0);
    let tid = window.tid.filter(|&t| t != 0);
    let Some(tid) = tid else {
        return process_verdict(&threads, hold, waiters.len(), max_wait, window.us);
    };
    let Some(s) = threads.get(&tid) else {
        let mut v = Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!("no scheduler event or CPU sample of thread {tid} in the window: it neither ran nor woke up while recorded"),
        );
        v.evidence.push(format!("thread {tid}: no data"));
        return v;
    };
    let who = format!("thread '{}'", s.name);
    // Samples are counted from bpftrace's start, a little before the window: never more on-CPU
    // time than the window holds.
    let on_us = (s.on_samples * US_PER_SAMPLE).min(window.us.max(US_PER_SAMPLE));
    let total = on_us + s.off_us + s.idle_us + s.runq_us;
    let mut evidence = vec![format!(
        "{who}: {} on CPU, {} blocked, {} idle, {} runnable",
        us(on_us),
        us(s.off_us),
        us(s.idle_us),
        us(s.runq_us)
    )];

    // mmap_lock: the stalled thread waited for it, or held it itself.
    if let Some((htid, hname, hold_us, op)) = &hold {
        let op_text = op.unwrap_or("an operation its stack does not name");
        if s.lock_wait_us >= 1000 && *htid != tid {
            evidence.push(format!("longest mmap_lock wait {}", us(s.lock_wait_us)));
            evidence.push(format!("write hold {} by '{hname}'", us(*hold_us)));
            let mut v = Verdict::new(
                Cause::MmapLock,
                if op.is_some() { Confidence::High } else { Confidence::Medium },
                format!(
                    "blocked on mmap_lock for {}: thread '{hname}' held it for write {} in {op_text}",
                    us(s.lock_wait_us),
                    us(*hold_us)
                ),
            )
            .with_culprit(*htid, hname, op.unwrap_or("held mmap_lock for write"));
            v.evidence = evidence;
            return v;
        }
        if *htid == tid && *hold_us >= 5000 {
            evidence.push(format!("write hold {}", us(*hold_us)));
            let mut v = Verdict::new(
                Cause::MmapLock,
                if op.is_some() {
                    Confidence::High
                } else {
                    Confidence::Medium
                },
                format!(
                    "{who} held mmap_lock for write {} in {op_text}; {} thread(s) waited up to {}",
                    us(*hold_us),
                    waiters.len(),
                    us(max_wait)
                ),
            )
            .with_culprit(*htid, hname, op.unwrap_or("held mmap_lock for write"));
            v.evidence = evidence;
            return v;
        }
    }

    // Otherwise the largest part of its time says what it did.
    let strong = |part: u64| {
        if pct(part, total) >= 60 && pct(total, window.us) >= 50 {
            Confidence::High
        } else {
            Confidence::Medium
        }
    };
    let blocking_top = s
        .off
        .iter()
        .filter(|(st, _)| !is_idle(st))
        .max_by_key(|(_, &v)| v);
    if total == 0 {
        let mut v = Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!("{who} has no time recorded in the window"),
        );
        v.evidence = evidence;
        return v;
    }
    let mut v = if on_us >= s.runq_us && on_us >= s.off_us && on_us >= s.idle_us {
        let faults = pct(s.fault_samples, s.on_samples);
        if faults >= 30 {
            let site = where_it_ran(&s.fault_user).unwrap_or_else(|| "its code".into());
            evidence.push(format!("{faults}% of its on-CPU samples in page faults"));
            Verdict::new(
                Cause::FirstTouch,
                strong(on_us),
                format!(
                    "{who} spent {} on CPU faulting in fresh pages ({faults}% of its samples) in {site}: a large allocation being filled or rehashed; reserve it once up front, or fill it in smaller pieces",
                    us(on_us)
                ),
            )
            .with_culprit(tid, &s.name, format!("faulting in fresh pages in {site}"))
        } else {
            let site = where_it_ran(&s.on_user)
                .or_else(|| where_it_ran(&s.fault_user))
                .unwrap_or_else(|| "code without user frames".into());
            evidence.push(format!("{faults}% of its on-CPU samples in page faults"));
            Verdict::new(
                Cause::OnCpu,
                strong(on_us),
                format!(
                    "{who} ran {} on CPU in {site} ({}% of its recorded time): the stall is its own work",
                    us(on_us),
                    pct(on_us, total)
                ),
            )
            .with_culprit(tid, &s.name, format!("running {site}"))
        }
    } else if s.runq_us >= s.off_us && s.runq_us >= s.idle_us {
        Verdict::new(
            Cause::CpuStarvation,
            strong(s.runq_us),
            format!(
                "{who} waited {} runnable for a CPU ({}% of its recorded time): other threads or processes took the CPUs",
                us(s.runq_us),
                pct(s.runq_us, total)
            ),
        )
    } else if let (Some((stack, &blocked)), true) = (blocking_top, s.off_us >= s.idle_us) {
        let (cause, doing) = blocked_cause(stack);
        let site = wait_site(stack);
        evidence.push(format!("blocked {} in {site}", us(blocked)));
        let mut v = Verdict::new(
            cause,
            match cause {
                Cause::Unknown => Confidence::Low,
                Cause::LockWait | Cause::MmapLock => Confidence::Medium,
                _ => strong(s.off_us),
            },
            format!("{who} was {doing} for {} in {site}", us(s.off_us)),
        );
        if cause == Cause::LockWait {
            if let Some((btid, b)) = busiest_other(&threads, tid) {
                let ran = b.on_samples * US_PER_SAMPLE;
                let site = where_it_ran(&b.on_user)
                    .or_else(|| where_it_ran(&b.fault_user))
                    .unwrap_or_else(|| "its code".into());
                v.text.push_str(&format!(
                    "; meanwhile thread '{}' ran {} on CPU in {site}: the likeliest holder",
                    b.name,
                    us(ran)
                ));
                v = v.with_culprit(btid, &b.name, format!("ran {} in {site}", us(ran)));
            }
        }
        v
    } else {
        let site = s
            .off
            .iter()
            .max_by_key(|(_, &v)| v)
            .map(|(st, _)| wait_site(st))
            .unwrap_or_default();
        Verdict::new(
            Cause::Unknown,
            Confidence::Low,
            format!(
                "{who} was asleep {} in {site}: a sleep or an idle poll, not a wait on anything the capture can see",
                us(s.idle_us)
            ),
        )
    };
    if let Some((_, hname, hold_us, _)) = &hold {
        if v.cause != Cause::MmapLock && *hold_us >= 1000 {
            evidence.push(format!(
                "mmap_lock write hold {} by '{hname}' (not waited on by {who})",
                us(*hold_us)
            ));
        }
    }
    v.evidence = evidence;
    v
}

/// The thread other than `tid` (and freezetrap's own) with the most on-CPU samples.
fn busiest_other(threads: &BTreeMap<u64, ThreadTime>, tid: u64) -> Option<(u64, &ThreadTime)> {
    threads
        .iter()
        .filter(|(&t, th)| t != tid && !is_own(&th.name) && th.on_samples > 0)
        .max_by_key(|(_, th)| th.on_samples)
        .map(|(&t, th)| (t, th))
}

/// No stalled thread named: what held the process up as a whole.
fn process_verdict(
    threads: &BTreeMap<u64, ThreadTime>,
    hold: Option<(u64, String, u64, Option<&'static str>)>,
    waiters: usize,
    max_wait: u64,
    window_us: u64,
) -> Verdict {
    if let Some((htid, hname, hold_us, op)) = hold.filter(|h| h.2 >= 5000 && waiters > 0) {
        let mut v = Verdict::new(
            Cause::MmapLock,
            if op.is_some() { Confidence::High } else { Confidence::Medium },
            format!(
                "mmap_lock held for write {} by thread '{hname}' in {}; {waiters} thread(s) waited up to {}",
                us(hold_us),
                op.unwrap_or("an operation its stack does not name"),
                us(max_wait)
            ),
        )
        .with_culprit(htid, &hname, op.unwrap_or("held mmap_lock for write"));
        v.evidence.push(format!("write hold {}", us(hold_us)));
        v.evidence
            .push(format!("{waiters} waiter(s) of at least 1 ms"));
        return v;
    }
    // The heaviest blocking stack of the service's own threads.
    let blocked = threads
        .iter()
        .filter(|(_, t)| !is_own(&t.name))
        .flat_map(|(&tid, t)| t.off.iter().map(move |(s, &v)| (tid, t, s, v)))
        .filter(|(_, _, s, _)| !is_idle(s))
        .max_by_key(|&(_, _, _, v)| v);
    if let Some((tid, t, stack, v_us)) = blocked.filter(|b| b.3 >= window_us / 10) {
        let (cause, doing) = blocked_cause(stack);
        if cause != Cause::Unknown && cause != Cause::LockWait {
            let site = wait_site(stack);
            let mut v = Verdict::new(
                cause,
                Confidence::Medium,
                format!("thread '{}' was {doing} for {} in {site}", t.name, us(v_us)),
            )
            .with_culprit(tid, &t.name, doing);
            v.evidence.push(format!("heaviest blocking stack: {site}"));
            return v;
        }
    }
    if let Some((tid, t)) = busiest_other(threads, 0) {
        let on_us = t.on_samples * US_PER_SAMPLE;
        if pct(on_us, window_us) >= 50 {
            let faults = pct(t.fault_samples, t.on_samples);
            let (cause, what) = if faults >= 30 {
                (Cause::FirstTouch, "faulting in fresh pages in")
            } else {
                (Cause::OnCpu, "running")
            };
            let site = where_it_ran(if faults >= 30 {
                &t.fault_user
            } else {
                &t.on_user
            })
            .unwrap_or_else(|| "its code".into());
            let mut v = Verdict::new(
                cause,
                Confidence::Low,
                format!(
                    "thread '{}' was on CPU {} of the window, {what} {site} (no stalled thread was named)",
                    t.name,
                    us(on_us)
                ),
            )
            .with_culprit(tid, &t.name, format!("{what} {site}"));
            v.evidence
                .push(format!("{faults}% of its samples in page faults"));
            return v;
        }
    }
    Verdict::new(
        Cause::Unknown,
        Confidence::Low,
        "no mmap_lock hold, blocking wait or busy thread stands out in the window",
    )
}
