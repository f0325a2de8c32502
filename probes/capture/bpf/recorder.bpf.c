// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * freezetrap's compiled flight recorder: the eBPF half of `freezetrap-capture arm` (and of the
 * triggered helper). Built by `bpf/build.sh` into `recorder.bpf.o`, which is committed and
 * embedded in the capture binary; CI rebuilds it and fails if it differs.
 *
 * Why compiled: the bpftrace program this replaces walked the kernel and user stacks of every
 * thread of the target at every switch out (3.6-3.9 us per context switch, pinned). Here one
 * tracepoint at the end of __schedule() reads the thread's own clocks, and walks its stacks only
 * if it was away for at least `min_block_ns` (see on_schedule_exit).
 *
 * CO-RE: the few kernel structures read here are declared below with only the fields used and
 * `preserve_access_index`, so libbpf-style relocations (applied by aya at load time against
 * /sys/kernel/btf/vmlinux) find them on any kernel with BTF. No vmlinux.h and no libbpf headers:
 * the object depends on nothing but clang.
 *
 * What reaches user space:
 *  - the ring buffer `events`: blocks of at least min_block_ns (with both stacks), on-CPU samples
 *    (both stacks), mmap_lock write holds (the kernel stack that ended them), the USDT probes
 *    stall_begin/stall_end (with the registers that hold their arguments);
 *  - hash maps aggregated in the kernel, keyed by (bucket, tid): the longest mmap_lock wait and
 *    the time spent runnable after a preemption (both too frequent for one event each).
 *  - `counters`: events the ring buffer had no room for, and map updates that failed.
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;
typedef _Bool bool;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

struct task_struct;

/* Helper ids from include/uapi/linux/bpf.h (stable ABI). */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static long (*bpf_get_current_comm)(void *buf, __u32 size) = (void *)16;
static long (*bpf_get_stack)(void *ctx, void *buf, __u32 size, __u64 flags) = (void *)67;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static void *(*bpf_task_storage_get)(void *map, struct task_struct *task, void *value, __u64 flags) = (void *)156;
static struct task_struct *(*bpf_get_current_task_btf)(void) = (void *)158;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
static __u64 (*bpf_get_attach_cookie)(void *ctx) = (void *)174;

#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_F_USER_STACK (1ULL << 8)
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_MAP_TYPE_TASK_STORAGE 29
#define BPF_F_NO_PREALLOC 1
#define BPF_LOCAL_STORAGE_GET_F_CREATE 1


struct sched_entity {
	__u64 sum_exec_runtime;
} __attribute__((preserve_access_index));

struct sched_info {
	unsigned long long run_delay;
	unsigned long long last_arrival;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	__u64 start_time;
	char comm[16];
	struct sched_entity se;
	struct sched_info sched_info;
} __attribute__((preserve_access_index));

/* x86-64 `struct pt_regs`: 21 registers (r15 .. ss), an ABI that does not change. */
#define PT_REGS_WORDS 21

/* Set by the loader before the program is loaded (read-only afterwards). */
const volatile __u32 target_tgid = 0;
const volatile __u64 min_block_ns = 1000000;
const volatile __u64 bucket_ns = 250000000;
/* Slots in use, minus one (a power of two minus one, < SLOTS): fewer only in tests, which send
 * threads down the fallback of a taken slot. */
const volatile __u32 slot_mask = 65535;

#define MAX_FRAMES 32

enum event_kind {
	EVENT_OFF = 1,
	EVENT_ON = 2,
	EVENT_HOLD = 3,
	EVENT_STALL_BEGIN = 4,
	EVENT_STALL_END = 5,
};

/* Mirrored by `Event` in src/compiled/mod.rs. */
struct event {
	__u32 kind;
	__u32 tid;
	__u64 ts;
	__u64 value; /* off: ns away; on: 1; hold: ns held */
	char comm[16];
	__s32 kernel_bytes; /* bytes of kstack filled (negative: error) */
	__s32 user_bytes;
	__u64 kstack[MAX_FRAMES];
	__u64 ustack[MAX_FRAMES];
};

