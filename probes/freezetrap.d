/*
 * The `freezetrap` USDT provider. Integer arguments only: string or serde
 * arguments would allocate, and large_alloc fires from inside the allocator.
 * Argument order is part of the public contract (shared/CONTRACT.md).
 */
provider freezetrap {
    /* size, old_size (0 unless realloc), address, duration_ns, thread_id */
    probe large_alloc(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);
    /* stall_id, thread_id (0 = whole process), elapsed_ns at detection */
    probe stall_begin(uint64_t, uint64_t, uint64_t);
    /* stall_id, duration_ns */
    probe stall_end(uint64_t, uint64_t);
};
