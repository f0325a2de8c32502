//! The rules that need more than a line: the cgroup's throttling, a wait on `mmap_lock` and its
//! holder, faulting in fresh pages, a wait on a user-space lock and its likeliest holder.

use super::*;

pub(super) fn throttled(e: &Evidence, window: u64) -> Option<Verdict> {
    let t = e.process.throttled_ns.filter(|&t| t > 0)?;
    // cpu.stat sums throttled time over CPUs: with 2 CPUs it can be twice the wall time.
    let confidence = if t >= window / 2 {
        Confidence::High
    } else if t >= window / 10 {
        Confidence::Medium
    } else {
        return None;
    };
    let cg = e.process.cgroup.clone().unwrap_or_else(|| "?".into());
    let mut v = Verdict::new(
        Cause::CgroupThrottling,
        confidence,
        format!(
            "the cgroup's CPU quota was used up: its CPUs spent {} throttled (summed over CPUs) while the stall lasted {} (cgroup {cg}); raise its CPU limit or spread the work",
            HumanNanos(t),
            HumanNanos(e.duration_ns)
        ),
    );
    v.evidence
        .push(format!("cpu.stat throttled time grew {}", HumanNanos(t)));
    Some(v)
}

pub(super) fn waits_on_mmap_lock(t: &ThreadEvidence) -> Option<String> {
    if t.state != 'D' {
        return None;
    }
    t.in_stack(MMAP_LOCK_WAITS)
}

pub(super) fn mmap_lock(e: &Evidence, st: &ThreadEvidence) -> Option<Verdict> {
    let wait = waits_on_mmap_lock(st)?;
    let dur = HumanNanos(e.duration_ns);
    // The holder: a thread not itself waiting for the lock whose stack shows an operation
    // that takes it for write — a fork first, the likeliest long holder.
    let candidates: Vec<(&ThreadEvidence, &'static str)> = e
        .others
        .iter()
        .filter(|t| t.tid != st.tid && waits_on_mmap_lock(t).is_none())
        .filter_map(|t| base::verdict::mmap_lock_holder_op(&t.kernel_stack).map(|op| (t, op)))
        .collect();
    let holder = candidates
        .iter()
        .find(|(_, op)| op.starts_with("fork"))
        .or_else(|| candidates.first())
        .copied();
    let waiters = e
        .others
        .iter()
        .filter(|t| t.tid != st.tid && waits_on_mmap_lock(t).is_some())
        .count();
    let mut v = match holder {
        Some((h, op)) => Verdict::new(
            Cause::MmapLock,
            Confidence::High,
            format!(
                "blocked on mmap_lock for {dur}: thread '{}' held it for write in {op}",
                h.name
            ),
        )
        .with_culprit(h.tid, &h.name, op),
        None => {
            // A thread running on a CPU shows no kernel stack: the holder of a long write hold
            // (a fork copying page tables) is then the thread that ran while the others waited.
            let running = e
                .others
                .iter()
                .filter(|t| {
                    t.tid != st.tid
                        && !t.name.starts_with("freezetrap-")
                        && waits_on_mmap_lock(t).is_none()
                        && t.state == 'R'
                        && t.kernel_stack.is_empty()
                })
                .max_by_key(|t| t.delta.map_or(0, |d| d.cpu_ns));
            let forked = e.process.forks.is_some_and(|f| f > 0);
            match running {
                Some(r) if forked => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}: thread '{}' most likely held it for write in fork (dup_mmap): it was running in the kernel while the others waited, and a process was forked meanwhile",
                        r.name
                    ),
                )
                .with_culprit(r.tid, &r.name, "fork (dup_mmap), likely"),
                Some(r) => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}: held for write, most likely by thread '{}', which was running (a thread on a CPU shows no kernel stack, so its operation is not known)",
                        r.name
                    ),
                )
                .with_culprit(r.tid, &r.name, "running while holding it (operation unknown)"),
                None => Verdict::new(
                    Cause::MmapLock,
                    Confidence::Medium,
                    format!(
                        "blocked on mmap_lock for {dur}, held for write by another thread ({})",
                        if e.others.iter().any(|t| !t.kernel_stack.is_empty()) {
                            "no thread's kernel stack showed which when it was read"
                        } else {
                            "kernel stacks are readable only by root"
                        }
                    ),
                ),
            }
        }
    };
    v.evidence.push(format!("thread '{}' in {wait}", st.name));
    if waiters > 0 {
        v.evidence
            .push(format!("{waiters} other thread(s) waited on it too"));
    }
    if let Some((h, _)) = holder {
        v.evidence.push(format!(
            "holder '{}' in {}",
            h.name,
            h.kernel_stack
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join(" <- ")
        ));
    }
    Some(v)
}

