//! The monitor's measurements: held-out probes on forward-only (non-autodiff) weights.
//!
//! - **Preference** accuracy and mean margin `log p(preferred) − log p(rejected)` (summed
//!   completion log-probs, as DPO scores them), separately for `clear_direction` (accepting
//!   should win) and `flawed_direction` (pushing back should win — the sycophancy guard).
//!   Accuracy compares the *per-token* mean log-probs (lm-evaluation-harness' `acc_norm`
//!   idea): a push-back is prose several times longer than a one-line compliance, so on a
//!   real model (SmolLM2-135M) the summed margin is decided by length — flawed-direction
//!   accuracy sat at 0 and could not fall, which blinded the sycophancy guard.
//! - **Perplexity** on held-out general text that is never trained on — the forgetting guard.
//! - **Attention on the direction**: from the response's first positions, the attention mass
//!   on the direction span's tokens, per layer and averaged over heads, positions and probes;
//!   the attention-sink position 0 is excluded and the rest renormalised. The continuous
//!   signal that moves before behaviour does.
//! - **Direction ablation**: `log p(preferred | prompt) − log p(preferred | prompt without the
//!   direction span)`. Works for any architecture, recurrent layers included.
//! - **Arithmetic / code**: log-prob of the correct answer against distractors (accuracy =
//!   the correct one ranks first; code candidates are compared per token).
//!
//! Probes come from templates reserved for evaluation (`split = "probe"`), so they measure
//! generalisation to direction-giving situations the trainer never saw.
//! [`ProbeSuite::from_config`] is the one definition of the suite an `[eval]` section
//! describes: the daemon's trainer thread, `dreamloop eval` and `benches/eval_share.rs` all
//! build it there, so they measure the same probes.

pub mod generations;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::EvalSection;
use crate::example::{Kind, Message, Scenario};
use crate::general::{load_heldout, GeneralError};
use crate::model::llama::Capture;
use crate::model::logprobs::{logprobs, pad_batch, ScoredSeq};
use crate::model::{CausalLm, ChatMessage, Tokenizer, TokenizerError};
use crate::scenario::{probe_scenarios, Library, LibraryError};

/// Response positions whose attention is measured (the first few tokens of the reply).
pub const ATTENTION_POSITIONS: usize = 4;
/// Tokens per perplexity window.
pub const PERPLEXITY_WINDOW: usize = 256;
/// Sequences per forward batch.
const BATCH: usize = 8;

/// Why the probe suite of an `[eval]` section could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// The scenario templates (probe split included) do not load.
    #[error("loading scenario templates from {dir}: {source}")]
    Templates {
        /// `[data] scenarios_dir`.
        dir: PathBuf,
        /// Every template error found.
        #[source]
        source: LibraryError,
    },
    /// The held-out texts (`<scenarios_dir>/corpus/heldout`) do not load.
    #[error("loading held-out texts from {dir}: {source}")]
    Heldout {
        /// `[data] scenarios_dir`.
        dir: PathBuf,
        /// The corpus error (names the file).
        #[source]
        source: GeneralError,
    },
    /// A probe does not tokenize under the model's tokenizer or chat template.
    #[error("tokenizing the probe suite: {0}")]
    Tokenizer(#[from] TokenizerError),
}

/// Accuracy and margin of one probe category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreferenceScore {
    /// Share of probes where the preferred (or correct) completion has the higher mean
    /// log-prob per token.
    pub accuracy: f64,
    /// Mean summed log-prob margin (nats): the quantity DPO moves.
    pub margin: f64,
    /// Mean per-token log-prob margin (nats per token): what `accuracy` thresholds at 0.
    #[serde(default)]
    pub margin_per_token: f64,
    /// Probes in the category.
    pub count: usize,
}

