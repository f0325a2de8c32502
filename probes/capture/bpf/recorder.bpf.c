// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * freezetrap's compiled flight recorder: the eBPF half of `freezetrap-capture arm` (and of the
 * triggered helper). Built by `bpf/build.sh` into `recorder.bpf.o`, which is committed and
 * embedded in the capture binary; CI rebuilds it and fails if it differs.
 *
 * Why compiled: the bpftrace program this replaces walked the kernel and user stacks of every
 * thread of the target at every switch out (3.6-3.9 us per context switch, pinned). Here a switch
 * out only stores a timestamp; the stacks are walked when the thread runs again and only if it
 * was away for at least `min_block_ns`: at the end of __schedule() on the thread itself, where
 * its kernel stack is still the path it slept on and its user stack is where it entered.
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
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
static __u64 (*bpf_get_attach_cookie)(void *ctx) = (void *)174;

#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_F_USER_STACK (1ULL << 8)
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_RINGBUF 27

/* task_struct->__state bits (include/linux/sched.h): the final switch of an exiting thread. */
#define TASK_DEAD 0x80

struct task_struct {
	int pid;
	int tgid;
	char comm[16];
} __attribute__((preserve_access_index));

/* x86-64 `struct pt_regs`: 21 registers (r15 .. ss), an ABI that does not change. */
#define PT_REGS_WORDS 21

/* Set by the loader before the program is loaded (read-only afterwards). */
const volatile __u32 target_tgid = 0;
const volatile __u64 min_block_ns = 1000000;
const volatile __u64 bucket_ns = 250000000;

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

struct start {
	__u64 ts;
	__u64 preempted;
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct start);
} starts SEC(".maps");

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
 * A switch: the thread going out stores when, and whether it still wanted the CPU (preempted);
 * a preempted thread coming back in adds its wait to `runq`. A thread that blocked is handled
 * when it runs again, on itself (below).
 */
SEC("tp_btf/sched_switch")
int on_switch(__u64 *ctx)
{
	struct task_struct *prev = (struct task_struct *)ctx[1];
	struct task_struct *next = (struct task_struct *)ctx[2];
	__u32 prev_state = (__u32)ctx[3];
	bool preempt = (bool)(ctx[0] & 1);
	__u64 now = 0;

	if (prev->tgid == target_tgid && !(prev_state & TASK_DEAD)) {
		__u32 tid = prev->pid;
		now = bpf_ktime_get_ns();
		struct start s = { .ts = now, .preempted = preempt || prev_state == 0 };
		if (bpf_map_update_elem(&starts, &tid, &s, BPF_ANY))
			count(1);
	}
	if (next->tgid != target_tgid)
		return 0;
	__u32 tid = next->pid;
	struct start *s = bpf_map_lookup_elem(&starts, &tid);
	if (!s || !s->preempted)
		return 0;
	if (!now)
		now = bpf_ktime_get_ns();
	__u64 waited = (now - s->ts) / 1000;
	bpf_map_delete_elem(&starts, &tid);
	add_bucket(&runq, tid, now, waited, 1, next);
	return 0;
}

/*
 * The end of __schedule(), on the thread that now runs: after a block, its kernel stack is still
 * the path it slept on (__schedule <- schedule <- rwsem_down_write_slowpath <- ...) and its user
 * registers are those it entered the kernel with. Only a block of at least min_block_ns has its
 * stacks walked.
 *
 * Why this tracepoint (sched_exit_tp, a bare tracepoint of recent kernels, only reachable as
 * tp_btf) and not a kprobe on finish_task_switch or fexit on schedule(): kernels built without
 * kprobes, or that refuse BPF trampolines (this project's CI machine does both), still have
 * tracepoints. And not bpf_get_task_stack() on the next thread at sched_switch: it leaves out
 * every __sched function (rwsem_down_write_slowpath, do_nanosleep, io_schedule), the very
 * frames that say what a thread waited for.
 */
SEC("tp_btf/sched_exit_tp")
int on_schedule_exit(__u64 *ctx)
{
	if (!in_target())
		return 0;
	__u32 tid = current_tid();
	struct start *s = bpf_map_lookup_elem(&starts, &tid);
	if (!s || s->preempted)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 away = now - s->ts;
	bpf_map_delete_elem(&starts, &tid);
	if (away < min_block_ns)
		return 0;
	struct event *e = reserve(EVENT_OFF, now);
	if (!e)
		return 0;
	e->value = away;
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
	bpf_map_delete_elem(&starts, &tid);
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
