//! dreamloop's runtime: the actors, their supervision, the step loop, signals, metrics and
//! the `dreamloop` subcommands. The binary (`main.rs`) is a thin command line over it;
//! the runtime tests call [`run`] in process with injected [`Control`] and fault-injecting
//! parts ([`Faults`]).
//!
//! # The supervision tree (`dreamloop run`)
//!
//! ```text
//! run() ── startup.rs: state dir + pid lock, events, metrics, resume point, refused settings
//!   ├── signals.rs task ──Control──┐      (SIGTERM/INT/TSTP/CONT/USR1/HUP; tests send Control)
//!   │                              ▼
//!   ├── driver.rs ── the step loop (Driver): boundary → NextBatch → [own_replies.rs: the
//!   │                policy's replies sampled, judged, wrong ones offered to the labeler as
//!   │                pairs] → TrainOn → trained.jsonl
//!   │                → evaluate (trainer; with generation probes) → judge
//!   │                (rollback::judge; the driver owns the policy state) → verdict.rs
//!   │                carries it out → experiment.rs: the controller's actions (phase
//!   │                change and re-based reference, lr raise, replay weights) and
//!   │                evals.jsonl → checkpoint
//!   └── supervisor.rs SupervisorActor (restarts children within [supervisor] budget; counts
//!                     slow calls and transient errors against it too)
//!         ├── dreamer       dream::Dreamer + ChatClient (only with [dream]): requests on
//!         │                 blocking threads, valid dreams queued per kind
//!         ├── generator     scenario::Generator + ledger, GeneralReplay ── takes dreams first
//!         ├── labeler       label::Labeler + convo::ConvoReader     ── calls generator
//!         ├── mixer         mix::Mixer + Pools                      ── calls labeler
//!         ├── trainer       train::Trainer on the `dreamloop-trainer` OS thread
//!         │                 (bounded crossbeam job queue; eval::ProbeSuite there too)
//!         └── checkpointer  checkpoint::CheckpointStore, Quarantine ── calls trainer
//! ```
//!
//! Actors find each other by registered name (`ractor::registry::where_is`), so a restarted
//! actor is found without re-wiring; the registry is global to the process, so one `run` at
//! a time per process (it stops and waits for every actor before it returns). The loop's
//! calls go through `call.rs` (lookup, send, a timeout; typed failures: transient ones are
//! retried and counted against the restart budget, persistent ones stop the daemon with
//! exit 78). Errors are reported with `anyhow` in this crate only; the core returns typed
//! errors.

pub mod call;
pub mod checkpointer;
pub mod cmd_daemon;
pub mod cmd_device_check;
pub mod cmd_dream;
pub mod cmd_eval;
pub mod cmd_export;
pub mod cmd_generate;
pub mod cmd_import;
pub mod cmd_logprobs;
pub mod cmd_plan;
pub mod cmd_report;
pub mod cmd_train;
pub mod dreamer;
mod driver;
mod experiment;
pub mod faults;
pub mod generator;
pub mod labeler;
pub mod mixer;
mod own_replies;
pub mod pidfile;
pub mod signals;
mod startup;
pub mod status;
mod supervisor;
pub mod systemd;
pub mod telemetry;
pub mod trainer;
mod verdict;

pub use faults::Faults;
pub use startup::{
    run, Control, RunOptions, EXIT_BUDGET_SPENT, EXIT_FINAL_CHECKPOINT_FAILED, EXIT_PERSISTENT,
    POLICY_PAUSE_FILE,
};
