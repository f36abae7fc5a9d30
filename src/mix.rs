//! The mixer: examples → batches at the replay ratio, kinds balanced.
//!
//! Every batch of size B holds `general` replay examples, and the rest split between
//! *accept* (`clear_direction`) and *push-back* (`flawed_direction`) examples. The counts
//! come from deterministic carries, not random rounding: the general carry grows by
//! `replay_ratio · B` per batch and the whole part is taken, so after n batches the
//! general count is within one example of `replay_ratio · B · n`; the same carry splits
//! the behavioural part by `accept_share`. Long-run shares are therefore exact, and each
//! batch is a pure function of the mixer's state and the queued examples.
//!
//! The replay ratio can change at run time (the rollback policy raises it after
//! forgetting); the carry is kept, so the share moves to the new ratio from that batch
//! on. The mixer does not know where examples come from; the caller keeps the pools
//! filled, guided by [`Mixer::plan`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::example::{Example, Kind};

/// Bad settings, or not enough queued examples for the next batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixError {
    /// A setting is out of range.
    #[error("mixer: `{field}` = {value} is out of range ({expected})")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        expected: &'static str,
    },
    /// The pools hold fewer examples of some class than the next batch needs.
    #[error("mixer: the next batch needs {needed:?} but the pools hold {available:?}")]
    Short {
        /// What the next batch needs.
        needed: BatchPlan,
        /// What the pools hold.
        available: BatchPlan,
    },
}

/// Mixer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixConfig {
    /// Examples per batch (one optimizer step).
    pub batch_size: usize,
    /// Share of general replay examples, in [0, 1] (default 0.25).
    pub replay_ratio: f64,
    /// Share of accept (clear-direction) examples among the behavioural ones, in [0, 1]
    /// (default 0.5: half accept, half push-back).
    pub accept_share: f64,
}

impl Default for MixConfig {
    fn default() -> Self {
        MixConfig {
            batch_size: 8,
            replay_ratio: 0.25,
            accept_share: 0.5,
        }
    }
}

/// How many examples of each class a batch holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// General replay examples.
    pub general: usize,
    /// Clear-direction (accept) examples.
    pub accept: usize,
    /// Flawed-direction (push-back) examples.
    pub push_back: usize,
}

/// Examples for one optimizer step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The examples: general first, then accept, then push-back.
    pub examples: Vec<Example>,
    /// The class counts.
    pub plan: BatchPlan,
}

/// Queued examples by class, filled by the caller.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    /// General replay examples (and `general`-kind scenarios).
    pub general: VecDeque<Example>,
    /// Clear-direction examples.
    pub accept: VecDeque<Example>,
    /// Flawed-direction examples.
    pub push_back: VecDeque<Example>,
}

impl Pools {
    /// Queues an example in the pool of its kind.
    pub fn push(&mut self, example: Example) {
        match example.kind {
            Kind::General => self.general.push_back(example),
            Kind::ClearDirection => self.accept.push_back(example),
            Kind::FlawedDirection => self.push_back.push_back(example),
        }
    }

    /// How many examples of each class are queued.
    pub fn available(&self) -> BatchPlan {
        BatchPlan {
            general: self.general.len(),
            accept: self.accept.len(),
            push_back: self.push_back.len(),
        }
    }
}

/// The carries, for checkpoints (so a resumed run keeps the exact long-run shares).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    /// Fractional general examples owed to the coming batches.
    pub general_carry: f64,
    /// Fractional accept examples owed.
    pub accept_carry: f64,
    /// Batches produced.
    pub batches: u64,
}

/// Builds batches; see the module docs.
#[derive(Debug, Clone)]
pub struct Mixer {
    /// Settings (the replay ratio changes at run time).
    config: MixConfig,
    /// Carries and batch count.
    state: MixerState,
}

/// Absorbs floating-point error in the carry (0.1 + 0.2 + 0.7 must give 1, not 0.999…).
const CARRY_EPS: f64 = 1e-9;

fn check_share(field: &'static str, value: f64) -> Result<(), MixError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(MixError::Invalid {
            field,
            value,
            expected: "0 to 1",
        })
    }
}

impl Mixer {
    /// A mixer with validated settings.
    pub fn new(config: MixConfig) -> Result<Mixer, MixError> {
        if config.batch_size == 0 {
            return Err(MixError::Invalid {
                field: "batch_size",
                value: 0.0,
                expected: "at least 1",
            });
        }
        check_share("replay_ratio", config.replay_ratio)?;
        check_share("accept_share", config.accept_share)?;
        Ok(Mixer {
            config,
            state: MixerState::default(),
        })
    }

    /// Resumes from a checkpointed state.
    pub fn with_state(mut self, state: MixerState) -> Mixer {
        self.state = state;
        self
    }

    /// The carries, for checkpoints.
    pub fn state(&self) -> MixerState {
        self.state
    }

    /// The replay ratio in force.
    pub fn replay_ratio(&self) -> f64 {
        self.config.replay_ratio
    }

    /// Changes the replay ratio from the next batch on.
    pub fn set_replay_ratio(&mut self, ratio: f64) -> Result<(), MixError> {
        check_share("replay_ratio", ratio)?;
        self.config.replay_ratio = ratio;
        Ok(())
    }

