//! Ledger crash recovery: a log cut inside its last record (a crash mid-write) opens,
//! loses exactly that record, and says so both in the returned `Recovery` and as a
//! `tracing` warning.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex};

use dreamloop::example::ExampleHash;
use dreamloop::scenario::ledger::RECORD_BYTES;
use dreamloop::scenario::{Ledger, LedgerPolicy};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Records the messages of WARN events.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Warnings {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if *event.metadata().level() == Level::WARN {
            let mut v = MessageVisitor(String::new());
            event.record(&mut v);
            self.0.lock().expect("not poisoned").push(v.0);
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn h(n: u64) -> ExampleHash {
    ExampleHash(n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17))
}

const LOG_HEADER: u64 = 8;

#[test]
fn torn_last_record_is_dropped_with_a_warning() {
    let policy = LedgerPolicy {
        sync_every: 64,
        snapshot_every: 1 << 20,
    };
    // Every possible cut inside the last record: 1 to 11 bytes of it are missing.
    for cut in 1..RECORD_BYTES as u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut ledger, _) = Ledger::open(dir.path(), policy).expect("open");
            for i in 0..1000 {
                assert!(ledger.insert(h(i)).expect("insert"));
            }
        }
        let log = dir.path().join("ledger.log");
        let full = LOG_HEADER + 1000 * RECORD_BYTES as u64;
        assert_eq!(std::fs::metadata(&log).expect("meta").len(), full);
        OpenOptions::new()
            .write(true)
            .open(&log)
            .and_then(|f| f.set_len(full - cut))
            .expect("truncate");

        let warnings = Warnings::default();
        let (ledger, recovery) = tracing::subscriber::with_default(warnings.clone(), || {
            Ledger::open(dir.path(), policy)
        })
        .expect("recovers");
        assert_eq!(
            recovery.truncated_bytes,
            RECORD_BYTES as u64 - cut,
            "cut {cut}"
        );
        assert_eq!(recovery.log_records, 999);
        assert!(recovery.repaired());
        assert_eq!(ledger.len(), 999);
        assert!((0..999).all(|i| ledger.contains(h(i))));
        assert!(!ledger.contains(h(999)), "the torn record is gone");
        let logged = warnings.0.lock().expect("not poisoned").clone();
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(logged[0].contains("torn"), "{logged:?}");
        // The file was cut back to whole records, so appending continues cleanly.
        assert_eq!(
            std::fs::metadata(&log).expect("meta").len(),
            full - RECORD_BYTES as u64
        );
        drop(ledger);

        let (mut ledger, recovery) = Ledger::open(dir.path(), policy).expect("reopen");
        assert!(!recovery.repaired(), "{recovery:?}");
        assert!(
            ledger.insert(h(999)).expect("insert"),
            "the lost hash can be recorded again"
        );
        drop(ledger);
        let (ledger, recovery) = Ledger::open(dir.path(), policy).expect("reopen");
        assert!(!recovery.repaired());
        assert_eq!(ledger.position(), 1000);
    }
}

#[test]
fn torn_record_after_a_snapshot_keeps_the_snapshot() {
    let policy = LedgerPolicy {
        sync_every: 1,
        snapshot_every: 100,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut ledger, _) = Ledger::open(dir.path(), policy).expect("open");
        for i in 0..250 {
            ledger.insert(h(i)).expect("insert");
        }
    }
    // 200 in the snapshot, 50 in the log; cut the last log record in half.
    let log = dir.path().join("ledger.log");
    let len = std::fs::metadata(&log).expect("meta").len();
    assert_eq!(len, LOG_HEADER + 50 * RECORD_BYTES as u64);
    OpenOptions::new()
        .write(true)
        .open(&log)
        .and_then(|f| f.set_len(len - 6))
        .expect("truncate");
    let (ledger, recovery) = Ledger::open(dir.path(), policy).expect("recovers");
    assert_eq!(
        (
            recovery.snapshot_entries,
            recovery.log_records,
            recovery.truncated_bytes
        ),
        (200, 49, 6)
    );
    assert_eq!(ledger.len(), 249);
    assert!(!ledger.contains(h(249)));
}
