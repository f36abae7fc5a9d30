//! The ledger's memory bound (≤ 32 bytes per entry), measured with a counting global
//! allocator. One test in this binary, so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use dreamloop::example::ExampleHash;
use dreamloop::scenario::Ledger;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn at_most_32_bytes_per_entry() {
    // Sizes include the worst case: one entry past a resize (7/8 of 2^20 buckets + 1).
    for n in [
        1_000u64, 10_000, 114_688, 114_689, 917_504, 917_505, 2_000_000,
    ] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut ledger = Ledger::in_memory();
        for i in 0..n {
            ledger
                .insert(ExampleHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .expect("in memory");
        }
        let measured = (LIVE.load(Ordering::Relaxed) - before) as f64;
        let per_entry = measured / n as f64;
        println!(
            "{n} entries: {measured} bytes, {per_entry:.2} bytes/entry (estimate {})",
            ledger.heap_bytes()
        );
        assert!(
            per_entry <= 32.0,
            "{n} entries: {per_entry} bytes per entry"
        );
        // The estimate used for metrics matches the measurement within 1 %.
        assert!(
            (ledger.heap_bytes() as f64 - measured).abs() <= measured * 0.01,
            "{n}: {} vs {measured}",
            ledger.heap_bytes()
        );
        drop(ledger);
    }
}