/* A USDT probe fired. Mirrored by `UsdtEvent` in src/compiled/mod.rs. */
struct usdt_event {
	__u32 kind;
	__u32 tid;
	__u64 ts;
	__u64 site; /* the attach cookie: which probe site (its argument spec) */
	__u64 regs[PT_REGS_WORDS];
};

/*
 * A thread's clocks when it last came back on CPU: from these, its next return tells how long
 * it was away, without a hook at the switch out (see on_schedule_exit).
 */
struct seen {
	__u64 at;	 /* sched_info.last_arrival: when it last came back (the runqueue clock) */
	__u64 exec;	 /* se.sum_exec_runtime: its CPU time so far */
	__u64 run_delay; /* sched_info.run_delay: its time runnable, waiting for a CPU, so far */
};

struct bucket_key {
	__u64 bucket;
	__u32 tid;
	__u32 pad;
};

struct bucket_value {
	__u64 us; /* wait: the longest; runq: the sum */
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

/*
 * Per-thread storage in the task itself (no hashing, no lock, freed with the thread): a hash map
 * keyed by tid cost ~0.8 µs per switch on this VM (bucket lock, free list, list debugging).
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct seen);
} seen SEC(".maps");

/*
 * The same clocks, found without a helper call: a slot per thread in a global array indexed by
 * the low bits of its tid (an address computed, not looked up), claimed on first sight with a
 * compare-and-swap, released at the thread's exit. task storage (bpf_task_storage_get) costs a
 * helper call per switch, about a third of this program's time here; a thread whose slot is
 * taken by another falls back to it. `start` (the thread's start_time) tells a slot left by a
 * dead thread whose tid was reused from the thread's own.
 */
#define SLOTS 65536
struct slot {
	__u32 tid; /* 0: free */
	__u32 pad;
	__u64 start;
	struct seen seen;
};
struct slot slots[SLOTS];

/* The current thread's clocks: its slot, or (slot taken) its task storage; NULL if neither. */
static __always_inline struct seen *seen_of(struct task_struct *task)
{
	__u32 tid = task->pid;
	__u64 start = task->start_time;
	struct slot *sl = &slots[tid & slot_mask & (SLOTS - 1)];
	__u32 owner = sl->tid;
	if (owner == tid && sl->start == start)
		return &sl->seen;
	/* Free, or left by a dead thread with this tid (live tids are unique): claim it. */
	if ((owner == 0 && __sync_val_compare_and_swap(&sl->tid, 0, tid) == 0) || owner == tid) {
		sl->start = start;
		sl->seen.at = 0;
		return &sl->seen;
	}
	return bpf_task_storage_get(&seen, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} lock_starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} hold_starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct bucket_key);
	__type(value, struct bucket_value);
} waits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct bucket_key);
	__type(value, struct bucket_value);
} runq SEC(".maps");

/* [0]: ring buffer full, [1]: a map update failed (map full). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &which);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline bool in_target(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == target_tgid;
}

static __always_inline __u32 current_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

/* Reserves an event for the current thread; NULL (counted) when the ring buffer is full. */
static __always_inline struct event *reserve(__u32 kind, __u64 now)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(0);
		return 0;
	}
	e->kind = kind;
	e->tid = current_tid();
	e->ts = now;
	e->value = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->kernel_bytes = 0;
	e->user_bytes = 0;
	return e;
}

/* Adds `us` to (this bucket, tid): summed or the largest. The thread's name is `task`'s, or
 * the current thread's when `task` is NULL. */
static __always_inline void add_bucket(void *map, __u32 tid, __u64 now, __u64 us, bool sum,
				       struct task_struct *task)
{
	struct bucket_key k = { .bucket = now / bucket_ns, .tid = tid };
	struct bucket_value *v = bpf_map_lookup_elem(map, &k);
	if (v) {
		if (sum)
			__sync_fetch_and_add(&v->us, us);
		else if (us > v->us)
			v->us = us;
		return;
	}
	struct bucket_value nv = { .us = us };
	if (task)
		bpf_probe_read_kernel(nv.comm, sizeof(nv.comm), task->comm);
	else
		bpf_get_current_comm(nv.comm, sizeof(nv.comm));
	if (bpf_map_update_elem(map, &k, &nv, BPF_NOEXIST)) {
		/* Another CPU created it first (or the map is full). */
		v = bpf_map_lookup_elem(map, &k);
		if (v && sum)
			__sync_fetch_and_add(&v->us, us);
		else if (v && us > v->us)
			v->us = us;
		else if (!v)
			count(1);
	}
}

