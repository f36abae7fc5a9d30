//! The ledger's memory bound (≤ 32 bytes per entry), measured with a counting global
//! allocator. The count is per thread: the test harness's own threads allocate meanwhile
//! (seen under qemu's emulation, where their timing differs: 900 bytes in a 18 kB
//! measurement), and only the measuring thread's allocations are the ledger's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use dreamloop::example::ExampleHash;
use dreamloop::scenario::Ledger;

struct Counting;

thread_local! {
    /// Bytes live from this thread's allocations (const-initialised: no allocation).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // `try_with`: a thread may free memory while its thread-locals are being destroyed.
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

fn live() -> isize {
    LIVE.with(Cell::get)
}

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
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
        let before = live();
        let mut ledger = Ledger::in_memory();
        for i in 0..n {
            ledger
                .insert(ExampleHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .expect("in memory");
        }
        let measured = (live() - before) as f64;
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
