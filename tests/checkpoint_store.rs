//! The checkpoint store against DESIGN.md §6: the atomic write protocol (checked by
//! recording and by crashing at every filesystem operation), verification on load,
//! retention, the mirror, rollback, and a real full filesystem (tmpfs, when mountable).

use std::fs;
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dreamloop::checkpoint::{
    latest_named, load_read_only, step_dir_name, CheckpointError, CheckpointStore, FaultHook,
    FileSource, FsOp, Quarantine, RetentionPolicy, Saved, Select, Warning, GOOD_POINTER,
    LATEST_POINTER, MANIFEST_FILE,
};
use sha2::{Digest, Sha256};

/// sha256("abc"), FIPS 180-2 appendix B.1.
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

/// Deterministic pseudo-random bytes (xorshift64), different per `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The weights of a test checkpoint: 2.5 MiB, so the store writes them in several chunks.
fn weights(step: u64) -> Vec<u8> {
    noise(5 << 19, step)
}

/// Saves a checkpoint shaped like the trainer's: weights streamed through a callback in
/// 64 KiB pieces, the rest from memory.
fn save(store: &mut CheckpointStore, step: u64) -> Result<Saved, CheckpointError> {
    let model = weights(step);
    let state = format!("{{\"step\": {step}}}");
    store.save(
        step,
        vec![
            (
                "model.safetensors",
                FileSource::Writer(Box::new(move |w: &mut dyn Write| {
                    model.chunks(64 << 10).try_for_each(|c| w.write_all(c))
                })),
            ),
            (
                "config.json",
                FileSource::Bytes(b"{\"model_type\": \"llama\"}"),
            ),
            ("abc.txt", FileSource::Bytes(b"abc")),
            ("state.json", FileSource::Bytes(state.as_bytes())),
        ],
    )
}

fn open(state: &Path, keep_last: usize) -> (CheckpointStore, Vec<Warning>) {
    CheckpointStore::open(
        state,
        RetentionPolicy {
            keep_last,
            mirror_dir: None,
        },
    )
    .expect("open the store")
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn pointer(state: &Path, name: &str) -> Option<String> {
    fs::read_to_string(state.join("checkpoints").join(name)).ok()
}

/// Records every operation; fails (error or simulated crash) at the `fail_at`-th one.
struct Faults {
    seen: AtomicUsize,
    fail_at: usize,
    crash: bool,
    log: Mutex<Vec<(FsOp, PathBuf)>>,
}

/// The unwinding payload of a simulated crash (raised with `resume_unwind`, which skips the
/// panic hook, so the test output stays quiet).
struct Crash;

impl Faults {
    fn new(fail_at: usize, crash: bool) -> Arc<Self> {
        Arc::new(Self {
            seen: AtomicUsize::new(0),
            fail_at,
            crash,
            log: Mutex::new(Vec::new()),
        })
    }
}

impl FaultHook for Faults {
    fn before(&self, op: FsOp, path: &Path) -> io::Result<()> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        self.log.lock().unwrap().push((op, path.to_path_buf()));
        if n == self.fail_at {
            if self.crash {
                panic::resume_unwind(Box::new(Crash));
            }
            return Err(io::Error::other("injected fault"));
        }
        Ok(())
    }
}

