//! Data-plane throughput on one core: scenarios generated (rendered, hashed, checked
//! against and recorded in an on-disk ledger) and labeled per second; ledger memory
//! and disk bytes per entry. Run with `cargo bench -p dreamloop --bench dataplane`;
//! figures go to BENCHMARKS.md ("Data plane").
//!
//! Uses the bundled library in `scenarios/` when it has templates, else the test
//! templates in `tests/fixtures/data/templates/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use dreamloop::example::ExampleHash;
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::scenario::{Generator, GeneratorConfig, Ledger, LedgerPolicy, Library};

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

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = Library::load_dir(&root.join("scenarios"))
        .ok()
        .filter(|l| !l.templates.is_empty());
    let (library, which) = match bundled {
        Some(l) => (l, "bundled scenarios/"),
        None => (
            Library::load_dir(&root.join("tests/fixtures/data/templates"))
                .expect("test templates parse"),
            "tests/fixtures/data/templates",
        ),
    };
    println!("library: {which}, {} templates", library.templates.len());

    let n = 200_000;
    for phase in [Phase::Sft, Phase::Dpo] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ledger, _) = Ledger::open(dir.path(), LedgerPolicy::default()).expect("ledger");
        let mut generator = Generator::new(
            library.clone(),
            ledger,
            GeneratorConfig {
                seed: 1,
                ..GeneratorConfig::default()
            },
        )
        .expect("generator");
        let labeler = Labeler::new(&LabelConfig {
            phase,
            ..LabelConfig::default()
        });
        let start = Instant::now();
        let mut bytes = 0usize;
        for _ in 0..n {
            let example = labeler.scenario(&generator.next().expect("fresh scenario"));
            bytes += example
                .prompt
                .iter()
                .map(|m| m.content.len())
                .sum::<usize>();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "generate+label ({phase:?}): {n} scenarios in {secs:.2} s = {:.0} /s ({} duplicates skipped, {:.0} prompt bytes avg)",
            n as f64 / secs,
            generator.duplicates_skipped(),
            bytes as f64 / n as f64
        );
        generator.ledger_mut().sync().expect("sync");
        let log = std::fs::metadata(dir.path().join("ledger.log"))
            .expect("log")
            .len();
        println!(
            "ledger on disk: {:.2} bytes/entry in the log",
            (log - 8) as f64 / n as f64
        );
    }

    for n in [100_000u64, 917_505, 1_000_000, 10_000_000] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut ledger = Ledger::in_memory();
        let start = Instant::now();
        for i in 0..n {
            ledger
                .insert(ExampleHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .expect("in memory");
        }
        let secs = start.elapsed().as_secs_f64();
        let live = LIVE.load(Ordering::Relaxed) - before;
        let probe = Instant::now();
        let hits = (0..n)
            .filter(|i| ledger.contains(ExampleHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))))
            .count();
        let probe_secs = probe.elapsed().as_secs_f64();
        assert_eq!(hits as u64, n);
        println!(
            "ledger memory: {n} entries, {live} bytes = {:.2} bytes/entry; insert {:.0} ns, lookup {:.0} ns",
            live as f64 / n as f64,
            secs * 1e9 / n as f64,
            probe_secs * 1e9 / n as f64
        );
    }
}