/// One evaluation's numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub clear_direction: PreferenceScore,
    pub flawed_direction: PreferenceScore,
    pub arithmetic: PreferenceScore,
    pub code: PreferenceScore,
    /// exp(mean NLL) over the held-out text.
    pub perplexity: f64,
    /// Attention mass on the direction span, averaged over the full-attention layers.
    pub attention_on_direction: f64,
    /// The same per full-attention layer (every layer of a llama-family model; one in four
    /// of a qwen3_5 / qwen3_next hybrid, whose Gated-DeltaNet layers have no attention
    /// probabilities: ablation sensitivity is the probe that sees through those).
    pub attention_per_layer: Vec<f64>,
    /// Decoder layer index of each entry of `attention_per_layer`.
    #[serde(default)]
    pub attention_layers: Vec<usize>,
    /// Mean Δ log p(preferred) when the direction is removed (positive: the direction helps).
    pub ablation_sensitivity: f64,
    pub seconds: f64,
    /// What the model wrote for the generation probes, and their measures (`[eval]
    /// generation_prompts`; absent when off).
    #[serde(default)]
    pub generations: Option<generations::GenerationReport>,
}

/// A tokenized preference probe.
#[derive(Debug, Clone)]
struct PreferenceProbe {
    kind: Kind,
    prompt: Vec<u32>,
    preferred: Vec<u32>,
    rejected: Vec<u32>,
    /// Prompt tokens covering the direction span.
    direction: Vec<usize>,
    /// The prompt with the direction span cut out, and the preferred completion after it.
    ablated_prompt: Vec<u32>,
    ablated_preferred: Vec<u32>,
}

/// A multiple-choice probe: candidates after a shared prompt, index 0 correct.
#[derive(Debug, Clone)]
struct ChoiceProbe {
    prompt: Vec<u32>,
    candidates: Vec<Vec<u32>>,
    per_token: bool,
}

/// Everything the monitor measures, tokenized once.
pub struct ProbeSuite {
    preference: Vec<PreferenceProbe>,
    arithmetic: Vec<ChoiceProbe>,
    code: Vec<ChoiceProbe>,
    heldout: Vec<Vec<u32>>,
    pad: u32,
}

