//! Saves of large models (issue 13, item 7): weights streamed tensor by tensor into sharded
//! safetensors with transformers' index, written straight into the checkpoint being made
//! (hashed on the way, no staging copy), and the step-0 baseline of an unmodified model
//! linked, not copied.
//!
//! The references are the fixture files transformers wrote (`tests/fixtures/models/*`): a
//! sharded save must hold exactly their tensors, byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use dreamloop::checkpoint::{CheckpointStore, FileSource, RetentionPolicy};
use dreamloop::model::weights::WeightsDigest;
use dreamloop::model::{cpu, save_into, Model, ModelFiles, WeightOrigin};
use dreamloop::sink::DirSink;
use dreamloop::train::optim::{AdamWConfig, OptimizerConfig};
use dreamloop::train::reference::Reference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, SftItem, Trainer, TrainerConfig};
use safetensors::SafeTensors;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models");

/// Every tensor of the weight files of `dir` (single or sharded): name → (dtype, shape,
/// bytes), read with the safetensors crate alone.
fn tensors_on_disk(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut all = BTreeMap::new();
    for path in files {
        let bytes = fs::read(&path).unwrap();
        let parsed = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in parsed.tensors() {
            let entry = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            assert!(all.insert(name.clone(), entry).is_none(), "{name} twice");
        }
    }
    all
}

/// Everything of `model` a save writes, with `origin` as the files it may link.
fn files_of<'a>(model: &'a Model, origin: Option<&'a WeightOrigin>) -> ModelFiles<'a> {
    ModelFiles {
        config: &model.config,
        lm: &model.lm,
        dtypes: &model.dtypes,
        tokenizer: model.tokenizer.as_ref(),
        extra_files: &model.extra_files,
        origin,
    }
}