#[test]
fn save_writes_a_verified_directory_and_points_latest_at_it() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, warnings) = open(state.path(), 3);
    assert!(warnings.is_empty());
    let saved = save(&mut store, 420).unwrap();
    assert!(saved.warnings.is_empty());
    let dir = state.path().join("checkpoints");
    assert_eq!(names(&dir), ["LATEST", "step-00000420"]);
    assert_eq!(
        names(&dir.join("step-00000420")),
        [
            "MANIFEST.json",
            "abc.txt",
            "config.json",
            "model.safetensors",
            "state.json"
        ]
    );
    assert_eq!(
        pointer(state.path(), LATEST_POINTER).unwrap(),
        "step-00000420\n"
    );

    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("step-00000420").join(MANIFEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["step"], 420);
    let entry = |name: &str| {
        manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(entry("abc.txt")["sha256"], SHA256_ABC);
    assert_eq!(entry("abc.txt")["size"], 3);
    let model = weights(420);
    assert_eq!(entry("model.safetensors")["size"], model.len());
    assert_eq!(
        entry("model.safetensors")["sha256"],
        hex::encode(Sha256::digest(&model))
    );

    let loaded = store.load(420).unwrap();
    assert_eq!(loaded.manifest, saved.checkpoint.manifest);
    assert_eq!(fs::read(loaded.file("model.safetensors")).unwrap(), model);
    assert_eq!(store.latest(), Some(420));
    assert_eq!(store.good(), None);
}

/// `latest_named` (the trainer's fallback restart point) reads LATEST as written, and
/// names nothing for a missing pointer, a pointer that is not a step name, or a step whose
/// directory is gone.
#[test]
fn latest_named_is_the_directory_latest_points_at() {
    let state = tempfile::tempdir().unwrap();
    assert_eq!(latest_named(state.path()), None);
    let (mut store, _) = open(state.path(), 3);
    save(&mut store, 7).unwrap();
    let dir = state.path().join("checkpoints");
    assert_eq!(latest_named(state.path()), Some(dir.join("step-00000007")));
    fs::write(dir.join(LATEST_POINTER), "step-00000009\n").unwrap();
    assert_eq!(latest_named(state.path()), None);
    fs::write(dir.join(LATEST_POINTER), "garbage").unwrap();
    assert_eq!(latest_named(state.path()), None);
}

#[test]
fn protocol_order_manifest_last_then_rename_then_pointer() {
    let state = tempfile::tempdir().unwrap();
    let (store, _) = open(state.path(), 3);
    let faults = Faults::new(0, false);
    let mut store = store.with_fault_hook(faults.clone());
    save(&mut store, 7).unwrap();
    let log = faults.log.lock().unwrap().clone();
    let dir = state.path().join("checkpoints");
    let tmp = dir.join(".tmp-step-00000007");
    let pos = |op: FsOp, path: &Path| {
        log.iter()
            .position(|(o, p)| *o == op && p == path)
            .unwrap_or_else(|| panic!("{op:?} {} not in {log:?}", path.display()))
    };
    let manifest_created = pos(FsOp::CreateFile, &tmp.join(MANIFEST_FILE));
    for name in ["model.safetensors", "config.json", "abc.txt", "state.json"] {
        assert!(
            pos(FsOp::SyncFile, &tmp.join(name)) < manifest_created,
            "{name}"
        );
    }
    let model_writes = log
        .iter()
        .filter(|(o, p)| *o == FsOp::Write && p.ends_with("model.safetensors"))
        .count();
    assert!(
        model_writes >= 3,
        "weights written in chunks, got {model_writes}"
    );
    let manifest_synced = pos(FsOp::SyncFile, &tmp.join(MANIFEST_FILE));
    let tmp_synced = pos(FsOp::SyncDir, &tmp);
    let renamed = pos(FsOp::Rename, &dir.join("step-00000007"));
    let parent_synced = log
        .iter()
        .rposition(|(o, p)| *o == FsOp::SyncDir && p == &dir)
        .unwrap();
    let latest_tmp_synced = pos(FsOp::SyncFile, &dir.join(".tmp-LATEST"));
    let latest_renamed = pos(FsOp::Rename, &dir.join(LATEST_POINTER));
    assert!(pos(FsOp::CreateDir, &tmp) < manifest_created);
    assert!(manifest_created < manifest_synced);
    assert!(manifest_synced < tmp_synced);
    assert!(tmp_synced < renamed);
    assert!(renamed < latest_tmp_synced);
    assert!(latest_tmp_synced < latest_renamed);
    assert!(latest_renamed < parent_synced);
    // The parent is also fsynced between the directory rename and the pointer.
    assert!(log[renamed + 1..latest_tmp_synced]
        .iter()
        .any(|(o, p)| *o == FsOp::SyncDir && p == &dir));
}

