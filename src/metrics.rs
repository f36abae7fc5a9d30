//! The catalogue of every metric dreamloop exports: one list, [`CATALOGUE`], with its name,
//! type, help text, unit and labels. Code refers to names through the constants in
//! [`names`]; the exporter (`actors/src/telemetry.rs`) describes exactly these metrics, and
//! `tests/observability.rs` checks that every name the Grafana dashboards and the alert rules
//! query is listed here and that every entry follows the naming rule below;
//! `actors/tests/daemon_metrics.rs` that a real run emits each of them (not only registers it).
//!
//! This module only describes metrics. It does not record values (the core has no metrics
//! runtime; the actors do that) and knows nothing of Prometheus beyond its naming rules.
//!
//! # Naming (DESIGN.md §7)
//!
//! `dreamloop_<subsystem>_<name>_<unit>[_total]`, following Prometheus' naming guidance
//! (<https://prometheus.io/docs/practices/naming/>):
//! - one of the [`SUBSYSTEMS`] after the `dreamloop_` namespace;
//! - base units only, as the name's last word: `_seconds` (durations and Unix timestamps),
//!   `_bytes`, `_ratio` for shares in 0–1. Dimensionless values (losses, log-prob margins in
//!   nats, perplexity, a learning rate, a count of items now) carry no unit word;
//! - `_total` on counters and only on counters, after the unit (`…_seconds_total`);
//! - never `_bucket`, `_sum`, `_count` or `_info` endings that clash with the series Prometheus
//!   derives, except the identity gauges of 1 by convention: `dreamloop_build_info` (the
//!   version) and `dreamloop_loop_run_info` (the run id).
//!
//! # Labels
//!
//! Every label has a bounded set of values, declared with it in [`labels`]: an enumeration,
//! a layer index (bounded by the model's depth) or the build's version (one value per
//! process). Never an example id, a hash or a step number: each distinct value is a new time
//! series in Prometheus' memory for as long as it retains data.

/// The Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (and resets to 0 when the process restarts); query it with `rate()`.
    Counter,
    /// A value that is set, and may go down.
    Gauge,
    /// A distribution of observations, exported with buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// The unit of a metric's values; the name ends with its word (before `_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Durations, and Unix timestamps (`…_timestamp_seconds`).
    Seconds,
    /// Sizes.
    Bytes,
    /// A share in 0–1 (never a percentage).
    Ratio,
    /// Counts of things, losses, nats, perplexity, learning rates: no unit word in the name.
    Dimensionless,
}

impl Unit {
    /// The word a name with this unit ends with (before `_total`), if any.
    pub fn suffix(self) -> Option<&'static str> {
        match self {
            Unit::Seconds => Some("_seconds"),
            Unit::Bytes => Some("_bytes"),
            Unit::Ratio => Some("_ratio"),
            Unit::Dimensionless => None,
        }
    }
}

/// Which values a label may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelValues {
    /// Exactly these values.
    OneOf(&'static [&'static str]),
    /// A decimal layer index (bounded by the model's depth: at most a few hundred series).
    LayerIndex,
    /// The build's version string: one value per process.
    Version,
    /// The run's id (`<state_dir>/run.json`): one value per state directory.
    RunId,
}

/// A label a metric carries, with its bounded value set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// The label name as exported.
    pub name: &'static str,
    /// The values it may take; anything else is a bug in the caller.
    pub values: LabelValues,
}

impl Label {
    /// Whether `value` is one this label may take.
    pub fn allows(&self, value: &str) -> bool {
        match self.values {
            LabelValues::OneOf(values) => values.contains(&value),
            // u16: no model has 65,536 layers; also rejects signs, spaces and leading '+'.
            LabelValues::LayerIndex => {
                value.bytes().all(|b| b.is_ascii_digit()) && value.parse::<u16>().is_ok()
            }
            LabelValues::Version | LabelValues::RunId => !value.is_empty(),
        }
    }
}

