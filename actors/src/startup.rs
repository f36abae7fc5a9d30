//! Start-up: [`run`] takes the validated config, the control channel and the process
//! options, and returns the exit status.
//!
//! Read top to bottom it is the order of start-up: the state directory and its pid lock,
//! the event log, the metrics exporter, the resume point (LATEST if its manifest verifies,
//! else the newest that does) and the `[train]` settings it cannot take, the supervisor
//! (which spawns the actors in pipeline order, `supervisor.rs`), then the step driver
//! (`driver.rs`) until it stops; last, every actor is stopped and waited for, so that a
//! second `run` in the same process (the runtime tests) starts on a clean registry.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use dreamloop::checkpoint::{CheckpointStore, RetentionPolicy};
use dreamloop::config::DreamConfig;
use dreamloop::events::EventLog;
use dreamloop::train::resume::{reconcile, SettingChange};
use dreamloop::train::trainer::TrainerState;
use ractor::Actor;
use tokio::sync::{mpsc, watch};

use crate::checkpointer::read_run_state;
use crate::driver::{Driver, DriverStart};
use crate::faults::Faults;
use crate::status::{TrainedLog, RUN_STATE_FILE};
use crate::supervisor::{News, Shared, SupervisorActor, SupervisorArgs, SUPERVISOR};
use crate::telemetry;
use crate::trainer::Start;

/// Exit status when a restart budget was spent (EX_SOFTWARE).
pub const EXIT_BUDGET_SPENT: u8 = 70;
/// Exit status when the final checkpoint could not be written (EX_IOERR): the steps since
/// LATEST are lost.
pub const EXIT_FINAL_CHECKPOINT_FAILED: u8 = 74;
/// Exit status after a persistent error (EX_CONFIG, as for a refused setting): the operator
/// must fix its cause (see `call.rs` for which errors are persistent).
pub const EXIT_PERSISTENT: u8 = 78;
/// `<state_dir>/paused-by-policy.json`: present while the rollback policy's pause waits for
/// an operator, so that a restart stays paused (removed by `dreamloop resume`).
pub const POLICY_PAUSE_FILE: &str = "paused-by-policy.json";

/// How long `run` waits for the actors to stop once the loop has.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// What an operator (through `signals.rs`) or a test asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop taking steps at the next step boundary (metrics keep being served).
    Pause,
    /// Take steps again (also ends a pause ordered by the rollback policy).
    Resume,
    /// Write a checkpoint at the next step boundary.
    Checkpoint,
    /// Re-read the config file and apply its hot settings.
    Reload,
    /// Finish the step, checkpoint, exit 0.
    Shutdown,
}

/// Process settings of `dreamloop run` (the loop's settings are in the config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file, re-read on `Reload`; `None`: reload is refused.
    pub config_path: Option<PathBuf>,
    /// Start paused.
    pub paused: bool,
    /// Stop (checkpoint, exit 0) once this many steps are reached.
    pub max_steps: Option<u64>,
    /// Fault-injecting parts (the runtime tests); the binary sets none.
    pub faults: Faults,
}

/// Runs the daemon until `Shutdown`, `max_steps`, or a spent restart budget. Returns the
/// process exit status: 0 after a clean stop, 70 when a budget was spent, 74 when the final
/// checkpoint failed, 78 on a persistent error, 1 on a start-up or unrecoverable error
/// (logged). The caller installs signal handlers (or sends [`Control`] itself) and sets the
/// process umask; `run` touches nothing outside `state_dir` but the metrics listener.
pub async fn run(config: DreamConfig, control: mpsc::Receiver<Control>, opts: RunOptions) -> u8 {
    match run_inner(config, control, opts).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "The daemon stopped on an error.");
            1
        }
    }
}

