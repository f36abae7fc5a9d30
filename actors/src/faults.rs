//! Fault-injecting parts for the runtime tests: a trainer that panics or takes non-finite
//! steps, an evaluation slowed as on a loaded machine, a disk that fills during one
//! checkpoint. [`run`](crate::run) takes them in [`RunOptions::faults`](crate::RunOptions);
//! the `dreamloop` binary never sets any, and nothing here reads the environment.
//!
//! Each part is a plain value the actors consult at one point: the trainer thread before a
//! step and before an evaluation, the checkpoint store before each filesystem mutation
//! (through the core's [`FaultHook`]). A restarted actor gets the same parts, so a fault
//! bounded by a count ("panic twice") is counted across restarts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dreamloop::checkpoint::{step_dir_name, FaultHook, FsOp};

/// What the trainer does with the step it is about to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepFault {
    /// Take it.
    None,
    /// Panic on the trainer thread (the actor dies; the supervisor restarts it).
    Panic,
    /// Skip it as if its loss were non-finite (the weights are untouched).
    NonFinite,
}

/// The fault-injecting parts of one run; [`Faults::default`] injects nothing.
#[derive(Clone, Default)]
pub struct Faults {
    /// Panics on the trainer thread about to take this step, at most this many times.
    panic_at: Option<(u64, Arc<AtomicU32>, u32)>,
    /// The step whose loss turns non-finite, at most this many times.
    non_finite_at: Option<(u64, Arc<AtomicU32>, u32)>,
    /// Extra time every evaluation takes.
    slow_eval: Duration,
    /// The checkpoint store's filesystem hook.
    disk: Option<Arc<dyn FaultHook>>,
    /// Evaluations `[from, to)` (counted from 0, across restarts) report the arithmetic
    /// probe's accuracy this much lower; the counter.
    arithmetic_drop: Option<(u32, u32, f64, Arc<AtomicU32>)>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("panic_at", &self.panic_at.as_ref().map(|(s, _, k)| (s, k)))
            .field(
                "non_finite_at",
                &self.non_finite_at.as_ref().map(|(s, _, k)| (s, k)),
            )
            .field("slow_eval", &self.slow_eval)
            .field("disk", &self.disk.is_some())
            .field(
                "arithmetic_drop",
                &self
                    .arithmetic_drop
                    .as_ref()
                    .map(|(a, b, by, _)| (a, b, by)),
            )
            .finish()
    }
}

impl Faults {
    /// The trainer thread panics when it is about to take `step`, the first `times` times
    /// (a restarted trainer that reaches `step` again panics again while any are left).
    pub fn panic_at_step(mut self, step: u64, times: u32) -> Faults {
        self.panic_at = Some((step, Arc::new(AtomicU32::new(0)), times));
        self
    }

    /// The loss of `step` turns non-finite the first `times` times it is tried (the step is
    /// skipped and tried again with the next batch; more than `[rollback]
    /// max_non_finite_steps` in a row is a storm).
    pub fn non_finite_at_step(mut self, step: u64, times: u32) -> Faults {
        self.non_finite_at = Some((step, Arc::new(AtomicU32::new(0)), times));
        self
    }

    /// Every evaluation takes `extra` longer (waited in slices that honour a cancel).
    pub fn slow_eval(mut self, extra: Duration) -> Faults {
        self.slow_eval = extra;
        self
    }

    /// The disk fills while the checkpoint of `step` is written: its first write succeeds,
    /// every later write into that checkpoint fails with ENOSPC, as on a full filesystem.
    pub fn disk_full_at_step(mut self, step: u64) -> Faults {
        self.disk = Some(Arc::new(DiskFullAt {
            dir_name: step_dir_name(step),
            writes: AtomicUsize::new(0),
        }));
        self
    }