/*
 * The end of __schedule(), on the thread that now runs: the one hook per context switch.
 *
 * How long it was away needs no hook at the switch out: the kernel keeps its CPU time
 * (se.sum_exec_runtime, exact up to its last switch out) and its time spent runnable waiting
 * for a CPU (sched_info.run_delay), and stamps each return (sched_info.last_arrival). Since it
 * last came back at `at`, it was away for (arrival - at) - (CPU time since), of which the growth of run_delay was waiting for a CPU and the
 * rest blocked. A block of at least min_block_ns has its stacks walked, here, on the thread
 * itself: its kernel stack is still the path it slept on (__schedule <- schedule <-
 * rwsem_down_write_slowpath <- ...) and its user registers are those it entered the kernel with.
 * Anything shorter costs a few loads and stores.
 *
 * Why this tracepoint (sched_exit_tp, a bare tracepoint of recent kernels, only reachable as
 * tp_btf): a kprobe on finish_task_switch or fexit on schedule() would do, but kernels built
 * without kprobes, or that refuse BPF trampolines (this project's CI machine does both), still
 * have tracepoints; and bpf_get_task_stack() on the next thread at sched_switch leaves out every
 * __sched function (rwsem_down_write_slowpath, do_nanosleep, io_schedule), the very frames that
 * say what a thread waited for. A second hook at sched_switch cost ~0.1 µs per switch more.
 */
SEC("tp_btf/sched_exit_tp")
int on_schedule_exit(__u64 *ctx)
{
	/* (bool is_switch): false when __schedule() picked the thread that was already running. */
	if (!ctx[0])
		return 0;
	/* (The JIT inlines this helper: one load, cheaper than bpf_get_current_pid_tgid.) */
	struct task_struct *task = bpf_get_current_task_btf();
	if (task->tgid != target_tgid)
		return 0;
	struct seen *t = seen_of(task);
	if (!t) {
		count(1);
		return 0;
	}
	/* The kernel stamped this return itself (sched_info_arrive, just before the switch, from
	 * the runqueue clock that also drives sum_exec_runtime): reading it saves the one helper
	 * call left on this path, bpf_ktime_get_ns(). Not stamped (the same value as last time) is
	 * an arrival schedstats did not see; the next one then spans both, which sums the same. */
	__u64 arrival = task->sched_info.last_arrival;
	if (arrival == t->at)
		return 0;
	__u64 exec = task->se.sum_exec_runtime;
	__u64 run_delay = task->sched_info.run_delay;
	__s64 away = 0, waited = 0;
	if (t->at) {
		away = (__s64)(arrival - t->at) - (__s64)(exec - t->exec);
		waited = (__s64)(run_delay - t->run_delay);
	}
	t->at = arrival;
	t->exec = exec;
	t->run_delay = run_delay;
	if (away <= 0)
		return 0;
	__s64 blocked = away - waited;
	if (blocked < (__s64)min_block_ns) {
		/* Preempted (away, but not blocked for even a microsecond): its wait for a CPU. A
		 * short block and the wait after its wake-up count for nothing, as in armed.bt. */
		if (blocked < 1000 && waited >= 1000)
			add_bucket(&runq, task->pid, bpf_ktime_get_ns(), (__u64)waited / 1000, 1, 0);
		return 0;
	}
	/* Events carry the monotonic clock every other freezetrap timestamp uses. */
	struct event *e = reserve(EVENT_OFF, bpf_ktime_get_ns());
	if (!e)
		return 0;
	e->value = (__u64)away;
	e->kernel_bytes = bpf_get_stack(ctx, e->kstack, sizeof(e->kstack), 0);
	e->user_bytes = bpf_get_stack(ctx, e->ustack, sizeof(e->ustack), BPF_F_USER_STACK);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* On-CPU samples (a perf event at 99 Hz on every CPU). */
SEC("perf_event")
int on_cpu_sample(void *ctx)
{
	if (!in_target())
		return 0;
	struct event *e = reserve(EVENT_ON, bpf_ktime_get_ns());
	if (!e)
		return 0;
	e->value = 1;
	e->kernel_bytes = bpf_get_stack(ctx, e->kstack, sizeof(e->kstack), 0);
	e->user_bytes = bpf_get_stack(ctx, e->ustack, sizeof(e->ustack), BPF_F_USER_STACK);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/mmap_lock_start_locking")
int on_lock_start(__u64 *ctx)
{
	if (!in_target())
		return 0;
	__u32 tid = current_tid();
	__u64 now = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&lock_starts, &tid, &now, BPF_ANY))
		count(1);
	return 0;
}