/// Builds the pre-crash state (10 GOOD, 20 LATEST, keep_last 1) and counts the operations
/// of saving step 30 on it.
fn crash_fixture(state: &Path) -> CheckpointStore {
    let (mut store, _) = open(state, 1);
    save(&mut store, 10).unwrap();
    store.mark_good(10).unwrap();
    save(&mut store, 20).unwrap();
    store
}

/// After any interruption: every visible `step-*` directory verifies, LATEST names one of
/// them, GOOD is untouched, and resuming picks 20 or 30.
fn assert_consistent_after_reopen(state: &Path, context: &str) -> u64 {
    let (store, _) = open(state, 1);
    let dir = state.join("checkpoints");
    for name in names(&dir) {
        assert!(!name.starts_with(".tmp-"), "{context}: debris {name} left");
        if let Some(step) = name.strip_prefix("step-") {
            let step: u64 = step.parse().unwrap();
            store
                .load(step)
                .unwrap_or_else(|e| panic!("{context}: visible {name} does not load: {e}"));
        }
    }
    assert_eq!(store.good(), Some(10), "{context}");
    assert_eq!(pointer(state, GOOD_POINTER).unwrap(), "step-00000010\n");
    let latest = store
        .latest()
        .unwrap_or_else(|| panic!("{context}: LATEST unusable"));
    assert!(latest == 20 || latest == 30, "{context}: LATEST {latest}");
    let (resume, warnings) = store.resume_point().unwrap();
    let resume = resume.unwrap();
    assert_eq!(resume.step, latest, "{context}: {warnings:?}");
    assert_eq!(
        fs::read(resume.file("model.safetensors")).unwrap(),
        weights(resume.step)
    );
    latest
}

#[test]
fn a_crash_at_any_operation_never_exposes_an_incomplete_checkpoint() {
    let counting = tempfile::tempdir().unwrap();
    let faults = Faults::new(0, false);
    let mut store = crash_fixture(counting.path()).with_fault_hook(faults.clone());
    save(&mut store, 30).unwrap();
    let total = faults.seen.load(Ordering::SeqCst);
    assert!(total > 20, "only {total} operations counted");

    let mut resumed_at_30 = 0;
    for crash_at in 1..=total {
        let state = tempfile::tempdir().unwrap();
        let mut store = crash_fixture(state.path()).with_fault_hook(Faults::new(crash_at, true));
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| save(&mut store, 30)));
        let payload = outcome.expect_err("the hook crashes the save");
        assert!(
            payload.is::<Crash>(),
            "a real panic at operation {crash_at}"
        );
        drop(store);
        let context = format!("crash at operation {crash_at} of {total}");
        if assert_consistent_after_reopen(state.path(), &context) == 30 {
            resumed_at_30 += 1;
        }
    }
    // Crashing before the LATEST rename resumes from 20, after it from 30: both happen.
    assert!(
        resumed_at_30 > 0 && resumed_at_30 < total,
        "{resumed_at_30}/{total}"
    );
}

