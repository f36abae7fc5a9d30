//! Optimizers for the online trainer: AdamW with PyTorch semantics ([`adamw`]) and
//! APOLLO / APOLLO-Mini ([`apollo`]), driven over a whole model by [`ModelOptimizer`].
//!
//! Each per-tensor algorithm is a burn [`Optimizer`] with a hand-written
//! [`RecordState`](burn::optim::RecordState). The model-level driver is ours rather than burn's
//! `ModuleOptimizer` for one reason: burn keys optimizer state by `ParamId`, which is generated
//! afresh whenever a model is rebuilt from safetensors, so a restarted daemon would silently
//! start from empty moments. [`ModelOptimizer`] keys state by parameter *name* (the module path,
//! or a name the caller supplies per `ParamId`), which is also what APOLLO needs to derive each
//! projection's seed. State is saved as a burnpack file (`optimizer.bpk`, see [`ModelOptimizer::save`]).
//!
//! # Devices (burn 0.22)
//!
//! burn 0.22 has no backend generics: the backend is picked by the `Device` value.
//! - CPU inference / plain tensors: `let device = burn::tensor::Device::flex();`
//!   (`Device::default()` is the same device in a CPU-only build).
//! - Training: `let device = Device::flex().autodiff();` — tensors created on it record a graph;
//!   `loss.backward()` gives `Gradients`, and `GradientsParams::from_grads(grads, &model)` the
//!   per-parameter gradients (on the inner, non-autodiff device).
//! - Tensors: `Tensor::<2>::from_data(TensorData::new(vec, [rows, cols]), &device)`;
//!   read back with `tensor.into_data().try_to_vec::<f32>()`.
//! - [`ModelOptimizer::step`] updates on the inner device and re-attaches autodiff (with the
//!   parameter's `require_grad` and checkpointing strategy) only to parameters that had it.
//! - [`ModelOptimizer::load`] takes the device for the restored state; a later step moves state
//!   to each gradient's device anyway.
//!
//! # bf16 parameters
//!
//! A bf16 parameter (a model loaded with `Precision::Bf16`) is updated in f32: the parameter
//! and its bf16 gradient are widened, the per-tensor optimizer runs exactly as for an f32
//! parameter (so its state — AdamW's moments, APOLLO's projected moments — is f32), and the new
//! value is written back with stochastic rounding ([`rounding`]). The rounding's seed and step
//! counter are saved with the state, so resuming is bit-identical. f32 parameters never touch
//! any of this.

pub mod adamw;
pub mod apollo;
pub mod rounding;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{DynState, GradientsParams, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Bytes, DType, Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use adamw::{AdamWConfig, AdamWState, TorchAdamW};
pub use apollo::{
    gaussian_projection, name_seed, next_seed, ApolloConfig, ApolloState, ApolloTensor,
    ApolloTrace, DenseMoments, ProjectedState, ScaleType, WeightLayout,
};
pub use rounding::Rounding;

/// Errors of the optimizers and their state files.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A hyper-parameter the algorithm cannot run with.
    #[error("optimizer config field `{field}`: {reason}")]
    InvalidConfig {
        /// Name of the offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A projection injected for a parameter has the wrong shape.
    #[error("injected projection {draw} for `{name}` has shape {found:?}, expected {expected:?}")]
    InjectedShape {
        /// Parameter name.
        name: String,
        /// Index of the draw the projection was meant for.
        draw: usize,
        /// The shape APOLLO needs.
        expected: Vec<usize>,
        /// The shape supplied.
        found: Vec<usize>,
    },
    /// Saved state does not fit the parameter it is applied to (another model, rank or layout).
    #[error("optimizer state of `{name}` does not fit the parameter of shape {dims:?}: {reason}")]
    StateMismatch {
        /// Parameter name.
        name: String,
        /// Shape of the parameter.
        dims: Vec<usize>,
        /// What does not match.
        reason: String,
    },
    /// The state file could not be written or read.
    #[error("optimizer state file {}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying burnpack or I/O error.
        message: String,
    },
    /// The state file was read but its content is not a valid state for this optimizer.
    #[error("optimizer state file {}: {field}: {reason}", path.display())]
    Corrupt {
        /// The file (empty for in-memory bytes).
        path: PathBuf,
        /// The entry (parameter name or metadata key) that is wrong.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which optimizer a run uses, as it appears in the run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW` semantics.
    Adamw(AdamWConfig),
    /// APOLLO or APOLLO-Mini (AdamW-like dense branch for unprojected tensors).
    Apollo(ApolloConfig),
}

impl OptimizerConfig {
    /// Short name written into state files (`"adamw"` / `"apollo"`).
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Adamw(_) => "adamw",
            Self::Apollo(_) => "apollo",
        }
    }

    /// Rejects values the algorithm cannot run with.
    pub fn validate(&self) -> Result<(), OptimError> {
        match self {
            Self::Adamw(c) => {
                for (field, beta) in [("beta1", c.beta1), ("beta2", c.beta2)] {
                    if !(0.0..1.0).contains(&beta) {
                        return Err(OptimError::InvalidConfig {
                            field,
                            reason: format!("must be in [0, 1), got {beta}"),
                        });
                    }
                }
                if !(c.eps.is_finite() && c.eps >= 0.0) {
                    return Err(OptimError::InvalidConfig {
                        field: "eps",
                        reason: format!("must be ≥ 0, got {}", c.eps),
                    });
                }
                Ok(())
            }
            Self::Apollo(c) => c.validate(),
        }
    }
}