/// One metric in the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The exported name (see the module docs for the rule).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The `# HELP` text: what one value means, for someone reading a scrape.
    pub help: &'static str,
    /// The unit of the values, matching the name's unit word.
    pub unit: Unit,
    /// The labels every series of this metric carries, in this order.
    pub labels: &'static [Label],
}

/// The bounded label sets.
pub mod labels {
    use super::{Label, LabelValues};

    /// The two example formats the trainer consumes.
    pub const EXAMPLE_KIND: Label = Label {
        name: "kind",
        values: LabelValues::OneOf(&["sft", "dpo"]),
    };
    /// The three scenario kinds (DESIGN.md §1).
    pub const SCENARIO_KIND: Label = Label {
        name: "kind",
        values: LabelValues::OneOf(&["clear_direction", "flawed_direction", "general"]),
    };
    /// Probe families of an evaluation: the two behaviour directions and the general skills.
    pub const PROBE_CATEGORY: Label = Label {
        name: "category",
        values: LabelValues::OneOf(&[
            "clear_direction",
            "flawed_direction",
            "arithmetic",
            "code",
            "reasoning",
        ]),
    };
    /// A full-attention layer's index.
    pub const LAYER: Label = Label {
        name: "layer",
        values: LabelValues::LayerIndex,
    };
    /// Why the policy rolled back: `rollback::RollbackReason::label` (a test keeps the two
    /// lists equal).
    pub const ROLLBACK_REASON: Label = Label {
        name: "reason",
        values: LabelValues::OneOf(&[
            "non_finite",
            "sycophancy",
            "perplexity",
            "clear_direction",
            "general_probe",
        ]),
    };
    /// Why the policy paused for an operator: `rollback::PauseReason::label`.
    pub const PAUSE_REASON: Label = Label {
        name: "reason",
        values: LabelValues::OneOf(&[
            "too_many_rollbacks",
            "no_rollback_target",
            "baseline_not_finite",
        ]),
    };
    /// The bounded queues of the daemon: `examples` holds labeled conversation-log examples
    /// waiting for a batch (`[queues] examples`), `trainer` the jobs waiting for the trainer
    /// thread (`[queues] trainer`). Scenarios and batches are pulled on demand, not queued.
    pub const QUEUE: Label = Label {
        name: "queue",
        values: LabelValues::OneOf(&["examples", "trainer"]),
    };
    /// Why a dreamed answer was refused (`dream::Rejection::label`).
    pub const DREAM_REJECTION: Label = Label {
        name: "reason",
        values: LabelValues::OneOf(crate::dream::Rejection::LABELS),
    };
    /// How a request to the dream server failed (`dream::ClientError::label`).
    pub const DREAM_ERROR: Label = Label {
        name: "error",
        values: LabelValues::OneOf(crate::dream::ClientError::LABELS),
    };
    /// The behaviour kinds an on-policy reply is judged for.
    pub const BEHAVIOUR_KIND: Label = Label {
        name: "kind",
        values: LabelValues::OneOf(&["clear_direction", "flawed_direction"]),
    };
    /// What the judge made of the policy's own reply (`dream::on_policy::Assessment::label`).
    pub const JUDGED: Label = Label {
        name: "judged",
        values: LabelValues::OneOf(crate::dream::on_policy::Assessment::LABELS),
    };
    /// The supervised actors (DESIGN.md §2).
    pub const ACTOR: Label = Label {
        name: "actor",
        values: LabelValues::OneOf(&[
            "generator",
            "dreamer",
            "labeler",
            "mixer",
            "trainer",
            "checkpointer",
        ]),
    };
    /// The crate version of the running binary.
    pub const VERSION: Label = Label {
        name: "version",
        values: LabelValues::Version,
    };
    /// The shares measured over the generation probes' replies (`eval::generations`).
    pub const GENERATION_MEASURE: Label = Label {
        name: "measure",
        values: LabelValues::OneOf(&[
            "push_back_flawed",
            "push_back_clear",
            "hedging",
            "distinct_1",
            "distinct_2",
            "arithmetic_exact",
            "code_pass",
        ]),
    };
    /// The run's id, made when its state directory was first used.
    pub const RUN_ID: Label = Label {
        name: "run_id",
        values: LabelValues::RunId,
    };
    /// Why the experiment controller acted (`controller::Why`).
    pub const CONTROL_REASON: Label = Label {
        name: "reason",
        values: LabelValues::OneOf(&[
            "steps",
            "criteria",
            "stall",
            "probe_breach",
            "probe_recovered",
        ]),
    };
    /// The general replay sources (`controller::REPLAY_SOURCES`).
    pub const REPLAY_SOURCE: Label = Label {
        name: "source",
        values: LabelValues::OneOf(&crate::controller::REPLAY_SOURCES),
    };
}