#[test]
fn a_write_error_at_any_operation_keeps_the_previous_state() {
    let counting = tempfile::tempdir().unwrap();
    let faults = Faults::new(0, false);
    let mut store = crash_fixture(counting.path()).with_fault_hook(faults.clone());
    save(&mut store, 30).unwrap();
    let total = faults.seen.load(Ordering::SeqCst);

    let mut failed = 0;
    for fail_at in 1..=total {
        let state = tempfile::tempdir().unwrap();
        let mut store = crash_fixture(state.path()).with_fault_hook(Faults::new(fail_at, false));
        let context = format!("error at operation {fail_at} of {total}");
        match save(&mut store, 30) {
            Err(e) => {
                failed += 1;
                assert!(e.to_string().contains("injected fault"), "{context}: {e}");
                // Previous pointers intact, the previous checkpoint still loads, no debris
                // even before reopening.
                assert_eq!(
                    pointer(state.path(), LATEST_POINTER).unwrap(),
                    "step-00000020\n"
                );
                assert_eq!(store.latest(), Some(20), "{context}");
                store.load(20).unwrap();
                store.load(10).unwrap();
                let dir = state.path().join("checkpoints");
                assert!(
                    names(&dir).iter().all(|n| !n.starts_with(".tmp-step")),
                    "{context}: {:?}",
                    names(&dir)
                );
            }
            Ok(saved) => assert!(!saved.warnings.is_empty(), "{context}: error swallowed"),
        }
        drop(store);
        assert_consistent_after_reopen(state.path(), &context);
    }
    assert!(failed > 15, "{failed}/{total} operations failed the save");
}

#[test]
fn a_flipped_weight_byte_is_detected_and_resume_falls_back() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 3);
    save(&mut store, 1).unwrap();
    save(&mut store, 2).unwrap();
    let weights_path = state
        .path()
        .join("checkpoints/step-00000002/model.safetensors");
    let mut bytes = fs::read(&weights_path).unwrap();
    bytes[123_456] ^= 0x01;
    fs::write(&weights_path, &bytes).unwrap();

    match store.load(2) {
        Err(CheckpointError::Corrupt { path, .. }) => assert_eq!(path, weights_path),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let (resume, warnings) = store.resume_point().unwrap();
    assert_eq!(resume.unwrap().step, 1);
    assert!(
        matches!(&warnings[..], [Warning::Skipped { path, reason }]
            if path.ends_with("step-00000002") && reason.contains("model.safetensors")),
        "{warnings:?}"
    );
    // A corrupt checkpoint cannot become the rollback target.
    assert!(matches!(
        store.mark_good(2),
        Err(CheckpointError::Corrupt { .. })
    ));
}

#[test]
fn a_truncated_or_missing_manifest_is_ignored_with_a_warning() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 5);
    for step in 1..=3 {
        save(&mut store, step).unwrap();
    }
    let dir = state.path().join("checkpoints");
    let manifest3 = dir.join("step-00000003").join(MANIFEST_FILE);
    let text = fs::read(&manifest3).unwrap();
    fs::write(&manifest3, &text[..text.len() / 2]).unwrap();
    fs::remove_file(dir.join("step-00000002").join(MANIFEST_FILE)).unwrap();
    drop(store);

    let (store, warnings) = open(state.path(), 5);
    assert_eq!(store.latest(), None);
    assert!(
        matches!(&warnings[..], [Warning::BadPointer { path, reason }]
            if path.ends_with(LATEST_POINTER) && reason.contains("MANIFEST.json")),
        "{warnings:?}"
    );
    assert!(matches!(
        store.load(3),
        Err(CheckpointError::BadManifest { .. })
    ));
    assert!(matches!(
        store.load(2),
        Err(CheckpointError::Incomplete { .. })
    ));
    let (resume, warnings) = store.resume_point().unwrap();
    assert_eq!(resume.unwrap().step, 1);
    let skipped: Vec<_> = warnings
        .iter()
        .filter_map(|w| match w {
            Warning::Skipped { path, .. } => Some(path.file_name().unwrap().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(skipped, ["step-00000003", "step-00000002"]);
}

#[test]
fn retention_keeps_the_last_k_plus_the_good_target() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 2);
    let dir = state.path().join("checkpoints");
    save(&mut store, 1).unwrap();
    store.mark_good(1).unwrap();
    for step in 2..=5 {
        save(&mut store, step).unwrap();
    }
    assert_eq!(
        names(&dir),
        [
            "GOOD",
            "LATEST",
            "step-00000001",
            "step-00000004",
            "step-00000005"
        ]
    );
    store.mark_good(5).unwrap();
    save(&mut store, 6).unwrap();
    // Step 1 is no longer the rollback target, so only the last two remain.
    assert_eq!(
        names(&dir),
        ["GOOD", "LATEST", "step-00000005", "step-00000006"]
    );
    assert_eq!(
        pointer(state.path(), GOOD_POINTER).unwrap(),
        "step-00000005\n"
    );
}