/// A copy of a fixture model directory in `into` (so its files can be linked and watched).
fn copy_fixture(name: &str, into: &Path) -> std::path::PathBuf {
    let dir = into.join(name);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(Path::new(FIXTURES).join(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn a_sharded_save_holds_transformers_tensors_byte_for_byte_with_its_index() {
    for fixture in ["llama_untied", "qwen3_5"] {
        let source = Path::new(FIXTURES).join(fixture);
        let model = Model::load(&source, &cpu()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let max_shard: u64 = 40_000;
        let mut sink = DirSink::create(out.path()).unwrap();
        save_into(&mut sink, &files_of(&model, None), max_shard).unwrap();

        let reference = tensors_on_disk(&source);
        let saved = tensors_on_disk(out.path());
        assert_eq!(
            saved.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{fixture}: the same tensor names"
        );
        for (name, want) in &reference {
            assert!(
                saved[name] == *want,
                "{fixture}: {name} differs from transformers'"
            );
        }

        // transformers' layout: no single file, numbered shards, and the index.
        assert!(!out.path().join("model.safetensors").exists());
        let index: serde_json::Value = serde_json::from_slice(
            &fs::read(out.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let weight_map = index["weight_map"].as_object().unwrap();
        let shards: std::collections::BTreeSet<&str> =
            weight_map.values().map(|v| v.as_str().unwrap()).collect();
        let n = shards.len();
        assert!(n >= 3, "{fixture}: {n} shards at {max_shard} bytes");
        for (i, shard) in shards.iter().enumerate() {
            assert_eq!(*shard, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
            let size = fs::metadata(out.path().join(shard)).unwrap().len();
            let in_shard: Vec<_> = weight_map
                .iter()
                .filter(|(_, f)| f.as_str() == Some(*shard))
                .map(|(t, _)| t)
                .collect();
            // A shard over the limit holds one tensor that alone exceeds it.
            let data: u64 = in_shard
                .iter()
                .map(|t| reference[t.as_str()].2.len() as u64)
                .sum();
            assert!(
                data <= max_shard || in_shard.len() == 1,
                "{fixture}: {shard} holds {data} bytes in {} tensors",
                in_shard.len()
            );
            assert!(size > data, "{shard}: header and data");
        }
        let total: u64 = reference.values().map(|t| t.2.len() as u64).sum();
        assert_eq!(index["metadata"]["total_size"], total, "{fixture}");
        for (name, file) in weight_map {
            let bytes = fs::read(out.path().join(file.as_str().unwrap())).unwrap();
            let parsed = SafeTensors::deserialize(&bytes).unwrap();
            assert!(parsed.tensor(name).is_ok(), "{name} is in {file}");
        }

        // It loads back, and the layout-free digest agrees with the source's.
        let reloaded = Model::load(out.path(), &cpu()).unwrap();
        let again = tempfile::tempdir().unwrap();
        reloaded.save(again.path()).unwrap();
        assert_eq!(
            WeightsDigest::of_dir(again.path()).unwrap(),
            WeightsDigest::of_dir(&source).unwrap(),
            "{fixture}"
        );
        assert_eq!(
            WeightsDigest::of_dir(out.path()).unwrap(),
            WeightsDigest::of_dir(&source).unwrap(),
            "{fixture}"
        );
    }
}

fn trainer_settings() -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Adamw(AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        }),
        schedule: LrSchedule::warmup_constant(1e-3, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: Default::default(),
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute: false,
        logits_chunk: 0,
    }
}

fn one_batch() -> Batch {
    Batch {
        sft: vec![SftItem {
            prompt: vec![5, 6, 7],
            completion: vec![8, 9],
            hash: 42,
        }],
        ..Batch::default()
    }
}

#[test]
fn a_checkpoint_links_unchanged_weights_and_streams_trained_ones_into_place() {
    let work = tempfile::tempdir().unwrap();
    let base = copy_fixture("llama_untied", work.path());
    let base_weights = base.join("model.safetensors");
    let device = cpu().autodiff();
    let model = Model::load(&base, &device).unwrap();
    assert!(model.origin.is_some());
    let mut trainer = Trainer::with_reference(
        model.config,
        model.lm,
        Reference::Absent,
        trainer_settings(),
    )
    .unwrap()
    .with_files(model.dtypes, model.tokenizer.as_ref())
    .with_origin(model.origin);

    let state = work.path().join("state");
    let retention = RetentionPolicy {
        keep_last: 3,
        mirror_dir: None,
    };
    let (mut store, _) = CheckpointStore::open(&state, retention).unwrap();
    let save = |store: &mut CheckpointStore, trainer: &Trainer, step: u64| {
        let mut pending = store.begin(step).unwrap();
        trainer.save_into(&mut pending).unwrap();
        pending.add("state.json", FileSource::Bytes(b"{}")).unwrap();
        store.commit(pending).unwrap().checkpoint
    };

    // Step 0: the base model's file itself, linked (the same inode), and a valid manifest.
    let step0 = save(&mut store, &trainer, 0);
    let linked = step0.file("model.safetensors");
    assert_eq!(
        fs::metadata(&linked).unwrap().ino(),
        fs::metadata(&base_weights).unwrap().ino(),
        "the step-0 weights are a link to the base model's"
    );
    let (sha, size) = dreamloop::checkpoint::hash_file(&base_weights).unwrap();
    let entry = step0
        .manifest
        .files
        .iter()
        .find(|f| f.name == "model.safetensors")
        .unwrap();
    assert_eq!((entry.sha256.as_str(), entry.size), (sha.as_str(), size));
    store.load(0).expect("step 0 verifies against its manifest");
    assert_eq!(
        trainer.weights_digest().unwrap(),
        WeightsDigest::of_dir(&base).unwrap()
    );

    // A step changes the weights: the next save writes them, and the base is untouched.
    trainer.step(&one_batch()).unwrap();
    let step1 = save(&mut store, &trainer, 1);
    let written = step1.file("model.safetensors");
    assert_ne!(
        fs::metadata(&written).unwrap().ino(),
        fs::metadata(&base_weights).unwrap().ino()
    );
    assert_ne!(
        fs::read(&written).unwrap(),
        fs::read(&base_weights).unwrap()
    );
    assert_eq!(
        dreamloop::checkpoint::hash_file(&base_weights).unwrap().0,
        sha
    );
    store.load(1).expect("step 1 verifies against its manifest");
    assert_eq!(
        trainer.weights_digest().unwrap(),
        WeightsDigest::of_dir(&step1.path).unwrap()
    );
    // Nothing else was written beside the checkpoints: no staging, no temporary directory.
    let names: Vec<String> = fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");

    // The saved step resumes with the weights it holds.
    let restored = Trainer::restore(&step1.path, Reference::Absent, &device).unwrap();
    assert_eq!(
        restored.weights_digest().unwrap(),
        trainer.weights_digest().unwrap()
    );
}

#[test]
fn a_failed_write_into_a_pending_checkpoint_leaves_the_store_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let retention = RetentionPolicy {
        keep_last: 3,
        mirror_dir: None,
    };
    let (mut store, _) = CheckpointStore::open(work.path(), retention).unwrap();
    store
        .save(1, vec![("state.json", FileSource::Bytes(b"{}"))])
        .unwrap();
    let mut pending = store.begin(2).unwrap();
    use dreamloop::sink::FileSink;
    let err = pending
        .put("model.safetensors", &mut |out| {
            out.write_all(b"half a tensor")?;
            Err(std::io::Error::other("device read failed"))
        })
        .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    store.abandon(pending);
    assert_eq!(store.latest(), Some(1));
    let names: Vec<String> = fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "step-00000001 and LATEST only: {names:?}");
    // A name the manifest reserves, or one given twice, is refused.
    let mut pending = store.begin(3).unwrap();
    assert!(pending
        .add("MANIFEST.json", FileSource::Bytes(b"{}"))
        .is_err());
    pending.add("a.json", FileSource::Bytes(b"{}")).unwrap();
    assert!(pending.add("a.json", FileSource::Bytes(b"{}")).is_err());
    store.commit(pending).unwrap();
    assert_eq!(store.latest(), Some(3));
}

/// Weight files rewritten after the model was read no longer hold its weights: the save
/// writes them instead of linking.
#[test]
fn weight_files_changed_since_the_load_are_not_linked() {
    let work = tempfile::tempdir().unwrap();
    let base = copy_fixture("llama_untied", work.path());
    let base_weights = base.join("model.safetensors");
    let model = Model::load(&base, &cpu()).unwrap();
    fs::File::options()
        .write(true)
        .open(&base_weights)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    let out = work.path().join("out");
    let mut sink = DirSink::create(&out).unwrap();
    save_into(
        &mut sink,
        &files_of(&model, model.origin.as_ref()),
        u64::MAX,
    )
    .unwrap();
    let saved = out.join("model.safetensors");
    assert_ne!(
        fs::metadata(&saved).unwrap().ino(),
        fs::metadata(&base_weights).unwrap().ino(),
        "written, not linked"
    );
    assert_eq!(
        WeightsDigest::of_dir(&out).unwrap(),
        WeightsDigest::of_dir(&base).unwrap()
    );
}