/// The subsystems a name may start with (after `dreamloop_`).
pub const SUBSYSTEMS: &[&str] = &[
    "train",
    "dpo",
    "eval",
    "policy",
    "mix",
    "checkpoint",
    "generator",
    "dream",
    "convo",
    "ledger",
    "labeler",
    "queue",
    "actor",
    "loop",
    "process",
    "build",
];

/// Metric names, for code: `telemetry::counter(names::TRAIN_STEPS_TOTAL, &[])`.
pub mod names {
    pub const TRAIN_STEPS_TOTAL: &str = "dreamloop_train_steps_total";
    pub const TRAIN_LOSS: &str = "dreamloop_train_loss";
    pub const TRAIN_SFT_LOSS: &str = "dreamloop_train_sft_loss";
    pub const TRAIN_DPO_LOSS: &str = "dreamloop_train_dpo_loss";
    pub const TRAIN_LEARNING_RATE: &str = "dreamloop_train_learning_rate";
    pub const TRAIN_GRAD_NORM: &str = "dreamloop_train_grad_norm";
    pub const TRAIN_TOKENS_TOTAL: &str = "dreamloop_train_tokens_total";
    pub const TRAIN_STEP_DURATION_SECONDS: &str = "dreamloop_train_step_duration_seconds";
    pub const TRAIN_NON_FINITE_STEPS_TOTAL: &str = "dreamloop_train_non_finite_steps_total";
    pub const TRAIN_EXAMPLES_TOTAL: &str = "dreamloop_train_examples_total";
    pub const TRAIN_DUTY_CYCLE_RATIO: &str = "dreamloop_train_duty_cycle_ratio";
    pub const TRAIN_LAST_STEP_TIMESTAMP_SECONDS: &str =
        "dreamloop_train_last_step_timestamp_seconds";

    pub const DPO_REWARD_CHOSEN: &str = "dreamloop_dpo_reward_chosen";
    pub const DPO_REWARD_REJECTED: &str = "dreamloop_dpo_reward_rejected";
    pub const DPO_REWARD_MARGIN: &str = "dreamloop_dpo_reward_margin";
    pub const DPO_REWARD_ACCURACY_RATIO: &str = "dreamloop_dpo_reward_accuracy_ratio";

    pub const EVAL_RUNS_TOTAL: &str = "dreamloop_eval_runs_total";
    pub const EVAL_PROBE_ACCURACY_RATIO: &str = "dreamloop_eval_probe_accuracy_ratio";
    pub const EVAL_PROBE_MARGIN: &str = "dreamloop_eval_probe_margin";
    pub const EVAL_PERPLEXITY: &str = "dreamloop_eval_perplexity";
    pub const EVAL_ATTENTION_ON_DIRECTION_RATIO: &str =
        "dreamloop_eval_attention_on_direction_ratio";
    pub const EVAL_LAYER_ATTENTION_ON_DIRECTION_RATIO: &str =
        "dreamloop_eval_layer_attention_on_direction_ratio";
    pub const EVAL_ABLATION_SENSITIVITY: &str = "dreamloop_eval_ablation_sensitivity";
    pub const EVAL_DURATION_SECONDS: &str = "dreamloop_eval_duration_seconds";
    pub const EVAL_GENERATION_WORDS: &str = "dreamloop_eval_generation_words";
    pub const EVAL_GENERATION_RATIO: &str = "dreamloop_eval_generation_ratio";