/// Optimizer state bytes of one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamStateBytes {
    /// Parameter name.
    pub name: String,
    /// Parameter shape as stored.
    pub dims: Vec<usize>,
    /// Whether APOLLO projects it.
    pub projected: bool,
    /// Bytes of its optimizer state tensors (moments, projection, limiter norm).
    pub bytes: usize,
    /// Bytes torch's AdamW would hold for it (two f32 moments of the parameter's size).
    pub adamw_bytes: usize,
}

/// Optimizer state bytes of every parameter that has state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateBytes {
    /// One entry per parameter, sorted by name.
    pub params: Vec<ParamStateBytes>,
}

impl StateBytes {
    /// Bytes of all state.
    pub fn total(&self) -> usize {
        self.params.iter().map(|p| p.bytes).sum()
    }

    /// Bytes of the state of projected parameters.
    pub fn projected(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.projected)
            .map(|p| p.bytes)
            .sum()
    }

    /// Bytes AdamW would hold for the projected parameters.
    pub fn projected_adamw(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.projected)
            .map(|p| p.adamw_bytes)
            .sum()
    }
}

/// One parameter's state as the driver keeps it.
#[derive(Clone)]
struct Slot {
    /// The per-tensor state (`AdamWState<D>` or `ApolloState<D>`, rank `D` recorded inside).
    state: DynState,
    /// Parameter shape as stored, for state-size reports and fit checks after a load.
    dims: Vec<usize>,
    /// Bytes of the state tensors, computed when the state was produced.
    bytes: usize,
    /// Whether the state is on APOLLO's projected branch.
    projected: bool,
}

/// Optimizes every parameter of a burn module that has a gradient, keeping state by name.
#[derive(Clone)]
pub struct ModelOptimizer {
    /// The algorithm and its hyper-parameters.
    config: OptimizerConfig,
    /// APOLLO's config shared with the per-tensor optimizers (same as in `config`).
    apollo: Option<Arc<ApolloConfig>>,
    /// Names for parameters whose module path is not the name wanted (e.g. HF names).
    names: HashMap<ParamId, String>,
    /// State per parameter name.
    slots: BTreeMap<String, Slot>,
    /// Projections injected per parameter name, one per draw (tests).
    injected: HashMap<String, Arc<Vec<TensorData>>>,
    /// How f32 updates of bf16 parameters are written back.
    rounding: Rounding,
    /// Steps that rounded a bf16 parameter so far: the counter of the rounding noise.
    rounding_steps: u64,
}

impl std::fmt::Debug for ModelOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelOptimizer")
            .field("config", &self.config)
            .field("params_with_state", &self.slots.len())
            .finish()
    }
}

