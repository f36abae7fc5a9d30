//! Checkpoint save and verified load of a SmolLM2-135M-sized file set (540 MB of f32
//! weights, random bytes) against what the disk itself does in the same run: a raw
//! sequential write with fsync, and a raw sequential read.
//!
//! Run: `cargo bench -p dreamloop --bench checkpoint --profile dev` (the one profile the
//! workspace builds; dependencies, sha2 included, are at opt-level 3 in it). Set
//! `DREAMLOOP_BENCH_DIR` to measure another disk (default: the system temp directory).
//! "Cold" reads first drop the file's pages from the page cache with
//! `posix_fadvise(DONTNEED)` (that file only, so other
//! work on the machine keeps its cache); "warm" reads follow a cold one.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dreamloop::checkpoint::{hash_file, CheckpointStore, FileSource, RetentionPolicy};
use sha2::{Digest, Sha256};

/// SmolLM2-135M: 134.5 M parameters × 4 bytes (f32), rounded.
const WEIGHTS_BYTES: usize = 540_000_000;
/// Sequential I/O chunk, the same as the store's.
const CHUNK: usize = 1 << 20;
/// Repetitions of each measurement; the median is reported.
const REPS: usize = 3;

fn main() {
    let base = std::env::var_os("DREAMLOOP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("dreamloop-bench-")
        .tempdir_in(&base)
        .expect("create a scratch directory");
    println!(
        "scratch {} ({} MB weights, median of {REPS})",
        work.path().display(),
        WEIGHTS_BYTES / 1_000_000
    );
    let weights = noise(WEIGHTS_BYTES);
    let config = br#"{"model_type": "llama", "hidden_size": 576}"#.to_vec();
    let state = br#"{"step": 420}"#.to_vec();

    let sha = median(|| {
        let t = Instant::now();
        std::hint::black_box(Sha256::digest(&weights));
        t.elapsed()
    });
    report("sha256 in memory", sha);

    let raw = work.path().join("raw.bin");
    let raw_write = median(|| {
        let t = Instant::now();
        let mut f = File::create(&raw).unwrap();
        for chunk in weights.chunks(CHUNK) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
        t.elapsed()
    });
    report("raw write + fsync", raw_write);
    let raw_read_cold = median(|| {
        drop_cache(&raw);
        timed_read(&raw)
    });
    report("raw read (cold)", raw_read_cold);
    let raw_read_warm = median(|| timed_read(&raw));
    report("raw read (warm)", raw_read_warm);
    fs::remove_file(&raw).unwrap();

    let state_dir = work.path().join("state");
    let (mut store, _) = CheckpointStore::open(
        &state_dir,
        RetentionPolicy {
            keep_last: 1,
            mirror_dir: None,
        },
    )
    .unwrap();
    let mut step = 0;
    let save = median(|| {
        step += 1;
        let t = Instant::now();
        let model = &weights;
        store
            .save(
                step,
                vec![
                    (
                        "model.safetensors",
                        FileSource::Writer(Box::new(move |w: &mut dyn Write| {
                            model.chunks(CHUNK).try_for_each(|c| w.write_all(c))
                        })),
                    ),
                    ("config.json", FileSource::Bytes(&config)),
                    ("state.json", FileSource::Bytes(&state)),
                ],
            )
            .unwrap();
        t.elapsed()
    });
    report("store.save (hash + fsync + rename)", save);
    let model_path = state_dir
        .join("checkpoints")
        .join(dreamloop::checkpoint::step_dir_name(step))
        .join("model.safetensors");
    let load_cold = median(|| {
        drop_cache(&model_path);
        let t = Instant::now();
        store.load(step).unwrap();
        t.elapsed()
    });
    report("store.load verify (cold)", load_cold);
    let load_warm = median(|| {
        let t = Instant::now();
        store.load(step).unwrap();
        t.elapsed()
    });
    report("store.load verify (warm)", load_warm);
    let (_, size) = hash_file(&model_path).unwrap();
    assert_eq!(size as usize, WEIGHTS_BYTES);
}

/// Reads `path` sequentially and returns the time taken.
fn timed_read(path: &Path) -> Duration {
    let t = Instant::now();
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; CHUNK];
    while f.read(&mut buf).unwrap() > 0 {}
    t.elapsed()
}

/// Evicts `path`'s (clean, already fsynced) pages from the page cache.
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: a plain advisory syscall on a file descriptor that outlives the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise failed on {}", path.display());
}

/// Median of `REPS` timings.
fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..REPS).map(|_| f()).collect();
    times.sort();
    times[REPS / 2]
}

fn report(what: &str, took: Duration) {
    let secs = took.as_secs_f64();
    println!(
        "| {what:<36} | {secs:>7.3} s | {:>7.0} MB/s |",
        WEIGHTS_BYTES as f64 / secs / 1e6
    );
}

/// Random-looking bytes (xorshift64), so nothing compresses or dedups.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