#[test]
fn rollback_restores_latest_and_drops_the_abandoned_timeline() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 5);
    for step in [10, 20, 30] {
        save(&mut store, step).unwrap();
    }
    store.mark_good(10).unwrap();
    let (restored, warnings) = store.rollback_to(10).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(restored.step, 10);
    assert_eq!(store.latest(), Some(10));
    assert_eq!(
        pointer(state.path(), LATEST_POINTER).unwrap(),
        "step-00000010\n"
    );
    let dir = state.path().join("checkpoints");
    assert_eq!(names(&dir), ["GOOD", "LATEST", "step-00000010"]);
    // The new timeline reaches step 20 again; then a same-step save replaces in place.
    save(&mut store, 20).unwrap();
    let replaced = store
        .save(20, vec![("state.json", FileSource::Bytes(b"{}"))])
        .unwrap();
    assert_eq!(replaced.checkpoint.manifest.files.len(), 1);
    assert_eq!(store.load(20).unwrap().manifest.files.len(), 1);
    assert_eq!(
        names(&dir),
        ["GOOD", "LATEST", "step-00000010", "step-00000020"]
    );
}

#[test]
fn good_checkpoints_are_mirrored_and_a_mirror_failure_is_only_a_warning() {
    let state = tempfile::tempdir().unwrap();
    let mirror = tempfile::tempdir().unwrap();
    let (mut store, _) = CheckpointStore::open(
        state.path(),
        RetentionPolicy {
            keep_last: 1,
            mirror_dir: Some(mirror.path().to_path_buf()),
        },
    )
    .unwrap();
    for step in 1..=3 {
        save(&mut store, step).unwrap();
        let warnings = store.mark_good(step).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }
    // The mirror is itself a state directory: a store opened on it resumes from GOOD.
    let (mirrored, warnings) = open(mirror.path(), 1);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(mirrored.good(), Some(3));
    assert_eq!(
        names(&mirror.path().join("checkpoints")),
        ["GOOD", "LATEST", "step-00000003"]
    );
    let copy = mirrored.load(3).unwrap();
    assert_eq!(copy.manifest, store.load(3).unwrap().manifest);
    assert_eq!(
        fs::read(copy.file("model.safetensors")).unwrap(),
        weights(3)
    );

    // A mirror that cannot be created (a file stands where its directory should be).
    let blocked = state.path().join("not-a-dir");
    fs::write(&blocked, b"x").unwrap();
    let (mut store, _) = CheckpointStore::open(
        state.path(),
        RetentionPolicy {
            keep_last: 1,
            mirror_dir: Some(blocked.clone()),
        },
    )
    .unwrap();
    save(&mut store, 4).unwrap();
    let warnings = store.mark_good(4).unwrap();
    assert!(
        matches!(&warnings[..], [Warning::MirrorFailed { path, .. }] if path.starts_with(&blocked)),
        "{warnings:?}"
    );
    assert_eq!(store.good(), Some(4));
}

#[test]
fn file_names_are_checked() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 1);
    for bad in ["../escape", "MANIFEST.json", ".hidden", ""] {
        let result = store.save(1, vec![(bad, FileSource::Bytes(b"x"))]);
        assert!(
            matches!(result, Err(CheckpointError::InvalidFileName { .. })),
            "{bad:?}"
        );
    }
    let twice = store.save(
        1,
        vec![
            ("a", FileSource::Bytes(b"x")),
            ("a", FileSource::Bytes(b"y")),
        ],
    );
    assert!(matches!(
        twice,
        Err(CheckpointError::InvalidFileName { .. })
    ));
    assert_eq!(
        names(&state.path().join("checkpoints")),
        Vec::<String>::new()
    );
}

