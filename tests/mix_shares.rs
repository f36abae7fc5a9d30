//! Mixer shares over 10,000 batches: the general share equals the replay ratio and the
//! accept share equals the configured proportion, to 1e-3, including after the ratio is
//! raised at run time (as the rollback policy does).

use dreamloop::example::{Example, Kind, Message, Target};
use dreamloop::mix::{BatchPlan, MixConfig, Mixer, Pools};

fn example(kind: Kind, n: u64) -> Example {
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

#[derive(Default)]
struct Tally {
    general: u64,
    accept: u64,
    push_back: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.general + self.accept + self.push_back
    }
    fn general_share(&self) -> f64 {
        self.general as f64 / self.total() as f64
    }
    fn accept_share(&self) -> f64 {
        self.accept as f64 / (self.accept + self.push_back) as f64
    }
}

/// Runs `batches` batches, refilling the pools from the plan, and counts kinds from the
/// examples themselves (not from the plan).
fn run(mixer: &mut Mixer, batches: usize, batch_size: usize, counter: &mut u64) -> Tally {
    let mut pools = Pools::default();
    let mut tally = Tally::default();
    for _ in 0..batches {
        let BatchPlan {
            general,
            accept,
            push_back,
        } = mixer.plan();
        for (kind, n) in [
            (Kind::General, general),
            (Kind::ClearDirection, accept),
            (Kind::FlawedDirection, push_back),
        ] {
            for _ in 0..n {
                *counter += 1;
                pools.push(example(kind, *counter));
            }
        }
        let batch = mixer
            .next_batch(&mut pools)
            .expect("pools filled from the plan");
        assert_eq!(batch.examples.len(), batch_size);
        for e in &batch.examples {
            match e.kind {
                Kind::General => tally.general += 1,
                Kind::ClearDirection => tally.accept += 1,
                Kind::FlawedDirection => tally.push_back += 1,
            }
        }
    }
    tally
}

#[test]
fn shares_hold_over_10000_batches() {
    for (batch_size, ratio, accept) in
        [(8, 0.25, 0.5), (7, 0.3, 0.5), (5, 0.4, 0.6), (3, 0.1, 0.35)]
    {
        let mut mixer = Mixer::new(MixConfig {
            batch_size,
            replay_ratio: ratio,
            accept_share: accept,
        })
        .expect("valid");
        let tally = run(&mut mixer, 10_000, batch_size, &mut 0);
        assert_eq!(tally.total(), 10_000 * batch_size as u64);
        assert!(
            (tally.general_share() - ratio).abs() < 1e-3,
            "B={batch_size} ratio {ratio}: {}",
            tally.general_share()
        );
        assert!(
            (tally.accept_share() - accept).abs() < 1e-3,
            "B={batch_size} accept {accept}: {}",
            tally.accept_share()
        );
    }
}

#[test]
fn raised_ratio_takes_effect_at_run_time() {
    let mut mixer = Mixer::new(MixConfig {
        batch_size: 6,
        replay_ratio: 0.25,
        accept_share: 0.5,
    })
    .expect("valid");
    let mut counter = 0;
    let before = run(&mut mixer, 10_000, 6, &mut counter);
    assert!((before.general_share() - 0.25).abs() < 1e-3);
    mixer.set_replay_ratio(0.40).expect("valid");
    let after = run(&mut mixer, 10_000, 6, &mut counter);
    assert!(
        (after.general_share() - 0.40).abs() < 1e-3,
        "{}",
        after.general_share()
    );
    assert!((after.accept_share() - 0.5).abs() < 1e-3);
}

#[test]
fn same_inputs_same_batches() {
    let config = MixConfig {
        batch_size: 7,
        replay_ratio: 0.3,
        accept_share: 0.5,
    };
    let plans = |mut m: Mixer| -> Vec<BatchPlan> {
        let mut pools = Pools::default();
        let mut n = 0;
        (0..100)
            .map(|_| {
                let p = m.plan();
                for (kind, k) in [
                    (Kind::General, p.general),
                    (Kind::ClearDirection, p.accept),
                    (Kind::FlawedDirection, p.push_back),
                ] {
                    for _ in 0..k {
                        n += 1;
                        pools.push(example(kind, n));
                    }
                }
                m.next_batch(&mut pools).expect("filled").plan
            })
            .collect()
    };
    let a = plans(Mixer::new(config).expect("valid"));
    assert_eq!(a, plans(Mixer::new(config).expect("valid")));
    // B = 7 at 0.3: carries 2.1, 2.2, 2.3 … so 2 general until the carry reaches 3.
    assert_eq!(
        a.iter().take(10).map(|p| p.general).collect::<Vec<_>>(),
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    );
}
