//! Models: a Hugging Face directory (or a GGUF file, or an embedded preset) in, a Hugging
//! Face directory out.
//!
//! [`Model`] bundles what a checkpoint directory holds — the parsed `config.json`, the
//! decoder weights, the tokenizer and chat template — and remembers each tensor's disk
//! dtype so that [`Model::save`] writes back exactly what was read.
//!
//! Devices: burn 0.22 picks the backend at run time from the [`Device`]. [`cpu`] is the
//! flex backend; [`Precision`] says whether the weights live on it in f32 or bf16 (the `_as`
//! constructors); [`Device::autodiff`] wraps any device for training. Forward-only
//! passes (reference model, probes) must use weights *without* autodiff
//! (`model.valid()`), or burn keeps the graph alive.

pub mod config;
pub mod gdn;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod logprobs;
pub mod moe;
pub mod preset;
pub mod tokenizer;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::DType;
pub use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::sink::{put_bytes, DirSink, FileSink};

pub use config::{ConfigError, Family, ModelConfig, RopeScaling};
pub use llama::CausalLm;
pub use tokenizer::{ChatMessage, Tokenizer, TokenizerError};
pub use weights::{DiskDtype, WeightError};

/// The dtype a model's weights live in on the device (`[model] dtype`, `--dtype`).
///
/// In bf16 the activations between layers are bf16 too, and the numerically sensitive
/// parts run in f32 where transformers upcasts (RMSNorm, rotary tables, softmax, the Gated
/// DeltaNet gates and delta rule, the router, the logits): see `llama.rs` and `gdn.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (bit-identical to the code before bf16 existed).
    #[default]
    F32,
    /// Weights and activations in bf16, f32 where transformers upcasts.
    Bf16,
}

impl Precision {
    /// The burn dtype of the weights.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown dtype `{other}` (known: f32, bf16)")),
        }
    }
}

/// The CPU device (burn's `flex` backend).
pub fn cpu() -> Device {
    Device::flex()
}

/// The default device of this build: CUDA when built with `--features cuda` (or whatever
/// `BURN_DEVICE` names), the flex CPU backend otherwise.
pub fn default_device() -> Device {
    Device::default()
}

/// Why a model directory could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("unknown preset `{0}` (known: {known})", known = preset::PRESETS.join(", "))]
    UnknownPreset(String),
}