#[test]
fn a_failing_source_aborts_the_save_and_names_the_file() {
    let state = tempfile::tempdir().unwrap();
    let (mut store, _) = open(state.path(), 1);
    let source = state.path().join("tokenizer.json");
    fs::write(&source, b"{\"version\": \"1.0\"}").unwrap();
    save(&mut store, 1).unwrap();
    let err = store
        .save(
            2,
            vec![
                ("tokenizer.json", FileSource::Copy(&source)),
                (
                    "model.safetensors",
                    FileSource::Writer(Box::new(|w: &mut dyn Write| {
                        w.write_all(&[0u8; 1000])?;
                        Err(io::Error::other("serialiser failed"))
                    })),
                ),
            ],
        )
        .unwrap_err();
    match &err {
        CheckpointError::Io { path, .. } => assert!(path.ends_with("model.safetensors")),
        other => panic!("expected Io, got {other:?}"),
    }
    assert_eq!(store.latest(), Some(1));
    assert_eq!(
        names(&state.path().join("checkpoints")),
        ["LATEST", "step-00000001"]
    );
    let copied = store
        .save(3, vec![("tokenizer.json", FileSource::Copy(&source))])
        .unwrap();
    assert_eq!(
        fs::read(copied.checkpoint.file("tokenizer.json")).unwrap(),
        fs::read(&source).unwrap()
    );
}

#[test]
fn quarantine_appends_jsonl_records() {
    let state = tempfile::tempdir().unwrap();
    let mut q = Quarantine::open(state.path()).unwrap();
    q.append(
        31,
        40,
        30,
        serde_json::json!({"prompt": "p", "completion": "c"}),
    )
    .unwrap();
    q.append(
        32,
        40,
        30,
        serde_json::json!({"prompt": "q", "completion": "d"}),
    )
    .unwrap();
    let (records, warnings) = Quarantine::read::<serde_json::Value>(state.path()).unwrap();
    assert!(warnings.is_empty());
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].step, 32);
    assert_eq!(records[1].rolled_back_to, 30);
    assert_eq!(records[1].example["prompt"], "q");
    assert!(state.path().join("quarantine/examples.jsonl").is_file());
}