    pub const POLICY_ROLLBACKS_TOTAL: &str = "dreamloop_policy_rollbacks_total";
    pub const POLICY_MARK_GOOD_TOTAL: &str = "dreamloop_policy_mark_good_total";
    pub const POLICY_PAUSES_TOTAL: &str = "dreamloop_policy_pauses_total";
    pub const POLICY_PAUSED: &str = "dreamloop_policy_paused";
    pub const POLICY_BREACH_STREAK: &str = "dreamloop_policy_breach_streak";
    pub const POLICY_GOOD_STEP: &str = "dreamloop_policy_good_step";
    pub const POLICY_LR_FACTOR_RATIO: &str = "dreamloop_policy_lr_factor_ratio";

    pub const MIX_REPLAY_RATIO: &str = "dreamloop_mix_replay_ratio";
    pub const MIX_REPLAY_WEIGHT: &str = "dreamloop_mix_replay_weight";
    pub const TRAIN_PHASE_INDEX: &str = "dreamloop_train_phase_index";
    pub const TRAIN_PHASE_CHANGES_TOTAL: &str = "dreamloop_train_phase_changes_total";
    pub const TRAIN_LR_BOOST: &str = "dreamloop_train_lr_boost";
    pub const TRAIN_LR_RAISES_TOTAL: &str = "dreamloop_train_lr_raises_total";
    pub const LOOP_RUN_INFO: &str = "dreamloop_loop_run_info";

    pub const CHECKPOINT_WRITES_TOTAL: &str = "dreamloop_checkpoint_writes_total";
    pub const CHECKPOINT_WRITE_FAILURES_TOTAL: &str = "dreamloop_checkpoint_write_failures_total";
    pub const CHECKPOINT_WRITE_DURATION_SECONDS: &str =
        "dreamloop_checkpoint_write_duration_seconds";
    pub const CHECKPOINT_SIZE_BYTES: &str = "dreamloop_checkpoint_size_bytes";
    pub const CHECKPOINT_RESTORES_TOTAL: &str = "dreamloop_checkpoint_restores_total";

    pub const GENERATOR_SCENARIOS_TOTAL: &str = "dreamloop_generator_scenarios_total";
    pub const GENERATOR_DUPLICATES_SKIPPED_TOTAL: &str =
        "dreamloop_generator_duplicates_skipped_total";
    pub const DREAM_SCENARIOS_TOTAL: &str = "dreamloop_dream_scenarios_total";
    pub const DREAM_REJECTED_TOTAL: &str = "dreamloop_dream_rejected_total";
    pub const DREAM_ERRORS_TOTAL: &str = "dreamloop_dream_errors_total";
    pub const DREAM_QUEUE_DEPTH: &str = "dreamloop_dream_queue_depth";
    pub const DREAM_SERVER_UP: &str = "dreamloop_dream_server_up";
    pub const ON_POLICY_REPLIES_TOTAL: &str = "dreamloop_dream_on_policy_replies_total";
    pub const ON_POLICY_PAIRS_TOTAL: &str = "dreamloop_dream_on_policy_pairs_total";
    pub const CONVO_LINES_READ_TOTAL: &str = "dreamloop_convo_lines_read_total";
    pub const CONVO_LINES_MALFORMED_TOTAL: &str = "dreamloop_convo_lines_malformed_total";
    pub const LEDGER_ENTRIES: &str = "dreamloop_ledger_entries";
    pub const LABELER_EXAMPLES_TOTAL: &str = "dreamloop_labeler_examples_total";

    pub const QUEUE_PUSHED_TOTAL: &str = "dreamloop_queue_pushed_total";
    pub const QUEUE_POPPED_TOTAL: &str = "dreamloop_queue_popped_total";
    pub const QUEUE_CAPACITY: &str = "dreamloop_queue_capacity";