    /// The class counts of the next batch, and the carries after it.
    fn step(&self) -> (BatchPlan, MixerState) {
        let b = self.config.batch_size;
        let g = self.state.general_carry + self.config.replay_ratio * b as f64;
        let general = ((g + CARRY_EPS).floor() as usize).min(b);
        let behaviour = b - general;
        let a = self.state.accept_carry + self.config.accept_share * behaviour as f64;
        let accept = ((a + CARRY_EPS).floor() as usize).min(behaviour);
        let plan = BatchPlan {
            general,
            accept,
            push_back: behaviour - accept,
        };
        let state = MixerState {
            general_carry: g - general as f64,
            accept_carry: a - accept as f64,
            batches: self.state.batches + 1,
        };
        (plan, state)
    }

    /// What the next batch needs from the pools.
    pub fn plan(&self) -> BatchPlan {
        self.step().0
    }

    /// What the pools lack for the next batch: [`Mixer::plan`] minus what they hold, per
    /// class (none when they hold enough). The mixer actor asks its labeler for exactly this,
    /// so the pools never grow beyond one batch plus an over-delivery.
    pub fn lacking(&self, pools: &Pools) -> BatchPlan {
        let plan = self.plan();
        let have = pools.available();
        BatchPlan {
            general: plan.general.saturating_sub(have.general),
            accept: plan.accept.saturating_sub(have.accept),
            push_back: plan.push_back.saturating_sub(have.push_back),
        }
    }

    /// The next batch, taken from the fronts of the pools. If a pool is short, nothing
    /// changes and `MixError::Short` says what is needed.
    pub fn next_batch(&mut self, pools: &mut Pools) -> Result<Batch, MixError> {
        let (plan, state) = self.step();
        let available = pools.available();
        if available.general < plan.general
            || available.accept < plan.accept
            || available.push_back < plan.push_back
        {
            return Err(MixError::Short {
                needed: plan,
                available,
            });
        }
        let mut examples = Vec::with_capacity(self.config.batch_size);
        examples.extend(pools.general.drain(..plan.general));
        examples.extend(pools.accept.drain(..plan.accept));
        examples.extend(pools.push_back.drain(..plan.push_back));
        self.state = state;
        Ok(Batch { examples, plan })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::{Message, Target};

    fn example(kind: Kind, n: usize) -> Example {
        Example {
            kind,
            prompt: vec![Message::new("user", format!("q{n}"))],
            target: Target::Sft {
                completion: format!("a{n}"),
            },
            direction: None,
            provenance: format!("test:{n}"),
            reference: None,
        }
    }

    fn fill(pools: &mut Pools, plan: BatchPlan, counter: &mut usize) {
        for (kind, n) in [
            (Kind::General, plan.general),
            (Kind::ClearDirection, plan.accept),
            (Kind::FlawedDirection, plan.push_back),
        ] {
            for _ in 0..n {
                *counter += 1;
                pools.push(example(kind, *counter));
            }
        }
    }

    #[test]
    fn first_batches_follow_the_carry() {
        // B = 10, ratio 0.25: carries 2.5 → 2 (0.5), 3.0 → 3, 2.5 → 2, 3.0 → 3 …
        let mut mixer = Mixer::new(MixConfig {
            batch_size: 10,
            replay_ratio: 0.25,
            accept_share: 0.5,
        })
        .expect("valid");
        let mut pools = Pools::default();
        let mut counter = 0;
        let mut generals = Vec::new();
        let mut accepts = Vec::new();
        for _ in 0..4 {
            fill(&mut pools, mixer.plan(), &mut counter);
            let batch = mixer.next_batch(&mut pools).expect("filled");
            assert_eq!(batch.examples.len(), 10);
            generals.push(batch.plan.general);
            accepts.push(batch.plan.accept);
        }
        assert_eq!(generals, [2, 3, 2, 3]);
        // Behaviour 8, 7, 8, 7 → accept 4, 3 (carry .5), 4 (carry .5), 4 (3.5+.5).
        assert_eq!(accepts, [4, 3, 4, 4]);
    }

    #[test]
    fn short_pools_change_nothing() {
        let mut mixer = Mixer::new(MixConfig::default()).expect("valid");
        let mut pools = Pools::default();
        pools.push(example(Kind::General, 1));
        let err = mixer.next_batch(&mut pools).expect_err("short");
        assert!(matches!(err, MixError::Short { .. }));
        assert_eq!(pools.general.len(), 1);
        assert_eq!(mixer.state(), MixerState::default());
    }

    #[test]
    fn lacking_is_the_plan_minus_the_pools() {
        let mixer = Mixer::new(MixConfig::default()).expect("valid");
        // Batch 8 at replay 0.25 and accept share 0.5: 2 general, 3 + 3 behaviour.
        assert_eq!(
            mixer.plan(),
            BatchPlan {
                general: 2,
                accept: 3,
                push_back: 3
            }
        );
        let mut pools = Pools::default();
        pools.push(example(Kind::General, 1));
        for n in 2..7 {
            pools.push(example(Kind::ClearDirection, n));
        }
        assert_eq!(
            mixer.lacking(&pools),
            BatchPlan {
                general: 1,
                accept: 0,
                push_back: 3
            }
        );
    }

    #[test]
    fn settings_are_validated() {
        assert!(Mixer::new(MixConfig {
            batch_size: 0,
            ..MixConfig::default()
        })
        .is_err());
        let mut mixer = Mixer::new(MixConfig::default()).expect("valid");
        assert!(mixer.set_replay_ratio(1.5).is_err());
        assert!(mixer.set_replay_ratio(f64::NAN).is_err());
        assert!(mixer.set_replay_ratio(0.4).is_ok());
        assert_eq!(mixer.replay_ratio(), 0.4);
    }
}