    /// Evaluations `from..to` (the daemon's first evaluation is 0) report the arithmetic
    /// probe's accuracy `by` lower: a forgetting of arithmetic, as the controller's targeted
    /// replay sees it.
    pub fn arithmetic_drop(mut self, from: u32, to: u32, by: f64) -> Faults {
        self.arithmetic_drop = Some((from, to, by, Arc::new(AtomicU32::new(0))));
        self
    }

    /// Applies the arithmetic drop to an evaluation's report, counting the evaluation.
    pub fn after_eval(&self, report: &mut dreamloop::eval::EvalReport) {
        if let Some((from, to, by, seen)) = &self.arithmetic_drop {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if (*from..*to).contains(&n) {
                tracing::warn!(
                    evaluation = n,
                    by,
                    "Fault injection: arithmetic accuracy reported lower."
                );
                report.arithmetic.accuracy -= by;
            }
        }
    }

    /// The trainer's decision for the step `next` it is about to take.
    pub fn before_step(&self, next: u64) -> StepFault {
        let hit = |fault: &Option<(u64, Arc<AtomicU32>, u32)>| {
            fault.as_ref().is_some_and(|(step, done, times)| {
                *step == next && done.fetch_add(1, Ordering::SeqCst) < *times
            })
        };
        if hit(&self.panic_at) {
            StepFault::Panic
        } else if hit(&self.non_finite_at) {
            StepFault::NonFinite
        } else {
            StepFault::None
        }
    }

    /// Waits out the injected evaluation delay, in slices of at most 50 ms; returns early
    /// when `cancel` is set.
    pub fn delay_eval(&self, cancel: &AtomicBool) {
        if self.slow_eval.is_zero() {
            return;
        }
        tracing::warn!(
            extra = ?self.slow_eval,
            "Fault injection: this evaluation is slowed."
        );
        let end = Instant::now() + self.slow_eval;
        while Instant::now() < end && !cancel.load(Ordering::SeqCst) {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    /// The filesystem hook for the checkpoint store, if a disk fault is set.
    pub fn disk_hook(&self) -> Option<Arc<dyn FaultHook>> {
        self.disk.clone()
    }
}

/// A disk that fills while one checkpoint is written (see [`Faults::disk_full_at_step`]).
struct DiskFullAt {
    /// The checkpoint directory name whose writes fail (`step-0000000N`).
    dir_name: String,
    /// Writes seen so far into that checkpoint.
    writes: AtomicUsize,
}

impl FaultHook for DiskFullAt {
    fn before(&self, op: FsOp, path: &Path) -> std::io::Result<()> {
        let inside = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(&self.dir_name));
        if op == FsOp::Write && inside && self.writes.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_injected_at_its_step_and_only_so_often() {
        let faults = Faults::default().panic_at_step(3, 2);
        let restarted = faults.clone();
        assert_eq!(faults.before_step(2), StepFault::None);
        assert_eq!(faults.before_step(3), StepFault::Panic);
        // A restarted trainer shares the count.
        assert_eq!(restarted.before_step(3), StepFault::Panic);
        assert_eq!(restarted.before_step(3), StepFault::None);
    }

    #[test]
    fn a_non_finite_step_is_injected_so_often() {
        let faults = Faults::default().non_finite_at_step(4, 2);
        let tried = [3, 4, 4, 4, 5].map(|s| faults.before_step(s));
        use StepFault::{NonFinite, None};
        assert_eq!(tried, [None, NonFinite, NonFinite, None, None]);
    }

    #[test]
    fn the_disk_fills_after_the_first_write_into_its_checkpoint() {
        let hook = Faults::default()
            .disk_full_at_step(4)
            .disk_hook()
            .expect("set");
        let other = Path::new("/s/checkpoints/.tmp-step-00000002/model.safetensors");
        let target = Path::new("/s/checkpoints/.tmp-step-00000004/model.safetensors");
        assert!(hook.before(FsOp::Write, other).is_ok());
        assert!(hook.before(FsOp::Write, target).is_ok());
        let err = hook.before(FsOp::Write, target).expect_err("full");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert!(hook.before(FsOp::Write, other).is_ok());
    }
}