async fn run_inner(
    config: DreamConfig,
    control: mpsc::Receiver<Control>,
    opts: RunOptions,
) -> anyhow::Result<u8> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let _pid = crate::pidfile::PidLock::acquire(&state_dir)?;
    let events = Arc::new(Mutex::new(EventLog::open(&state_dir)?));
    let addr: std::net::SocketAddr = config
        .metrics_addr
        .parse()
        .context("metrics_addr (validated)")?;
    telemetry::install(addr).with_context(|| format!("starting the metrics exporter on {addr}"))?;

    // Where to resume: LATEST if its manifest verifies, else the newest that does.
    let resume = {
        let retention = RetentionPolicy {
            keep_last: config.checkpoint.keep_last,
            mirror_dir: None,
        };
        let (store, _) = CheckpointStore::open(&state_dir, retention)?;
        let (point, warnings) = store.resume_point()?;
        for w in warnings {
            tracing::warn!(?w, "Resume: a checkpoint was passed over.");
        }
        point
    };
    let resumed = match &resume {
        Some(c) => Some((c.step, read_run_state(&c.file(RUN_STATE_FILE))?)),
        None => None,
    };
    if let Some(c) = &resume {
        let refused = refused_train_changes(&config, &c.path)?;
        if !refused.is_empty() {
            for change in &refused {
                tracing::error!(
                    field = change.field,
                    checkpoint = %change.saved,
                    configured = %change.configured,
                    "This [train] setting cannot change on resume."
                );
            }
            let fields: Vec<&str> = refused.iter().map(|c| c.field).collect();
            tracing::error!(
                step = c.step,
                path = %c.path.display(),
                fields = %fields.join(", "),
                "Not starting: the checkpoint was trained with other values of settings that are \
                 bound to its state. Set them back to the checkpoint's values, or start from a \
                 fresh state directory."
            );
            return Ok(EXIT_PERSISTENT);
        }
        tracing::info!(step = c.step, path = %c.path.display(), "Resuming from checkpoint.");
    } else {
        tracing::info!("No checkpoint: starting fresh.");
    }
    let config = Arc::new(config);
    let shared = Arc::new(Mutex::new(Shared {
        mixer: resumed
            .as_ref()
            .map(|(_, run)| (run.mixer, run.replay_ratio)),
    }));

    let (news_tx, news_rx) = watch::channel(News::Quiet);
    let cancel_eval = Arc::new(AtomicBool::new(false));
    let sup_args = SupervisorArgs {
        cancel_eval: cancel_eval.clone(),
        config: config.clone(),
        shared: shared.clone(),
        events: events.clone(),
        news: news_tx,
        timeout: Duration::from_secs(config.supervisor.call_timeout_seconds),
        first_start: resume
            .as_ref()
            .map_or(Start::Fresh, |c| Start::Restore(c.path.clone())),
        faults: opts.faults.clone(),
    };
    let (supervisor, handle) = Actor::spawn(Some(SUPERVISOR.into()), SupervisorActor, sup_args)
        .await
        .map_err(|e| anyhow!("starting the actors: {e}"))?;

    let resumed_step = resumed.as_ref().map_or(0, |(step, _)| *step);
    let policy_paused = state_dir.join(POLICY_PAUSE_FILE).exists();
    if policy_paused {
        tracing::warn!(
            path = %state_dir.join(POLICY_PAUSE_FILE).display(),
            "The rollback policy paused training before this start; still paused. \
             `dreamloop resume` continues."
        );
    }
    let trained = TrainedLog::open(
        &state_dir,
        resumed_step,
        config.supervisor.trained_segment_bytes,
    );
    let code = match trained {
        Err(e) => Err(e),
        Ok(trained) => {
            let mut driver = Driver::new(DriverStart {
                config,
                opts,
                control,
                news: news_rx,
                events,
                shared,
                trained,
                resumed,
                policy_paused,
                cancel_eval,
            });
            match driver.run_loop().await {
                Ok(code) => Ok(code),
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "The loop stopped on an error.");
                    driver.write_status("failed");
                    Ok(1)
                }
            }
        }
    };
    // Every actor stopped and waited for (the trainer's thread ends with its job queue), so
    // that nothing registered outlives the run.
    supervisor
        .stop_children_and_wait(Some("daemon stopping".into()), Some(STOP_WAIT))
        .await;
    supervisor.stop(Some("daemon stopping".into()));
    let _ = handle.await;
    code
}

/// The `[train]` changes since the checkpoint in `dir` that a resume cannot make (see
/// `dreamloop::train::resume`); the applicable ones are applied and logged by the trainer.
fn refused_train_changes(config: &DreamConfig, dir: &Path) -> anyhow::Result<Vec<SettingChange>> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let saved: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut configured = config.trainer_config(saved.config.pad_id);
    if let dreamloop::config::PhaseSpec::Schedule(_) = config.phase {
        // β and the DPO-loss weight are the phase's: the controller sets them on start-up
        // from the checkpoint's phase, not from `[train]`.
        configured.beta = saved.config.beta;
        configured.dpo_weight = saved.config.dpo_weight;
    }
    Ok(reconcile(&saved.config, &configured).refused)
}