/// Metadata key holding the algorithm name in a state file.
const ALGORITHM_KEY: &str = "dreamloop.optimizer.algorithm";
/// Metadata key holding the JSON config in a state file (informational).
const CONFIG_KEY: &str = "dreamloop.optimizer.config";
/// Per-parameter scalar leaf holding the tensor rank.
const RANK_LEAF: &str = "__rank";
/// Per-parameter metadata leaf holding the JSON parameter shape.
const DIMS_LEAF: &str = "__dims";
/// Metadata key holding the JSON rounding mode and step counter (only once a bf16 parameter
/// was stepped, so f32 runs write the same files as before).
const ROUNDING_KEY: &str = "dreamloop.optimizer.rounding";

/// What [`ROUNDING_KEY`] holds.
#[derive(Serialize, Deserialize)]
struct RoundingRecord {
    rounding: Rounding,
    steps: u64,
}

impl ModelOptimizer {
    /// A driver for `config`, with no state yet.
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] for hyper-parameters the algorithm cannot run with.
    pub fn new(config: OptimizerConfig) -> Result<Self, OptimError> {
        config.validate()?;
        let apollo = match &config {
            OptimizerConfig::Apollo(c) => Some(Arc::new(c.clone())),
            OptimizerConfig::Adamw(_) => None,
        };
        Ok(Self {
            config,
            apollo,
            names: HashMap::new(),
            slots: BTreeMap::new(),
            injected: HashMap::new(),
            rounding: Rounding::default(),
            rounding_steps: 0,
        })
    }

    /// Uses `rounding` to write updates back into bf16 parameters (default: stochastic,
    /// [`rounding::DEFAULT_SEED`]). A state file loaded later brings its own.
    pub fn with_rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// The rounding of bf16 parameters and how many steps have used it.
    pub fn rounding(&self) -> (Rounding, u64) {
        (self.rounding, self.rounding_steps)
    }

    /// Uses `names[id]` instead of the module path as the name of parameter `id` (state key and
    /// APOLLO seed). Parameters missing from the map keep their module path.
    pub fn with_names(mut self, names: HashMap<ParamId, String>) -> Self {
        self.names = names;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Makes APOLLO use `projections[k]` as P for the k-th draw of parameter `name` (draws past
    /// the end of the list come from the seed chain). Shapes are checked at the next step.
    pub fn inject_projections(&mut self, name: &str, projections: Vec<TensorData>) {
        self.injected
            .insert(name.to_string(), Arc::new(projections));
    }

    /// Names of the parameters that have state.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// The AdamW state of parameter `name`, if this is an AdamW run and it has rank `D`.
    pub fn adamw_state<const D: usize>(&self, name: &str) -> Option<&AdamWState<D>> {
        let slot = self.slots.get(name)?;
        (matches!(self.config, OptimizerConfig::Adamw(_)) && slot.state.rank() == D)
            .then(|| slot.state.downcast_ref::<AdamWState<D>>())
    }

    /// The APOLLO state of parameter `name`, if this is an APOLLO run and it has rank `D`.
    pub fn apollo_state<const D: usize>(&self, name: &str) -> Option<&ApolloState<D>> {
        let slot = self.slots.get(name)?;
        (matches!(self.config, OptimizerConfig::Apollo(_)) && slot.state.rank() == D)
            .then(|| slot.state.downcast_ref::<ApolloState<D>>())
    }

    /// Bytes of optimizer state per parameter.
    pub fn state_bytes(&self) -> StateBytes {
        StateBytes {
            params: self
                .slots
                .iter()
                .map(|(name, slot)| ParamStateBytes {
                    name: name.clone(),
                    dims: slot.dims.clone(),
                    projected: slot.projected,
                    bytes: slot.bytes,
                    adamw_bytes: 2
                        * slot.dims.iter().product::<usize>()
                        * std::mem::size_of::<f32>(),
                })
                .collect(),
        }
    }

    /// Applies one optimizer step with learning rate `lr` to every parameter of `module` that
    /// has a gradient in `grads`; parameters without one (frozen layers) are left as they are.
    ///
    /// All checks run before any parameter changes, so an error leaves the model untouched.
    ///
    /// # Errors
    /// [`OptimError::StateMismatch`] when restored state does not fit a parameter,
    /// [`OptimError::InjectedShape`] when an injected projection has the wrong shape.
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
    ) -> Result<M, OptimError> {
        let mut check = CheckVisitor {
            optim: self,
            grads: &grads,
            path: Vec::new(),
            error: None,
        };
        module.visit(&mut check);
        if let Some(error) = check.error {
            return Err(error);
        }
        let mut mapper = StepMapper {
            optim: self,
            grads: &mut grads,
            lr,
            path: Vec::new(),
            rounded: false,
        };
        let module = module.map(&mut mapper);
        if mapper.rounded {
            self.rounding_steps += 1;
        }
        Ok(module)
    }

    /// Name of parameter `id` found at module path `path`.
    fn name_of(&self, id: ParamId, path: &[String]) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| path.join("."))
    }

    /// Per-tensor APOLLO for parameter `name` of stored shape `dims`.
    fn apollo_tensor(
        &self,
        config: &Arc<ApolloConfig>,
        name: &str,
        dims: &[usize],
    ) -> Result<(ApolloTensor, bool), OptimError> {
        match dims {
            [rows, cols] if config.projects(name, dims) => {
                let tensor = ApolloTensor::projected(
                    config.clone(),
                    name,
                    [*rows, *cols],
                    name_seed(config.seed, name),
                    self.injected.get(name).cloned(),
                )?;
                Ok((tensor, true))
            }
            _ => Ok((ApolloTensor::dense(config.clone(), dims.len()), false)),
        }
    }

    /// Checks that the state of `name` (if any) fits a rank-`D` parameter of shape `dims`.
    fn check_param<const D: usize>(&self, name: &str, dims: &[usize]) -> Result<(), OptimError> {
        let mismatch = |reason: String| OptimError::StateMismatch {
            name: name.to_string(),
            dims: dims.to_vec(),
            reason,
        };
        let projected = match &self.apollo {
            Some(config) => self.apollo_tensor(config, name, dims)?.1,
            None => false,
        };
        let Some(slot) = self.slots.get(name) else {
            return Ok(());
        };
        if slot.state.rank() != D {
            return Err(mismatch(format!("state has rank {}", slot.state.rank())));
        }
        let fits = match &self.apollo {
            Some(config) => {
                let state = slot.state.downcast_ref::<ApolloState<D>>();
                if state.projected.is_some() != projected {
                    return Err(mismatch(format!(
                        "state is {}projected, the config says {}projected",
                        if state.projected.is_some() {
                            ""
                        } else {
                            "not "
                        },
                        if projected { "" } else { "not " },
                    )));
                }
                state.fits(config, dims)
            }
            None => slot.state.downcast_ref::<AdamWState<D>>().param_dims() == dims,
        };
        if fits {
            Ok(())
        } else {
            Err(mismatch("moment or projection shapes differ".to_string()))
        }
    }

    /// Serialises all state into burnpack bytes.
    ///
    /// # Errors
    /// [`OptimError::Io`] if burnpack refuses the content.
    pub fn to_bytes(&self) -> Result<Bytes, OptimError> {
        self.writer().into_bytes().map_err(|e| OptimError::Io {
            path: PathBuf::new(),
            message: e.to_string(),
        })
    }

    /// Writes all state to `path` (burnpack; written to a temporary sibling and renamed).
    ///
    /// # Errors
    /// [`OptimError::Io`] when the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        self.writer()
            .auto_extension(false)
            .write_to_file(path)
            .map_err(|e| OptimError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        tracing::debug!(path = %path.display(), params = self.slots.len(), "Saved optimizer state.");
        Ok(())
    }

    /// Replaces all state with the state in burnpack `bytes`, on `device`.
    ///
    /// # Errors
    /// [`OptimError::Io`] / [`OptimError::Corrupt`] for unreadable or foreign content.
    pub fn load_bytes(&mut self, bytes: Bytes, device: &Device) -> Result<(), OptimError> {
        let reader = burn_pack::Reader::from_bytes(bytes).map_err(|e| OptimError::Io {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        self.load_reader(reader, Path::new(""), device)
    }

    /// Replaces all state with the state saved at `path`, on `device`.
    ///
    /// # Errors
    /// [`OptimError::Io`] when the file cannot be read, [`OptimError::Corrupt`] when it holds
    /// another algorithm's state or an incomplete parameter entry.
    pub fn load(&mut self, path: &Path, device: &Device) -> Result<(), OptimError> {
        let reader = burn_pack::Reader::from_file(path).map_err(|e| OptimError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        self.load_reader(reader, path, device)?;
        tracing::debug!(path = %path.display(), params = self.slots.len(), "Loaded optimizer state.");
        Ok(())
    }

    /// The burnpack writer for the current state.
    fn writer(&self) -> burn_pack::Writer {
        let mut sink = StateSink::default();
        let mut scalars = Vec::new();
        let mut metadata = Vec::new();
        for (name, slot) in &self.slots {
            flatten_slot(&self.config, name, &slot.state, &mut sink);
            scalars.push((
                format!("{name}.{RANK_LEAF}"),
                burn_pack::Scalar::from(slot.state.rank()),
            ));
            let dims = serde_json::to_string(&slot.dims).unwrap_or_default();
            metadata.push((format!("{name}.{DIMS_LEAF}"), dims));
        }
        let tensors = sink
            .tensors
            .into_iter()
            .map(|(name, data)| {
                let (bytes, shape, dtype) = data.into_parts();
                burn_pack::Tensor::new(name, dtype, shape, None, bytes)
            })
            .collect();
        let mut writer = burn_pack::Writer::new(tensors)
            .with_metadata(ALGORITHM_KEY, self.config.algorithm())
            .with_metadata(
                CONFIG_KEY,
                &serde_json::to_string(&self.config).unwrap_or_default(),
            );
        for (key, value) in sink.scalars.into_iter().chain(scalars) {
            writer = writer.with_scalar(&key, value);
        }
        for (key, value) in metadata {
            writer = writer.with_metadata(&key, &value);
        }
        if self.rounding_steps > 0 {
            let record = RoundingRecord {
                rounding: self.rounding,
                steps: self.rounding_steps,
            };
            let json = serde_json::to_string(&record).expect("a plain record serialises");
            writer = writer.with_metadata(ROUNDING_KEY, &json);
        }
        writer
    }

    /// Rebuilds every parameter's state from a burnpack reader.
    fn load_reader(
        &mut self,
        reader: burn_pack::Reader,
        path: &Path,
        device: &Device,
    ) -> Result<(), OptimError> {
        let corrupt = |field: &str, reason: String| OptimError::Corrupt {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let metadata = reader.metadata().clone();
        let found = metadata.get(ALGORITHM_KEY).map(String::as_str);
        if found != Some(self.config.algorithm()) {
            return Err(corrupt(
                ALGORITHM_KEY,
                format!(
                    "holds {:?} state, this optimizer is {}",
                    found.unwrap_or("no"),
                    self.config.algorithm()
                ),
            ));
        }
        let (rounding, rounding_steps) = match metadata.get(ROUNDING_KEY) {
            Some(json) => {
                let record: RoundingRecord =
                    serde_json::from_str(json).map_err(|e| corrupt(ROUNDING_KEY, e.to_string()))?;
                (record.rounding, record.steps)
            }
            // Written before any bf16 step (or by an f32 run): keep this driver's rounding.
            None => (self.rounding, 0),
        };
        let scalars = reader.scalars().clone();
        let tensors = reader.into_tensors().map_err(|e| OptimError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut source = StateSource::new(scalars.clone());
        for tensor in tensors {
            let (name, dtype, shape, _, bytes) =
                tensor.into_parts().map_err(|e| OptimError::Io {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            source.insert_tensor(name, TensorData::from_bytes(bytes, shape, dtype));
        }

        let suffix = format!(".{RANK_LEAF}");
        let mut slots = BTreeMap::new();
        for (key, value) in &scalars {
            let Some(name) = key.strip_suffix(&suffix) else {
                continue;
            };
            let rank = usize::try_from(*value)
                .map_err(|_| corrupt(key, "rank is not an unsigned integer".into()))?;
            let dims_key = format!("{name}.{DIMS_LEAF}");
            let dims: Vec<usize> = metadata
                .get(&dims_key)
                .and_then(|json| serde_json::from_str(json).ok())
                .ok_or_else(|| corrupt(&dims_key, "missing or not a list of sizes".into()))?;
            if dims.len() != rank {
                return Err(corrupt(name, format!("rank {rank} but shape {dims:?}")));
            }
            let (state, bytes, projected) =
                unflatten_slot(&self.config, rank, name, &mut source, device)
                    .ok_or_else(|| corrupt(name, "incomplete or unsupported state".into()))?;
            slots.insert(
                name.to_string(),
                Slot {
                    state,
                    dims,
                    bytes,
                    projected,
                },
            );
        }
        self.slots = slots;
        self.rounding = rounding;
        self.rounding_steps = rounding_steps;
        Ok(())
    }
}

/// Runs `body` with `D` bound to the runtime tensor rank `rank` (1..=6); `None` otherwise.
macro_rules! with_rank {
    ($rank:expr, $d:ident => $body:expr) => {
        match $rank {
            1 => {
                const $d: usize = 1;
                $body
            }
            2 => {
                const $d: usize = 2;
                $body
            }
            3 => {
                const $d: usize = 3;
                $body
            }
            4 => {
                const $d: usize = 4;
                $body
            }
            5 => {
                const $d: usize = 5;
                $body
            }
            6 => {
                const $d: usize = 6;
                $body
            }
            _ => None,
        }
    };
}

/// Flattens one parameter's state under `prefix`.
fn flatten_slot(config: &OptimizerConfig, prefix: &str, state: &DynState, sink: &mut StateSink) {
    let done: Option<()> = with_rank!(state.rank(), D => {
        match config {
            OptimizerConfig::Adamw(_) => {
                state.downcast_ref::<AdamWState<D>>().state_flatten(prefix, sink)
            }
            OptimizerConfig::Apollo(_) => {
                state.downcast_ref::<ApolloState<D>>().state_flatten(prefix, sink)
            }
        }
        Some(())
    });
    debug_assert!(done.is_some(), "states are only created for ranks 1..=6");
}

/// Rebuilds one parameter's state: (state, bytes, projected).
fn unflatten_slot(
    config: &OptimizerConfig,
    rank: usize,
    prefix: &str,
    source: &mut StateSource,
    device: &Device,
) -> Option<(DynState, usize, bool)> {
    with_rank!(rank, D => {
        match config {
            OptimizerConfig::Adamw(_) => {
                let state = AdamWState::<D>::state_unflatten(prefix, source, device)?;
                let bytes = state.bytes();
                Some((DynState::create(state, D), bytes, false))
            }
            OptimizerConfig::Apollo(_) => {
                let state = ApolloState::<D>::state_unflatten(prefix, source, device)?;
                let bytes = state.bytes();
                let projected = state.projected.is_some();
                Some((DynState::create(state, D), bytes, projected))
            }
        }
    })
}

/// Pre-pass of [`ModelOptimizer::step`]: validates state and injected projections.
struct CheckVisitor<'a> {
    /// The driver whose state is checked.
    optim: &'a ModelOptimizer,
    /// Gradients of this step (only parameters with one are checked).
    grads: &'a GradientsParams,
    /// Current module path.
    path: Vec<String>,
    /// First error found.
    error: Option<OptimError>,
}

impl ModuleVisitor for CheckVisitor<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() || self.grads.get::<D>(param.id).is_none() {
            return;
        }
        let name = self.optim.name_of(param.id, &self.path);
        let dims = param.val().dims();
        if let Err(error) = self.optim.check_param::<D>(&name, &dims) {
            self.error = Some(error);
        }
    }
}

/// Main pass of [`ModelOptimizer::step`]: updates each parameter that has a gradient.
struct StepMapper<'a> {
    /// The driver whose state is advanced.
    optim: &'a mut ModelOptimizer,
    /// Gradients of this step, removed as they are used.
    grads: &'a mut GradientsParams,
    /// Learning rate of this step.
    lr: f64,
    /// Current module path.
    path: Vec<String>,
    /// Whether a bf16 parameter was rounded in this step (advances the noise counter).
    rounded: bool,
}

impl ModuleMapper for StepMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let name = self.optim.name_of(id, &self.path);
        let dims = tensor.dims();
        let device = grad.device();
        // The autodiff attributes the parameter carries (if it is on an autodiff device), put
        // back on the updated value; asking a plain tensor for them panics in burn.
        let autodiff = tensor
            .gradient_checkpointing_strategy()
            .map(|strategy| (strategy, tensor.is_require_grad(), tensor.is_distributed()));
        let value = tensor.inner().to_device(&device);
        // A bf16 parameter is stepped in f32 and rounded back below.
        let low_precision = value.dtype() == DType::BF16;
        let (value, grad) = if low_precision {
            (value.cast(DType::F32), grad.cast(DType::F32))
        } else {
            (value, grad)
        };

        let previous = self.optim.slots.remove(&name).map(|slot| slot.state);
        let (updated, state, bytes, projected) = match &self.optim.apollo {
            Some(config) => {
                let (optim, projected) = self
                    .optim
                    .apollo_tensor(config, &name, &dims)
                    .expect("checked by CheckVisitor before any update");
                let (updated, state, bytes) =
                    run_tensor::<ApolloTensor, D>(&optim, self.lr, value, grad, previous, &device);
                (updated, state, bytes, projected)
            }
            None => {
                let OptimizerConfig::Adamw(config) = &self.optim.config else {
                    unreachable!("`apollo` is set exactly for APOLLO configs")
                };
                let optim = config.for_rank(D);
                let (updated, state, bytes) =
                    run_tensor::<TorchAdamW, D>(&optim, self.lr, value, grad, previous, &device);
                (updated, state, bytes, false)
            }
        };
        self.optim.slots.insert(
            name.clone(),
            Slot {
                state,
                dims: dims.to_vec(),
                bytes,
                projected,
            },
        );

        let mut updated = if low_precision {
            self.rounded = true;
            let step = self.optim.rounding_steps;
            rounding::round_to_bf16(updated, self.optim.rounding, step, &name)
        } else {
            updated
        };
        if let Some((strategy, require_grad, distributed)) = autodiff {
            updated = Tensor::from_inner(updated).with_gradient_checkpointing_strategy(strategy);
            if require_grad {
                updated = updated.require_grad();
            }
            if distributed {
                updated = updated.set_distributed(id);
            }
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Bytes of a per-tensor state.
trait StateBytesOf {
    /// Bytes held by the state's tensors.
    fn state_bytes(&self) -> usize;
}

impl<const D: usize> StateBytesOf for AdamWState<D> {
    fn state_bytes(&self) -> usize {
        self.bytes()
    }
}

impl<const D: usize> StateBytesOf for ApolloState<D> {
    fn state_bytes(&self) -> usize {
        self.bytes()
    }
}

/// One per-tensor optimizer step with type-erased state: (new value, new state, state bytes).
fn run_tensor<O, const D: usize>(
    optim: &O,
    lr: f64,
    value: Tensor<D>,
    grad: Tensor<D>,
    previous: Option<DynState>,
    device: &Device,
) -> (Tensor<D>, DynState, usize)
where
    O: Optimizer,
    O::State<D>: StateBytesOf,
{
    let previous = previous.map(|s| O::to_device(s.downcast::<O::State<D>>(), device));
    let (value, state) = optim.step(lr, value, grad, previous);
    let state = state.expect("both per-tensor optimizers always return state");
    let bytes = state.state_bytes();
    (value, DynState::create(state, D), bytes)
}