/// Refuses a `config.json` whose layer count or embedding shape the weight files do not
/// hold, before the model is allocated from it (a config claiming 64 layers over a 2-layer
/// checkpoint would otherwise allocate all 64 and only then miss a tensor).
fn check_shapes_against_weights(
    config: &ModelConfig,
    config_path: &Path,
    source: &weights::SafetensorsSource,
) -> Result<(), ConfigError> {
    let invalid = |field: &str, reason: String| ConfigError::Invalid {
        path: config_path.display().to_string(),
        field: field.into(),
        reason,
    };
    let layers_prefix = format!("{}layers.", config.text_prefix);
    let present = source
        .names()
        .filter_map(|n| {
            n.strip_prefix(&layers_prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    // More layers than the files hold is the allocation hazard; fewer is reported by the
    // load itself, naming the first unused tensor.
    if config.num_hidden_layers > present {
        return Err(invalid(
            "num_hidden_layers",
            format!(
                "{} layers, but the weight files hold {present} ({layers_prefix}0..)",
                config.num_hidden_layers
            ),
        ));
    }
    let embed = format!("{}embed_tokens.weight", config.text_prefix);
    if let Some(shape) = source.shape(&embed) {
        if shape != [config.vocab_size, config.hidden_size] {
            return Err(invalid(
                "vocab_size",
                format!(
                    "vocab_size {} × hidden_size {}, but {embed} is {shape:?} in the weight files",
                    config.vocab_size, config.hidden_size
                ),
            ));
        }
    }
    Ok(())
}

/// A loaded checkpoint: config, weights, tokenizer.
pub struct Model {
    pub config: ModelConfig,
    pub lm: CausalLm,
    /// Absent for bare weight directories (the shared test fixtures have none).
    pub tokenizer: Option<Tokenizer>,
    /// Disk dtype per tensor, so a save writes bf16 back as bf16.
    pub dtypes: HashMap<String, DiskDtype>,
    /// Other small files of the directory copied through on save (generation_config.json).
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// The weight files these weights were read from, unmodified so far (`None` for a
    /// preset or a GGUF file): a save of unchanged weights links them instead of writing.
    pub origin: Option<WeightOrigin>,
}

/// Weight files on disk that hold exactly a model's weights (see [`save_into`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightOrigin {
    /// Their directory.
    pub dir: PathBuf,
    /// `model.safetensors`, or the shards and `model.safetensors.index.json`.
    pub files: Vec<String>,
    /// Each file's size and modification time when the weights were read: a file replaced
    /// or rewritten since no longer holds them, and is not linked.
    stamps: Vec<(u64, Option<std::time::SystemTime>)>,
}

impl WeightOrigin {
    /// The weight files of the Hugging Face directory `dir`, if it has any, as they are now.
    pub fn of_dir(dir: &Path) -> Result<Option<WeightOrigin>, ModelError> {
        let Some(files) = weights::weight_files(dir)? else {
            return Ok(None);
        };
        let stamps = files
            .iter()
            .map(|name| Self::stamp(&dir.join(name)))
            .collect::<Result<_, _>>()?;
        Ok(Some(WeightOrigin {
            dir: dir.to_path_buf(),
            files,
            stamps,
        }))
    }

    fn stamp(path: &Path) -> Result<(u64, Option<std::time::SystemTime>), ModelError> {
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok((meta.len(), meta.modified().ok()))
    }

    /// Whether every file still has the size and modification time it had when read.
    pub fn unchanged(&self) -> bool {
        self.files
            .iter()
            .zip(&self.stamps)
            .all(|(name, stamp)| Self::stamp(&self.dir.join(name)).ok().as_ref() == Some(stamp))
    }
}

impl Model {
    /// Loads a Hugging Face directory onto `device` in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_as(dir, device, Precision::F32)
    }

    /// Loads a Hugging Face directory onto `device` in `precision`, each tensor decoded from
    /// the file's bytes straight into that dtype.
    pub fn load_as(dir: &Path, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let mut source = weights::SafetensorsSource::open_as(dir, device, precision.dtype())?;
        check_shapes_against_weights(&config, &config_path, &source)?;
        let mut text = weights::TextSource {
            inner: &mut source,
            layout: weights::CheckpointLayout {
                text_prefix: (config.text_prefix != "model.").then(|| config.text_prefix.clone()),
                passthrough: Vec::new(),
            },
        };
        let mut lm = CausalLm::load(&config, &mut text)?;
        lm.layout = std::sync::Arc::new(text.layout);
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            None
        };
        let mut extra_files = Vec::new();
        for name in ["generation_config.json", "special_tokens_map.json"] {
            if let Ok(bytes) = std::fs::read(dir.join(name)) {
                extra_files.push((name.to_string(), bytes));
            }
        }
        Ok(Model {
            config,
            lm,
            tokenizer,
            // Keyed by disk name; saving maps each parameter to its disk name the same way.
            dtypes: source.dtypes,
            extra_files,
            origin: WeightOrigin::of_dir(dir)?,
        })
    }

    /// An embedded preset (`tiny`), with weights drawn from `seed`, in f32.
    pub fn preset(name: &str, seed: u64, device: &Device) -> Result<Self, ModelError> {
        Self::preset_as(name, seed, device, Precision::F32)
    }

    /// An embedded preset in `precision` (drawn in f32, rounded to nearest per tensor).
    pub fn preset_as(
        name: &str,
        seed: u64,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let raw =
            preset::preset_config(name).ok_or_else(|| ModelError::UnknownPreset(name.into()))?;
        let std = raw["initializer_range"].as_f64().unwrap_or(0.02);
        let config = ModelConfig::from_json(raw, &format!("preset `{name}`"))?;
        let mut init = preset::SeededInit {
            seed,
            std,
            device: device.clone(),
            zero_centred_norms: config.norm_unit_offset,
        };
        let lm = CausalLm::load(
            &config,
            &mut weights::CastSource {
                inner: &mut init,
                dtype: precision.dtype(),
            },
        )?;
        let json = serde_json::to_vec_pretty(&preset::byte_tokenizer_json())
            .expect("a JSON value serialises");
        let mut tokenizer =
            Tokenizer::from_json_bytes(&json, Path::new("<preset tokenizer.json>"))?;
        tokenizer.chat_template = Some(preset::CHATML_TEMPLATE.into());
        tokenizer.bos_token = Some("<|im_start|>".into());
        tokenizer.eos_token = Some("<|im_end|>".into());
        let config_json = serde_json::to_vec_pretty(&preset::byte_tokenizer_config())
            .expect("a JSON value serialises");
        tokenizer
            .files
            .push(("tokenizer_config.json".into(), config_json));
        Ok(Model {
            config,
            lm,
            tokenizer: Some(tokenizer),
            dtypes: HashMap::new(),
            extra_files: Vec::new(),
            origin: None,
        })
    }

    /// Loads a GGUF `llama` file directly (dequantised to f32, Q/K rows in HF order): the
    /// same config, weights and tokenizer files as `dreamloop import-gguf` followed by
    /// [`Model::load`] of its output, without writing the directory.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::from_gguf_as(path, device, Precision::F32)
    }

    /// [`from_gguf`](Self::from_gguf) in `precision` (dequantised per tensor, then rounded).
    pub fn from_gguf_as(
        path: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let mut source = gguf::GgufSource::open(path, device)?;
        let config = ModelConfig::from_json(
            source.params.hf_config(),
            &format!("{} (GGUF metadata)", path.display()),
        )?;
        let lm = CausalLm::load(
            &config,
            &mut weights::CastSource {
                inner: &mut source,
                dtype: precision.dtype(),
            },
        )?;
        let hf = &source.tokenizer;
        let json = serde_json::to_vec(&hf.tokenizer_json).expect("a JSON value serialises");
        let mut tokenizer = Tokenizer::from_json_bytes(&json, path)?;
        let special = |field: &str| hf.tokenizer_config[field].as_str().map(String::from);
        tokenizer.bos_token = special("bos_token");
        tokenizer.eos_token = special("eos_token");
        tokenizer.chat_template = hf.chat_template.clone();
        // The files an import writes, so saving this model gives the same directory.
        let pretty = |v: &serde_json::Value| {
            let mut out = serde_json::to_vec_pretty(v).expect("a JSON value serialises");
            out.push(b'\n');
            out
        };
        tokenizer
            .files
            .push(("tokenizer_config.json".into(), pretty(&hf.tokenizer_config)));
        if let Some(template) = &hf.chat_template {
            tokenizer
                .files
                .push(("chat_template.jinja".into(), template.clone().into_bytes()));
        }
        let extra_files = vec![(
            "generation_config.json".to_string(),
            pretty(&source.params.hf_generation_config()),
        )];
        Ok(Model {
            config,
            lm,
            tokenizer: Some(tokenizer),
            dtypes: HashMap::new(),
            extra_files,
            origin: None,
        })
    }

    /// Loads `spec`: a preset name (`tiny`), a `.gguf` file, or a directory path, in f32.
    pub fn open(spec: &str, device: &Device) -> Result<Self, ModelError> {
        Self::open_as(spec, device, Precision::F32)
    }

    /// Loads `spec` in `precision`.
    pub fn open_as(spec: &str, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let path = Path::new(spec);
        if preset::PRESETS.contains(&spec) && !path.is_dir() {
            Self::preset_as(spec, 0, device, precision)
        } else if path.is_file() || spec.to_ascii_lowercase().ends_with(".gguf") {
            Self::from_gguf_as(path, device, precision)
        } else {
            Self::load_as(path, device, precision)
        }
    }

    /// Only the architecture of `spec` (a preset, a `.gguf` file or a directory), without
    /// reading any weight: a directory needs nothing but its `config.json`, a GGUF file only
    /// its header. What `dreamloop plan` and `run`'s start-up check read.
    pub fn config_of(spec: &str) -> Result<ModelConfig, ModelError> {
        let path = Path::new(spec);
        if preset::PRESETS.contains(&spec) && !path.is_dir() {
            let raw = preset::preset_config(spec)
                .ok_or_else(|| ModelError::UnknownPreset(spec.into()))?;
            Ok(ModelConfig::from_json(raw, &format!("preset `{spec}`"))?)
        } else if path.is_file() || spec.to_ascii_lowercase().ends_with(".gguf") {
            let source = gguf::GgufSource::open(path, &cpu())?;
            Ok(ModelConfig::from_json(
                source.params.hf_config(),
                &format!("{} (GGUF metadata)", path.display()),
            )?)
        } else {
            Ok(ModelConfig::from_file(&path.join("config.json"))?)
        }
    }

    /// Writes a Hugging Face directory: `config.json` (as read), `model.safetensors` with the
    /// checkpoint's names, shapes and dtypes (sharded beyond [`weights::MAX_SHARD_BYTES`]),
    /// and the tokenizer files.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        save_dir(
            dir,
            &self.config,
            &self.lm,
            &self.dtypes,
            self.tokenizer.as_ref(),
            &self.extra_files,
        )
    }

    /// A copy of the weights without autodiff, for forward-only passes.
    pub fn frozen(&self) -> CausalLm {
        self.lm.valid()
    }
}