    pub const ACTOR_RESTARTS_TOTAL: &str = "dreamloop_actor_restarts_total";
    pub const LOOP_PAUSED: &str = "dreamloop_loop_paused";
    pub const PROCESS_START_TIME_SECONDS: &str = "dreamloop_process_start_time_seconds";
    pub const BUILD_INFO: &str = "dreamloop_build_info";
}

use labels::*;
use names::*;
use MetricKind::{Counter, Gauge, Histogram};
use Unit::{Bytes, Dimensionless, Ratio, Seconds};

/// Shorthand for one catalogue row.
const fn def(
    name: &'static str,
    kind: MetricKind,
    unit: Unit,
    labels: &'static [Label],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        help,
        unit,
        labels,
    }
}

/// Every metric dreamloop exports. Nothing may emit a name that is not here.
// One row per metric, kept as a table: rustfmt would spread each row over seven lines.
#[rustfmt::skip]
pub const CATALOGUE: &[MetricDef] = &[
    // Training: one update per optimizer step (StepReport).
    def(TRAIN_STEPS_TOTAL, Counter, Dimensionless, &[],
        "Optimizer steps completed (steps undone by a rollback stay counted)."),
    def(TRAIN_LOSS, Gauge, Dimensionless, &[],
        "Total training loss of the last step (nats)."),
    def(TRAIN_SFT_LOSS, Gauge, Dimensionless, &[],
        "Mean cross-entropy over completion tokens of the last step's SFT examples (nats)."),
    def(TRAIN_DPO_LOSS, Gauge, Dimensionless, &[],
        "Sigmoid DPO loss of the last step's preference pairs (nats)."),
    def(TRAIN_LEARNING_RATE, Gauge, Dimensionless, &[],
        "Learning rate of the last step, after schedule and rollback adjustments."),
    def(TRAIN_GRAD_NORM, Gauge, Dimensionless, &[],
        "Global L2 norm of the last step's gradients, before clipping."),
    def(TRAIN_TOKENS_TOTAL, Counter, Dimensionless, &[],
        "Tokens through the training forward passes (prompt and completion, no padding)."),
    def(TRAIN_STEP_DURATION_SECONDS, Histogram, Seconds, &[],
        "Wall time of one optimizer step, forward to parameter update."),
    def(TRAIN_NON_FINITE_STEPS_TOTAL, Counter, Dimensionless, &[],
        "Steps skipped because their loss or gradients were NaN or infinite."),
    def(TRAIN_EXAMPLES_TOTAL, Counter, Dimensionless, &[EXAMPLE_KIND],
        "Examples trained on, by format (an SFT example or a DPO pair)."),
    def(TRAIN_DUTY_CYCLE_RATIO, Gauge, Ratio, &[],
        "Share of the last minute's wall time spent in optimizer steps (not paused)."),
    def(TRAIN_LAST_STEP_TIMESTAMP_SECONDS, Gauge, Seconds, &[],
        "Unix time at which the last optimizer step completed."),
    // DPO statistics of the last step (means over its pairs, as TRL logs them).
    def(DPO_REWARD_CHOSEN, Gauge, Dimensionless, &[],
        "Mean implicit reward beta*(policy - reference log-prob) of the chosen responses."),
    def(DPO_REWARD_REJECTED, Gauge, Dimensionless, &[],
        "Mean implicit reward of the rejected responses."),
    def(DPO_REWARD_MARGIN, Gauge, Dimensionless, &[],
        "Mean chosen minus rejected implicit reward."),
    def(DPO_REWARD_ACCURACY_RATIO, Gauge, Ratio, &[],
        "Share of the last step's pairs whose chosen reward beat the rejected one."),
    // Evaluation on held-out probes (DESIGN.md §5).
    def(EVAL_RUNS_TOTAL, Counter, Dimensionless, &[],
        "Evaluations completed."),
    def(EVAL_PROBE_ACCURACY_RATIO, Gauge, Ratio, &[PROBE_CATEGORY],
        "Share of held-out probes where the preferred response won, by category."),
    def(EVAL_PROBE_MARGIN, Gauge, Dimensionless, &[PROBE_CATEGORY],
        "Mean preferred minus rejected response log-prob on held-out probes (nats), by category."),
    def(EVAL_PERPLEXITY, Gauge, Dimensionless, &[],
        "Perplexity on held-out general text (the forgetting guard)."),
    def(EVAL_ATTENTION_ON_DIRECTION_RATIO, Gauge, Ratio, &[],
        "Mean attention mass on the direction span over full-attention layers, sink excluded."),
    def(EVAL_LAYER_ATTENTION_ON_DIRECTION_RATIO, Gauge, Ratio, &[LAYER],
        "Attention mass on the direction span in one full-attention layer, sink excluded."),
    def(EVAL_ABLATION_SENSITIVITY, Gauge, Dimensionless, &[],
        "Mean drop in response log-prob when the direction span is removed (nats)."),
    def(EVAL_DURATION_SECONDS, Histogram, Seconds, &[],
        "Wall time of one evaluation."),
    def(EVAL_GENERATION_WORDS, Gauge, Dimensionless, &[],
        "Mean length in words of the replies to the generation probes."),
    def(EVAL_GENERATION_RATIO, Gauge, Ratio, &[GENERATION_MEASURE],
        "A share measured over the replies to the generation probes (NaN: no prompt of the kind)."),
    // The rollback policy's verdicts.
    def(POLICY_ROLLBACKS_TOTAL, Counter, Dimensionless, &[ROLLBACK_REASON],
        "Rollbacks to the GOOD checkpoint, by the guard that failed."),
    def(POLICY_MARK_GOOD_TOTAL, Counter, Dimensionless, &[],
        "Checkpoints marked GOOD (the new rollback target and baseline)."),
    def(POLICY_PAUSES_TOTAL, Counter, Dimensionless, &[PAUSE_REASON],
        "Times the policy stopped training for an operator, by reason."),
    def(POLICY_PAUSED, Gauge, Dimensionless, &[],
        "1 while training is stopped by the policy waiting for an operator, else 0."),
    def(POLICY_BREACH_STREAK, Gauge, Dimensionless, &[],
        "Consecutive evaluations breaching a guard (a rollback comes at the patience)."),
    def(POLICY_GOOD_STEP, Gauge, Dimensionless, &[],
        "Step number of the GOOD checkpoint (the rollback target)."),
    def(POLICY_LR_FACTOR_RATIO, Gauge, Ratio, &[],
        "Multiplier on the configured learning rate left by rollbacks (1 = none)."),
    def(MIX_REPLAY_RATIO, Gauge, Ratio, &[],
        "Share of general-replay examples per batch in force."),
    def(MIX_REPLAY_WEIGHT, Gauge, Dimensionless, &[REPLAY_SOURCE],
        "Relative weight of a general replay source in force (a breached probe's is multiplied)."),
    // The experiment controller (phases, lr raises, targeted replay).
    def(TRAIN_PHASE_INDEX, Gauge, Dimensionless, &[],
        "Index of the [[phase]] in force (0: the first, or the one fixed phase)."),
    def(TRAIN_PHASE_CHANGES_TOTAL, Counter, Dimensionless, &[CONTROL_REASON],
        "Phase changes made by the controller, by the condition that ended the phase."),
    def(TRAIN_LR_BOOST, Gauge, Dimensionless, &[],
        "Multiplier on the phase's learning rate from stall raises (1 = none)."),
    def(TRAIN_LR_RAISES_TOTAL, Counter, Dimensionless, &[],
        "Learning-rate raises by the controller after flat evaluations."),
    // Checkpoints.
    def(CHECKPOINT_WRITES_TOTAL, Counter, Dimensionless, &[],
        "Checkpoints written completely (manifest in place)."),
    def(CHECKPOINT_WRITE_FAILURES_TOTAL, Counter, Dimensionless, &[],
        "Checkpoint writes that failed (the previous checkpoints are untouched)."),
    def(CHECKPOINT_WRITE_DURATION_SECONDS, Histogram, Seconds, &[],
        "Wall time of one checkpoint write, fsyncs and renames included."),
    def(CHECKPOINT_SIZE_BYTES, Gauge, Bytes, &[],
        "Size on disk of the last checkpoint written."),
    def(CHECKPOINT_RESTORES_TOTAL, Counter, Dimensionless, &[],
        "Checkpoints loaded back: at start-up and on each rollback."),
    // The data plane.
    def(GENERATOR_SCENARIOS_TOTAL, Counter, Dimensionless, &[SCENARIO_KIND],
        "Scenarios generated, by kind."),
    def(GENERATOR_DUPLICATES_SKIPPED_TOTAL, Counter, Dimensionless, &[],
        "Generated scenarios rejected because the never-repeat ledger already held them."),
    def(DREAM_SCENARIOS_TOTAL, Counter, Dimensionless, &[SCENARIO_KIND],
        "Dreamed scenarios that passed validation and the near-duplicate filter, by kind."),
    def(DREAM_REJECTED_TOTAL, Counter, Dimensionless, &[DREAM_REJECTION],
        "Dreamed answers refused, by the first check they failed."),
    def(DREAM_ERRORS_TOTAL, Counter, Dimensionless, &[DREAM_ERROR],
        "Requests to the dream server that failed, by kind of failure."),
    def(DREAM_QUEUE_DEPTH, Gauge, Dimensionless, &[SCENARIO_KIND],
        "Valid dreams waiting for the generator, by kind."),
    def(DREAM_SERVER_UP, Gauge, Dimensionless, &[],
        "1 while the dream server's last request succeeded (or none failed yet), else 0."),
    def(ON_POLICY_REPLIES_TOTAL, Counter, Dimensionless, &[BEHAVIOUR_KIND, JUDGED],
        "The policy's own replies to fresh behaviour prompts, by kind and by what the judge made of them."),
    def(ON_POLICY_PAIRS_TOTAL, Counter, Dimensionless, &[],
        "DPO pairs queued from the policy's wrong replies (dpo and mixed phases)."),
    def(CONVO_LINES_READ_TOTAL, Counter, Dimensionless, &[],
        "Conversation-log lines read."),
    def(CONVO_LINES_MALFORMED_TOTAL, Counter, Dimensionless, &[],
        "Conversation-log lines skipped as malformed."),
    def(LEDGER_ENTRIES, Gauge, Dimensionless, &[],
        "Example hashes in the never-repeat ledger."),
    def(LABELER_EXAMPLES_TOTAL, Counter, Dimensionless, &[EXAMPLE_KIND],
        "Examples produced by the labeler, by format."),
    // Queues between the actors: depth = pushed - popped.
    def(QUEUE_PUSHED_TOTAL, Counter, Dimensionless, &[QUEUE],
        "Items sent into a bounded queue."),
    def(QUEUE_POPPED_TOTAL, Counter, Dimensionless, &[QUEUE],
        "Items taken out of a bounded queue."),
    def(QUEUE_CAPACITY, Gauge, Dimensionless, &[QUEUE],
        "Capacity of a bounded queue, in items."),
    // The runtime.
    def(ACTOR_RESTARTS_TOTAL, Counter, Dimensionless, &[ACTOR],
        "Restarts of a failed actor by the supervisor."),
    def(LOOP_PAUSED, Gauge, Dimensionless, &[],
        "1 while training is paused (by an operator or the policy), else 0."),
    def(PROCESS_START_TIME_SECONDS, Gauge, Seconds, &[],
        "Unix time at which the daemon started."),
    def(BUILD_INFO, Gauge, Dimensionless, &[VERSION],
        "Always 1; the version label names the running build."),
    def(LOOP_RUN_INFO, Gauge, Dimensionless, &[RUN_ID],
        "Always 1; the run_id label names the run (its state directory's run.json)."),
];

/// The catalogue entry for `name`, if there is one.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    CATALOGUE.iter().find(|def| def.name == name)
}
