//! One recorded allocation: the plain-integer event the allocating thread writes, and its
//! encoding as words for the lock-free slots of the ring and the in-flight table.

/// Raw return addresses kept per event.
pub const MAX_FRAMES: usize = 32;

const HEADER_WORDS: usize = 10;
/// Words an event occupies in a slot.
pub(crate) const WORDS: usize = HEADER_WORDS + MAX_FRAMES;

/// Which allocator entry point produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AllocKind {
    /// `GlobalAlloc::alloc`.
    Alloc = 0,
    /// `GlobalAlloc::alloc_zeroed`.
    AllocZeroed = 1,
    /// `GlobalAlloc::realloc` (`old_size` is the size before).
    Realloc = 2,
}

impl AllocKind {
    /// The name used in reports: `alloc`, `alloc_zeroed` or `realloc`.
    pub fn as_str(self) -> &'static str {
        match self {
            AllocKind::Alloc => "alloc",
            AllocKind::AllocZeroed => "alloc_zeroed",
            AllocKind::Realloc => "realloc",
        }
    }
    pub(crate) fn from_u8(v: u8) -> AllocKind {
        match v {
            1 => AllocKind::AllocZeroed,
            2 => AllocKind::Realloc,
            _ => AllocKind::Alloc,
        }
    }
}

/// One oversized allocation, as recorded on the allocating thread: plain integers and raw return
/// addresses, symbolized later by the reporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    /// Sequence number, 0-based, in order of completion.
    pub seq: u64,
    /// Entry point.
    pub kind: AllocKind,
    /// Requested size in bytes.
    pub size: u64,
    /// Size before a realloc; 0 otherwise.
    pub old_size: u64,
    /// Address returned by the inner allocator; 0 if it failed.
    pub address: u64,
    /// Kernel thread id of the allocating thread.
    pub thread_id: u64,
    /// Kernel name of the allocating thread, NUL-padded.
    pub thread_name: [u8; 16],
    /// `CLOCK_MONOTONIC` nanoseconds when the allocation entered the allocator.
    pub ts_ns: u64,
    /// Nanoseconds spent inside the inner allocator.
    pub duration_ns: u64,
    /// How many entries of `frames` are valid.
    pub frame_count: usize,
    /// Raw return addresses, innermost first (allocator frames included; the reporter trims them).
    pub frames: [usize; MAX_FRAMES],
}

impl RawEvent {
    /// An all-zero event, for preallocated buffers.
    pub const EMPTY: RawEvent = RawEvent {
        seq: 0,
        kind: AllocKind::Alloc,
        size: 0,
        old_size: 0,
        address: 0,
        thread_id: 0,
        thread_name: [0; 16],
        ts_ns: 0,
        duration_ns: 0,
        frame_count: 0,
        frames: [0; MAX_FRAMES],
    };

    /// The valid frames.
    pub fn frames(&self) -> &[usize] {
        &self.frames[..self.frame_count.min(MAX_FRAMES)]
    }

    /// The thread name as text.
    pub fn thread_name(&self) -> &str {
        base::thread::name_str(&self.thread_name)
    }

    pub(crate) fn encode(&self) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        w[0] = self.seq;
        w[1] = self.kind as u64 | ((self.frame_count.min(MAX_FRAMES) as u64) << 8);
        w[2] = self.size;
        w[3] = self.old_size;
        w[4] = self.address;
        w[5] = self.thread_id;
        w[6] = u64::from_le_bytes(self.thread_name[..8].try_into().unwrap_or([0; 8]));
        w[7] = u64::from_le_bytes(self.thread_name[8..].try_into().unwrap_or([0; 8]));
        w[8] = self.ts_ns;
        w[9] = self.duration_ns;
        for (d, f) in w[HEADER_WORDS..].iter_mut().zip(self.frames.iter()) {
            *d = *f as u64;
        }
        w
    }
}

pub(crate) fn decode(w: &[u64; WORDS]) -> RawEvent {
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(&w[6].to_le_bytes());
    name[8..].copy_from_slice(&w[7].to_le_bytes());
    let mut frames = [0usize; MAX_FRAMES];
    for (d, s) in frames.iter_mut().zip(w[HEADER_WORDS..].iter()) {
        *d = *s as usize;
    }
    RawEvent {
        seq: w[0],
        kind: AllocKind::from_u8((w[1] & 0xff) as u8),
        frame_count: ((w[1] >> 8) as usize).min(MAX_FRAMES),
        size: w[2],
        old_size: w[3],
        address: w[4],
        thread_id: w[5],
        thread_name: name,
        ts_ns: w[8],
        duration_ns: w[9],
        frames,
    }
}