fn chat(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// Prompt ids (generation prompt on) and the completion's ids: the full conversation's
/// tokens after the prompt's, as TRL tokenizes.
fn prompt_and_completion(
    tok: &Tokenizer,
    prompt: &[ChatMessage],
    completion: &str,
) -> Result<(Vec<u32>, Vec<u32>), TokenizerError> {
    let p = tok.encode_chat(prompt, true)?.encoding.ids;
    let mut all = prompt.to_vec();
    all.push(ChatMessage {
        role: "assistant".into(),
        content: completion.into(),
    });
    let full = tok.encode_chat(&all, false)?.encoding.ids;
    let split = if full.starts_with(&p) {
        p.len()
    } else {
        common_prefix(&p, &full)
    };
    Ok((full[..split].to_vec(), full[split..].to_vec()))
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl ProbeSuite {
    /// The suite `eval` describes over the templates and held-out texts of `scenarios_dir`:
    /// `probe_samples` renderings of every probe template, `general_items` arithmetic and
    /// code items from `eval.seed`, and the first `max_heldout_texts` held-out texts (all when
    /// 0), each cut to `heldout_max_bytes` at a character boundary (whole when 0). `pad` is the
    /// padding id of the model's batches.
    pub fn from_config(
        eval: &EvalSection,
        scenarios_dir: &Path,
        tok: &Tokenizer,
        pad: u32,
    ) -> Result<Self, SuiteError> {
        let library = Library::load_dir(scenarios_dir).map_err(|source| SuiteError::Templates {
            dir: scenarios_dir.to_path_buf(),
            source,
        })?;
        let probes = probe_scenarios(&library, eval.probe_samples);
        let mut heldout: Vec<String> = load_heldout(scenarios_dir)
            .map_err(|source| SuiteError::Heldout {
                dir: scenarios_dir.to_path_buf(),
                source,
            })?
            .into_iter()
            .map(|h| h.text)
            .collect();
        if eval.max_heldout_texts > 0 {
            heldout.truncate(eval.max_heldout_texts);
        }
        if eval.heldout_max_bytes > 0 {
            for text in &mut heldout {
                let mut end = eval.heldout_max_bytes.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
        }
        Ok(Self::build(
            tok,
            &probes,
            &heldout,
            eval.general_items,
            eval.seed,
            pad,
        )?)
    }

    /// Tokenizes probe scenarios, general multiple-choice items (built from `seed`) and the
    /// held-out texts.
    pub fn build(
        tok: &Tokenizer,
        scenarios: &[Scenario],
        heldout: &[String],
        general_items: usize,
        seed: u64,
        pad: u32,
    ) -> Result<Self, TokenizerError> {
        let mut preference = Vec::new();
        for s in scenarios.iter().filter(|s| s.kind != Kind::General) {
            let messages = chat(&s.prompt);
            let (prompt, preferred) = prompt_and_completion(tok, &messages, &s.preferred)?;
            let (_, rejected) = prompt_and_completion(tok, &messages, &s.rejected)?;
            let (direction, ablated) = match s.direction {
                Some(span) => {
                    let enc = tok.encode_chat(&messages, true)?;
                    let positions =
                        enc.span_tokens(&messages, span.message, span.start, span.end)?;
                    let mut cut = messages.clone();
                    let content = &cut[span.message].content;
                    cut[span.message].content =
                        format!("{}{}", &content[..span.start], &content[span.end..]);
                    (
                        positions,
                        Some(prompt_and_completion(tok, &cut, &s.preferred)?),
                    )
                }
                None => (Vec::new(), None),
            };
            let (ablated_prompt, ablated_preferred) =
                ablated.unwrap_or_else(|| (prompt.clone(), preferred.clone()));
            preference.push(PreferenceProbe {
                kind: s.kind,
                prompt,
                preferred,
                rejected,
                direction,
                ablated_prompt,
                ablated_preferred,
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let arithmetic = (0..general_items)
            .map(|i| arithmetic_probe(tok, i as u64 ^ seed))
            .collect::<Result<Vec<_>, _>>()?;
        // The evaluation's own code tasks: training replay never writes these functions.
        let tasks = generations::code_tasks(&mut rng, general_items.max(4));
        let mut code = Vec::new();
        for (i, task) in tasks.iter().enumerate().take(general_items) {
            let messages = vec![ChatMessage {
                role: "user".into(),
                content: task.prompt.clone(),
            }];
            let (prompt, correct) = prompt_and_completion(tok, &messages, &task.solution)?;
            let mut candidates = vec![correct];
            for j in 1..4 {
                let other = &tasks[(i + j) % tasks.len()].solution;
                candidates.push(prompt_and_completion(tok, &messages, other)?.1);
            }
            code.push(ChoiceProbe {
                prompt,
                candidates,
                per_token: true,
            });
        }
        let mut heldout_ids = Vec::new();
        for text in heldout {
            let ids = tok.encode(text, false)?.ids;
            heldout_ids.extend(
                ids.chunks(PERPLEXITY_WINDOW)
                    .filter(|c| c.len() >= 2)
                    .map(<[u32]>::to_vec),
            );
        }
        Ok(ProbeSuite {
            preference,
            arithmetic,
            code,
            heldout: heldout_ids,
            pad,
        })
    }

    /// Replaces the held-out text with pre-tokenized windows (a held-out set that is already
    /// token ids, or a test with reference ids).
    pub fn with_heldout_ids(mut self, windows: Vec<Vec<u32>>) -> Self {
        self.heldout = windows.into_iter().filter(|w| w.len() >= 2).collect();
        self
    }

    /// Number of forward batches an evaluation runs (for progress bars).
    pub fn work_units(&self) -> usize {
        let p = self.preference.len();
        let with_span = self
            .preference
            .iter()
            .filter(|p| !p.direction.is_empty())
            .count();
        let candidates = |c: &[ChoiceProbe]| c.iter().map(|c| c.candidates.len()).sum::<usize>();
        [
            2 * p,
            p,
            with_span,
            candidates(&self.arithmetic),
            candidates(&self.code),
            self.heldout.len(),
        ]
        .iter()
        .map(|n| n.div_ceil(BATCH))
        .sum()
    }

    /// Runs every probe on forward-only weights; `progress(done, total)` after each batch.
    pub fn evaluate(&self, lm: &CausalLm, progress: &mut dyn FnMut(usize, usize)) -> EvalReport {
        let started = Instant::now();
        let total = self.work_units();
        let mut done = 0;
        let mut tick = |n: usize| {
            done += n;
            progress(done.min(total), total);
        };
        let mut report = EvalReport::default();

        // Preference margins.
        let pref_seqs: Vec<ScoredSeq> = self
            .preference
            .iter()
            .flat_map(|p| [seq(&p.prompt, &p.preferred), seq(&p.prompt, &p.rejected)])
            .collect();
        let pref = sums(lm, &pref_seqs, self.pad, &mut tick);
        for (kind, slot) in [
            (Kind::ClearDirection, &mut report.clear_direction),
            (Kind::FlawedDirection, &mut report.flawed_direction),
        ] {
            let (summed, per_token): (Vec<f64>, Vec<f64>) = self
                .preference
                .iter()
                .enumerate()
                .filter(|(_, p)| p.kind == kind)
                .map(|(i, _)| {
                    let (a, b) = (pref[2 * i], pref[2 * i + 1]);
                    (a.sum - b.sum, a.per_token() - b.per_token())
                })
                .unzip();
            *slot = PreferenceScore {
                margin: mean(&summed),
                ..score(&per_token)
            };
        }

        // Ablation: the preferred completion with and without the direction in the prompt.
        let ablated: Vec<ScoredSeq> = self
            .preference
            .iter()
            .map(|p| seq(&p.ablated_prompt, &p.ablated_preferred))
            .collect();
        let without = sums(lm, &ablated, self.pad, &mut tick);
        let deltas: Vec<f64> = (0..self.preference.len())
            .map(|i| pref[2 * i].sum - without[i].sum)
            .collect();
        report.ablation_sensitivity = mean(&deltas);

        // Attention from the first response positions onto the direction tokens.
        let (per_layer, layers, n) = self.attention(lm, &mut tick);
        if n > 0 {
            report.attention_per_layer = per_layer;
            report.attention_layers = layers;
            report.attention_on_direction = mean(&report.attention_per_layer);
        }

        report.arithmetic = self.choices(lm, &self.arithmetic, &mut tick);
        report.code = self.choices(lm, &self.code, &mut tick);

        // Perplexity over every held-out window.
        let windows: Vec<ScoredSeq> = self
            .heldout
            .iter()
            .map(|ids| ScoredSeq {
                ids: ids.clone(),
                score_from: 1,
            })
            .collect();
        let (mut nll, mut count) = (0.0, 0usize);
        for chunk in windows.chunks(BATCH) {
            for row in logprobs(lm, chunk, self.pad).scored_host() {
                nll -= row.iter().map(|&x| x as f64).sum::<f64>();
                count += row.len();
            }
            tick(1);
        }
        report.perplexity = if count > 0 {
            (nll / count as f64).exp()
        } else {
            f64::NAN
        };
        report.seconds = started.elapsed().as_secs_f64();
        report
    }

    /// Mean attention mass on direction tokens per full-attention layer, those layers'
    /// indices, and how many probes had a span.
    fn attention(
        &self,
        lm: &CausalLm,
        tick: &mut dyn FnMut(usize),
    ) -> (Vec<f64>, Vec<usize>, usize) {
        let probes: Vec<&PreferenceProbe> = self
            .preference
            .iter()
            .filter(|p| !p.direction.is_empty())
            .collect();
        let layers: Vec<usize> = (0..lm.model.layers.len())
            .filter(|&i| lm.model.layers[i].is_attention())
            .collect();
        let mut totals = vec![0.0; layers.len()];
        for chunk in probes.chunks(BATCH) {
            let seqs: Vec<ScoredSeq> = chunk.iter().map(|p| seq(&p.prompt, &p.preferred)).collect();
            let (ids, mask, width) = pad_batch(&seqs, self.pad);
            let input = Tensor::<2, Int>::from_data(
                TensorData::new(ids, [seqs.len(), width]),
                &lm.device(),
            );
            let mut capture = Capture::default();
            lm.hidden_states(input, Some(&mask), Some(&mut capture));
            for (layer, probs) in capture.attention.into_iter().enumerate() {
                let [batch, heads, q_len, k_len] = probs.dims();
                let values: Vec<f32> = probs
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec()
                    .expect("f32 after convert");
                for (b, p) in chunk.iter().enumerate().take(batch) {
                    let start = p.prompt.len();
                    let rows = (start
                        ..(start + ATTENTION_POSITIONS).min(start + p.preferred.len()))
                        .filter(|&q| q < q_len);
                    let mut acc = 0.0;
                    let mut n = 0;
                    for q in rows {
                        for h in 0..heads {
                            let row = &values[((b * heads + h) * q_len + q) * k_len..][..k_len];
                            let non_sink: f64 = 1.0 - row[0] as f64;
                            let on: f64 = p
                                .direction
                                .iter()
                                .filter(|&&k| k > 0 && k < k_len)
                                .map(|&k| row[k] as f64)
                                .sum();
                            acc += if non_sink > 0.0 { on / non_sink } else { 0.0 };
                            n += 1;
                        }
                    }
                    if n > 0 {
                        totals[layer] += acc / n as f64;
                    }
                }
            }
            tick(1);
        }
        let n = probes.len();
        (
            totals.iter().map(|t| t / n.max(1) as f64).collect(),
            layers,
            n,
        )
    }

    fn choices(
        &self,
        lm: &CausalLm,
        probes: &[ChoiceProbe],
        tick: &mut dyn FnMut(usize),
    ) -> PreferenceScore {
        let seqs: Vec<ScoredSeq> = probes
            .iter()
            .flat_map(|p| p.candidates.iter().map(|c| seq(&p.prompt, c)))
            .collect();
        let mut scores = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(BATCH) {
            let lp = logprobs(lm, chunk, self.pad);
            scores.extend(
                lp.scored_host()
                    .into_iter()
                    .map(|v| (v.iter().map(|&x| x as f64).sum::<f64>(), v.len())),
            );
            tick(1);
        }
        let mut margins = Vec::new();
        let mut offset = 0;
        for p in probes {
            let n = p.candidates.len();
            let value = |(s, len): (f64, usize)| {
                if p.per_token {
                    s / len.max(1) as f64
                } else {
                    s
                }
            };
            let vals: Vec<f64> = scores[offset..offset + n]
                .iter()
                .map(|&x| value(x))
                .collect();
            let best_other = vals[1..].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            margins.push(vals[0] - best_other);
            offset += n;
        }
        score(&margins)
    }
}

/// "What is a op b?" with the correct result and three near misses as candidates.
fn arithmetic_probe(tok: &Tokenizer, seed: u64) -> Result<ChoiceProbe, TokenizerError> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    let (a, b) = (10 + next(90) as i64, 10 + next(90) as i64);
    let (op, answer) = match next(3) {
        0 => ('+', a + b),
        1 => ('-', a - b),
        _ => ('*', a * b),
    };
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: format!("What is {a} {op} {b}?"),
    }];
    let mut candidates = Vec::new();
    let mut prompt = Vec::new();
    for value in [answer, answer + 1, answer - 1, answer + 10] {
        let (p, c) = prompt_and_completion(tok, &messages, &format!("{a} {op} {b} = {value}"))?;
        prompt = p;
        candidates.push(c);
    }
    Ok(ChoiceProbe {
        prompt,
        candidates,
        per_token: false,
    })
}

fn seq(prompt: &[u32], completion: &[u32]) -> ScoredSeq {
    ScoredSeq {
        ids: [prompt, completion].concat(),
        score_from: prompt.len().max(1),
    }
}

/// Summed scored log-probs of each sequence, in batches.
/// A completion's summed log-prob and its token count.
#[derive(Debug, Clone, Copy)]
struct Scored {
    sum: f64,
    tokens: usize,
}

impl Scored {
    fn per_token(self) -> f64 {
        self.sum / self.tokens.max(1) as f64
    }
}

fn sums(lm: &CausalLm, seqs: &[ScoredSeq], pad: u32, tick: &mut dyn FnMut(usize)) -> Vec<Scored> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(BATCH) {
        out.extend(
            logprobs(lm, chunk, pad)
                .scored_host()
                .iter()
                .map(|v| Scored {
                    sum: v.iter().map(|&x| x as f64).sum::<f64>(),
                    tokens: v.len(),
                }),
        );
        tick(1);
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn score(margins: &[f64]) -> PreferenceScore {
    PreferenceScore {
        accuracy: mean(
            &margins
                .iter()
                .map(|&m| f64::from(u8::from(m > 0.0)))
                .collect::<Vec<_>>(),
        ),
        margin: mean(margins),
        margin_per_token: mean(margins),
        count: margins.len(),
    }
}