pub(super) fn first_touch(e: &Evidence, st: &ThreadEvidence, d: Counters, w: u64) -> Verdict {
    let dur = HumanNanos(e.duration_ns);
    let alloc = e
        .allocations
        .iter()
        .find(|a| a.thread_id == st.tid)
        .cloned();
    // Mostly system time: faulting in the pages is the stall. Mostly user time: the thread
    // moves data into its fresh allocation (a rehash), touching its pages as it goes.
    let faulting = d.stime_ns >= w / 3;
    let (confidence, after) = match &alloc {
        Some(a) if faulting => (
            Confidence::High,
            format!(" after its {} allocation at {}", HumanBytes(a.size), a.site),
        ),
        Some(a) => (
            Confidence::Medium,
            format!(
                " filling or rehashing its {} allocation at {}",
                HumanBytes(a.size),
                a.site
            ),
        ),
        None => (Confidence::Medium, String::new()),
    };
    let mut text = if faulting {
        format!(
            "thread '{}' was on CPU faulting in fresh pages for {dur}{after} ({} minor faults, {}% system time)",
            st.name,
            d.minflt,
            pct(d.stime_ns, w).min(100)
        )
    } else {
        format!(
            "thread '{}' was on CPU for {dur}{after} ({}% user time, {} minor faults, {}% system time)",
            st.name,
            pct(d.utime_ns, w).min(100),
            d.minflt,
            pct(d.stime_ns, w).min(100)
        )
    };
    match alloc.as_ref().and_then(|a| a.growth.clone()) {
        Some(g) => text.push_str(&format!("; {g}")),
        None => {
            text.push_str("; reserve or pre-fault the memory outside the latency-critical path")
        }
    }
    let mut v = Verdict::new(Cause::FirstTouch, confidence, text);
    if let Some(a) = &alloc {
        v = v.with_culprit(
            st.tid,
            &st.name,
            format!("filling a {} allocation", HumanBytes(a.size)),
        );
    }
    v.evidence.push(format!(
        "{} minor faults, system time {}",
        d.minflt,
        HumanNanos(d.stime_ns)
    ));
    v
}

pub(super) fn lock_wait(e: &Evidence, st: &ThreadEvidence, site: &str) -> Verdict {
    let dur = HumanNanos(e.duration_ns);
    // The likeliest holder: a thread with a large allocation still in flight, else the one
    // that ran most meanwhile.
    let by_alloc = e
        .allocations
        .iter()
        .find(|a| a.in_flight && a.thread_id != st.tid);
    // Else a thread that made a large allocation just before and was running at detection or
    // ran meanwhile: filling it, most likely while holding the lock.
    let filling = by_alloc.is_none().then(|| {
        e.allocations.iter().find(|a| {
            a.thread_id != st.tid
                && e.others.iter().any(|t| {
                    t.tid == a.thread_id
                        && (t.state == 'R' || t.delta.is_some_and(|d| d.cpu_ns >= e.window_ns / 4))
                })
        })
    });
    let mut v = if let Some(a) = by_alloc {
        Verdict::new(
            Cause::LockWait,
            Confidence::High,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' was inside a {} allocation at {}: do not hold a lock across large allocations",
                st.name,
                a.thread_name,
                HumanBytes(a.size),
                a.site
            ),
        )
        .with_culprit(
            a.thread_id,
            &a.thread_name,
            format!("allocating {} while holding the lock", HumanBytes(a.size)),
        )
    } else if let Some(a) = filling.flatten() {
        Verdict::new(
            Cause::LockWait,
            Confidence::High,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' was busy with the {} it had just allocated at {}: do not hold a lock while filling large memory",
                st.name,
                a.thread_name,
                HumanBytes(a.size),
                a.site
            ),
        )
        .with_culprit(
            a.thread_id,
            &a.thread_name,
            format!("filling a {} allocation while holding the lock", HumanBytes(a.size)),
        )
    } else if let Some(b) = busiest_other(e, st.tid) {
        let cpu = b.delta.unwrap_or_default().cpu_ns;
        let confidence = if cpu >= e.window_ns / 2 {
            Confidence::Medium
        } else {
            Confidence::Low
        };
        Verdict::new(
            Cause::LockWait,
            confidence,
            format!(
                "thread '{}' waited {dur} on a lock ({site}) while thread '{}' ran {} (likely holding it)",
                st.name,
                b.name,
                HumanNanos(cpu)
            ),
        )
        .with_culprit(b.tid, &b.name, "running while the lock was held")
    } else {
        Verdict::new(
            Cause::LockWait,
            Confidence::Low,
            format!(
                "thread '{}' waited {dur} on a lock ({site}); no other thread ran meanwhile",
                st.name
            ),
        )
    };
    v.evidence.push(format!("state {} in {site}", st.state));
    v
}