/// Writes a model directory from its parts into `dir` (see [`save_into`]).
pub fn save_dir(
    dir: &Path,
    config: &ModelConfig,
    lm: &CausalLm,
    dtypes: &HashMap<String, DiskDtype>,
    tokenizer: Option<&Tokenizer>,
    extra_files: &[(String, Vec<u8>)],
) -> Result<(), ModelError> {
    let mut sink = DirSink::create(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let parts = ModelFiles {
        config,
        lm,
        dtypes,
        tokenizer,
        extra_files,
        origin: None,
    };
    save_into(&mut sink, &parts, weights::MAX_SHARD_BYTES)
}

/// What a saved model directory is made of (the trainer saves its own weights this way).
pub struct ModelFiles<'a> {
    pub config: &'a ModelConfig,
    pub lm: &'a CausalLm,
    /// Disk dtype per tensor.
    pub dtypes: &'a HashMap<String, DiskDtype>,
    pub tokenizer: Option<&'a Tokenizer>,
    pub extra_files: &'a [(String, Vec<u8>)],
    /// Files holding exactly `lm`'s weights, if the caller knows them unmodified.
    pub origin: Option<&'a WeightOrigin>,
}

/// Writes a Hugging Face directory into `sink`: `config.json`, the weights streamed one
/// tensor at a time (one file, or shards of `max_shard_bytes` with their index), the
/// tokenizer and the extra files.
///
/// With an `origin` whose files hold these weights in the dtypes a save would write, the
/// weight files are put in as they are (hard links where the filesystem allows): the
/// step-0 checkpoint of a 54 GB model costs no copy. If a file of the origin is gone, the
/// weights are written after all.
pub fn save_into(
    sink: &mut dyn FileSink,
    parts: &ModelFiles<'_>,
    max_shard_bytes: u64,
) -> Result<(), ModelError> {
    let io = |name: &str| {
        let path = PathBuf::from(name);
        move |source| ModelError::Io { path, source }
    };
    let config_json =
        serde_json::to_vec_pretty(&parts.config.raw).expect("a JSON value serialises");
    put_bytes(sink, "config.json", &config_json).map_err(io("config.json"))?;
    let tensors = parts.lm.outgoing(parts.dtypes);
    let linked = match parts.origin {
        Some(origin) if weights::unconverted(&tensors, parts.dtypes) => link_origin(sink, origin),
        _ => false,
    };
    if !linked {
        weights::save_weights(sink, &tensors, max_shard_bytes)?;
    }
    let tokenizer_files = parts.tokenizer.map(|t| t.files.as_slice()).unwrap_or(&[]);
    for (name, bytes) in tokenizer_files.iter().chain(parts.extra_files) {
        put_bytes(sink, name, bytes).map_err(io(name))?;
    }
    Ok(())
}

/// Puts every weight file of `origin` into `sink` as it is; false (after a warning) when the
/// files changed since they were read or one cannot be put, so the caller writes the weights
/// instead. After a failure part-way (the copy fallback failed too, e.g. a full disk), a
/// directory gets the earlier files overwritten by that write; a checkpoint refuses the
/// repeated names and its save fails, to be abandoned.
fn link_origin(sink: &mut dyn FileSink, origin: &WeightOrigin) -> bool {
    if !origin.unchanged() {
        tracing::warn!(dir = %origin.dir.display(), "The weight files changed since they were read; writing the weights.");
        return false;
    }
    for name in &origin.files {
        let from = origin.dir.join(name);
        if let Err(e) = sink.put_existing(name, &from) {
            tracing::warn!(error = %e, "The unchanged weight files could not be linked; writing them.");
            return false;
        }
    }
    true
}

/// Counts a module's float parameters.
pub fn parameter_count<M: Module>(module: &M) -> usize {
    module.num_params()
}
