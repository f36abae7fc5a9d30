//! Extra host memory of a streaming save (issue 13, item 7): a 2.6 GB f32 model (a
//! Llama shape, random weights) saved as sharded safetensors into a plain directory and
//! into a checkpoint being written (hashed on the way), each in a child process whose peak
//! RSS is reset just before the save, so the figure is what the save alone added. Beside
//! them, what gathering every tensor on the host at once (the save before streaming) holds.
//!
//! Run: `cargo bench -p dreamloop --bench save_memory --profile dev`. Set
//! `DREAMLOOP_BENCH_DIR` to write on another disk (default: the system temp directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::tensor::DType;
use dreamloop::checkpoint::{CheckpointStore, FileSource, RetentionPolicy};
use dreamloop::model::config::ModelConfig;
use dreamloop::model::preset::DeviceInit;
use dreamloop::model::{cpu, save_into, CausalLm, ModelFiles};
use dreamloop::sink::DirSink;

const MODES: [&str; 3] = ["dir", "checkpoint", "gather"];

/// 645 M parameters: 2.58 GB in f32.
fn shape() -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 10, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 4096
    });
    ModelConfig::from_json(raw, "2.6 GB llama shape").expect("valid shape")
}

/// Shards of 1 GB instead of transformers' 5 GB ([`dreamloop::model::weights::MAX_SHARD_BYTES`]),
/// so that this save is sharded with an index, as a 54 GB one is.
const SHARD_BYTES: u64 = 1_000_000_000;

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn child(mode: &str, out: &Path) {
    let cfg = shape();
    let device = cpu();
    let lm = CausalLm::load(
        &cfg,
        &mut DeviceInit {
            std: 0.02,
            device,
            dtype: DType::F32,
            zero_centred_norms: false,
        },
    )
    .expect("random weights");
    let dtypes = Default::default();
    let parts = ModelFiles {
        config: &cfg,
        lm: &lm,
        dtypes: &dtypes,
        tokenizer: None,
        extra_files: &[],
        origin: None,
    };
    let largest: u64 = 32000 * 2048 * 4;
    // Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kb("VmRSS:");
    let started = Instant::now();
    let bytes: u64 = match mode {
        "dir" => {
            let mut sink = DirSink::create(out).expect("output directory");
            save_into(&mut sink, &parts, SHARD_BYTES).expect("save");
            dir_bytes(out)
        }
        "checkpoint" => {
            let retention = RetentionPolicy {
                keep_last: 1,
                mirror_dir: None,
            };
            let (mut store, _) = CheckpointStore::open(out, retention).expect("store");
            let mut pending = store.begin(1).expect("begin");
            save_into(&mut pending, &parts, SHARD_BYTES).expect("save");
            pending
                .add("state.json", FileSource::Bytes(b"{}"))
                .expect("state");
            let saved = store.commit(pending).expect("commit");
            saved.checkpoint.manifest.files.iter().map(|f| f.size).sum()
        }
        "gather" => {
            let all = lm.checkpoint_tensors();
            all.iter().map(|(_, d)| d.as_bytes().len() as u64).sum()
        }
        other => panic!("unknown mode {other}"),
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM:");
    println!(
        "RESULT {mode} {} {} {} {seconds:.2} {}",
        before * 1024,
        peak * 1024,
        bytes,
        largest
    );
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

fn main() {
    if let Ok(mode) = std::env::var("DREAMLOOP_SAVE_MEMORY_CHILD") {
        let out = PathBuf::from(std::env::var("DREAMLOOP_SAVE_MEMORY_OUT").expect("out"));
        child(&mode, &out);
        return;
    }
    let base = std::env::var_os("DREAMLOOP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let exe = std::env::current_exe().expect("own path");
    println!("mode        rss before    peak rss    extra       written     seconds  (largest tensor 262 MB)");
    for mode in MODES {
        let work = tempfile::Builder::new()
            .prefix("dreamloop-save-")
            .tempdir_in(&base)
            .expect("scratch directory");
        let out = Command::new(&exe)
            .env("DREAMLOOP_SAVE_MEMORY_CHILD", mode)
            .env("DREAMLOOP_SAVE_MEMORY_OUT", work.path().join("out"))
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find(|l| l.starts_with("RESULT ")) else {
            panic!(
                "{mode}: no result\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<f64>().expect("number");
        println!(
            "{mode:<11} {:>8.3} GB  {:>8.3} GB  {:>8.3} GB  {:>8.3} GB  {:>7}",
            num(2) / 1e9,
            num(3) / 1e9,
            (num(3) - num(2)) / 1e9,
            num(4) / 1e9,
            f[5]
        );
    }
}