/// Unmounts the tmpfs when the test ends, whatever happens.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_filesystem_fails_the_save_and_keeps_the_previous_checkpoint() {
    let base = tempfile::tempdir().unwrap();
    let mount_point = base.path().join("small");
    fs::create_dir(&mount_point).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mount_point)
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("skipping: cannot mount a 1 MiB tmpfs here ({other:?})");
            return;
        }
    }
    let _guard = Mounted(mount_point.clone());
    let (mut store, _) = open(&mount_point, 2);
    let small = noise(200 << 10, 1);
    store
        .save(1, vec![("model.safetensors", FileSource::Bytes(&small))])
        .unwrap();
    store.mark_good(1).unwrap();

    let big = noise(2 << 20, 2);
    let err = store
        .save(2, vec![("model.safetensors", FileSource::Bytes(&big))])
        .unwrap_err();
    match &err {
        CheckpointError::Io { source, path, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::StorageFull, "{err}");
            assert!(path.starts_with(mount_point.join("checkpoints")), "{err}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let dir = mount_point.join("checkpoints");
    assert_eq!(names(&dir), ["GOOD", "LATEST", "step-00000001"]);
    assert_eq!(store.load(1).unwrap().step, 1);
    assert_eq!(store.latest(), Some(1));
    // The failed attempt's space was given back: a checkpoint that fits still saves.
    store
        .save(3, vec![("model.safetensors", FileSource::Bytes(&small))])
        .unwrap();
    assert_eq!(
        pointer(&mount_point, LATEST_POINTER).unwrap(),
        step_dir_name(3) + "\n"
    );
}

#[test]
fn a_crash_while_marking_good_and_mirroring_leaves_both_sides_usable() {
    let fixture = |state: &Path, mirror: &Path| {
        let (mut store, _) = CheckpointStore::open(
            state,
            RetentionPolicy {
                keep_last: 1,
                mirror_dir: Some(mirror.to_path_buf()),
            },
        )
        .unwrap();
        save(&mut store, 1).unwrap();
        store.mark_good(1).unwrap();
        save(&mut store, 2).unwrap();
        store
    };
    let (state, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let faults = Faults::new(0, false);
    let mut store = fixture(state.path(), mirror.path()).with_fault_hook(faults.clone());
    store.mark_good(2).unwrap();
    let total = faults.seen.load(Ordering::SeqCst);
    assert!(total > 15, "only {total} operations counted");

    for crash_at in 1..=total {
        let (state, mirror) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut store =
            fixture(state.path(), mirror.path()).with_fault_hook(Faults::new(crash_at, true));
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| store.mark_good(2)));
        assert!(outcome.expect_err("the hook crashes").is::<Crash>());
        drop(store);
        let context = format!("crash at operation {crash_at} of {total}");
        for root in [state.path(), mirror.path()] {
            let (side, _) = open(root, 1);
            let good = side.good().unwrap_or_else(|| panic!("{context}: no GOOD"));
            assert!(good == 1 || good == 2, "{context}: GOOD {good}");
            side.load(good).unwrap();
            for listed in side.list().unwrap() {
                side.load(listed.step)
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
            }
        }
    }
}

#[test]
fn a_read_only_load_follows_the_pointers_verifies_and_leaves_everything_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let (mut store, _) = open(state, 3);
    save(&mut store, 1).unwrap();
    let dir = state.join("checkpoints");
    assert!(matches!(
        load_read_only(state, Select::Good),
        Err(CheckpointError::NoPointer { ref path, .. }) if *path == dir.join(GOOD_POINTER)
    ));
    store.mark_good(1).unwrap();
    save(&mut store, 2).unwrap();
    // A save in flight (what `open` would delete as debris) must survive a reader.
    let in_flight = dir.join(".tmp-step-00000003");
    fs::create_dir(&in_flight).unwrap();
    fs::write(in_flight.join("model.safetensors"), b"partial").unwrap();

    let latest = load_read_only(state, Select::Latest).unwrap();
    assert_eq!(
        (latest.step, latest.path.clone()),
        (2, dir.join(step_dir_name(2)))
    );
    assert_eq!(load_read_only(state, Select::Good).unwrap().step, 1);
    assert_eq!(load_read_only(state, Select::Step(2)).unwrap(), latest);
    assert!(matches!(
        load_read_only(state, Select::Step(7)),
        Err(CheckpointError::NotFound { step: 7, .. })
    ));
    assert!(in_flight.join("model.safetensors").exists());

    // A flipped byte is found by re-hashing, and the error names the file.
    let weights_path = latest.file("model.safetensors");
    let mut bytes = fs::read(&weights_path).unwrap();
    bytes[1000] ^= 0x80;
    fs::write(&weights_path, bytes).unwrap();
    match load_read_only(state, Select::Latest) {
        Err(CheckpointError::Corrupt { path, .. }) => assert_eq!(path, weights_path),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    fs::write(dir.join(LATEST_POINTER), "garbage\n").unwrap();
    assert!(matches!(
        load_read_only(state, Select::Latest),
        Err(CheckpointError::BadPointer { .. })
    ));
    assert!(matches!(
        load_read_only(&state.join("absent"), Select::Latest),
        Err(CheckpointError::Io { .. })
    ));
}