/* A write hold ended (released, or downgraded to read): one event with the stack that ended it. */
static __always_inline void hold_ended(void *ctx, __u32 tid, __u64 now)
{
	__u64 *h = bpf_map_lookup_elem(&hold_starts, &tid);
	if (!h)
		return;
	__u64 held = now - *h;
	bpf_map_delete_elem(&hold_starts, &tid);
	struct event *e = reserve(EVENT_HOLD, now);
	if (!e)
		return;
	e->value = held;
	e->kernel_bytes = bpf_get_stack(ctx, e->kstack, sizeof(e->kstack), 0);
	bpf_ringbuf_submit(e, 0);
}

/* (struct mm_struct *mm, bool write, bool success) */
SEC("tp_btf/mmap_lock_acquire_returned")
int on_lock_acquired(__u64 *ctx)
{
	if (!in_target())
		return 0;
	bool write = (bool)(ctx[1] & 1);
	bool success = (bool)(ctx[2] & 1);
	__u32 tid = current_tid();
	__u64 now = bpf_ktime_get_ns();
	__u64 *s = bpf_map_lookup_elem(&lock_starts, &tid);
	if (s) {
		add_bucket(&waits, tid, now, (now - *s) / 1000, 0, 0);
		bpf_map_delete_elem(&lock_starts, &tid);
		/* A failed trylock (or a killed wait) holds nothing. */
		if (write && success && bpf_map_update_elem(&hold_starts, &tid, &now, BPF_ANY))
			count(1);
	} else if (!write) {
		/* No start_locking: mmap_write_downgrade, which ends the write hold. */
		hold_ended(ctx, tid, now);
	}
	return 0;
}

/* (struct mm_struct *mm, bool write) */
SEC("tp_btf/mmap_lock_released")
int on_lock_released(__u64 *ctx)
{
	if (!in_target() || !(ctx[1] & 1))
		return 0;
	hold_ended(ctx, current_tid(), bpf_ktime_get_ns());
	return 0;
}

/* An exiting thread's entries go (its last switch out stored none). */
SEC("tp_btf/sched_process_exit")
int on_exit(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	if (p->tgid != target_tgid)
		return 0;
	__u32 tid = p->pid;
	struct slot *sl = &slots[tid & slot_mask & (SLOTS - 1)];
	if (sl->tid == tid)
		sl->tid = 0; /* (whoever claims it next resets it) */
	bpf_map_delete_elem(&lock_starts, &tid);
	bpf_map_delete_elem(&hold_starts, &tid);
	return 0;
}

/*
 * The probe's arguments are wherever its note says (`8@%rdi`, `-4@%eax`, ...), which differs from
 * one inlined site to the next: the registers go to user space, which knows each site's spec by
 * the attach cookie.
 */
static __always_inline int usdt(void *ctx, __u32 kind)
{
	if (!in_target())
		return 0;
	struct usdt_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(0);
		return 0;
	}
	e->kind = kind;
	e->tid = current_tid();
	e->ts = bpf_ktime_get_ns();
	e->site = bpf_get_attach_cookie(ctx);
	/* On failure the helper zeroes the registers: the arguments read as 0. */
	bpf_probe_read_kernel(e->regs, sizeof(e->regs), ctx);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("uprobe/stall_begin")
int on_stall_begin(void *ctx)
{
	return usdt(ctx, EVENT_STALL_BEGIN);
}

SEC("uprobe/stall_end")
int on_stall_end(void *ctx)
{
	return usdt(ctx, EVENT_STALL_END);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
