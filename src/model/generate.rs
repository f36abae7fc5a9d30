//! Chat-templated text generation with a KV cache: greedy by default, temperature and
//! nucleus (top-p) sampling on request, so an operator can ask the trained model what it now
//! says. The prompt is run once; every new token costs one cached step.

use burn::tensor::{Int, Tensor, TensorData};

use super::llama::{CausalLm, KvCache};
use super::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Seed of the sampler (ignored when greedy).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: 256,
            seed: 0,
        }
    }
}

/// Generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    /// True when generation stopped at an end-of-sequence token.
    pub stopped: bool,
}

/// Continues `prompt_ids` until an id in `stop` or `max_new_tokens`.
pub fn generate_ids(
    lm: &CausalLm,
    prompt_ids: &[u32],
    stop: &[u32],
    sampling: &Sampling,
) -> (Vec<u32>, bool) {
    let device = lm.device();
    let mut cache = KvCache::default();
    let mut rng = sampling.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut input: Vec<u32> = prompt_ids.to_vec();
    let mut out = Vec::new();
    for _ in 0..sampling.max_new_tokens {
        let n = input.len();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(input.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        );
        let logits = lm.forward_cached(ids, &mut cache);
        let [_, _, vocab] = logits.dims();
        let last: Vec<f32> = logits
            .narrow(1, n - 1, 1)
            .reshape([vocab])
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 after convert");
        let next = pick(&last, sampling, &mut rng);
        if stop.contains(&next) {
            return (out, true);
        }
        out.push(next);
        input = vec![next];
    }
    (out, false)
}

/// Renders `messages` with the chat template (generation prompt on) and generates a reply.
pub fn chat(
    lm: &CausalLm,
    tok: &Tokenizer,
    messages: &[ChatMessage],
    stop: &[u32],
    sampling: &Sampling,
) -> Result<Generation, TokenizerError> {
    let prompt = tok.encode_chat(messages, true)?;
    let (ids, stopped) = generate_ids(lm, &prompt.encoding.ids, stop, sampling);
    let text = tok.decode(&ids, true)?;
    Ok(Generation { ids, text, stopped })
}

fn next_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Greedy argmax, or a temperature/top-p sample.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut u64) -> u32 {
    if sampling.temperature <= 0.0 {
        // First maximum wins, like torch.argmax.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - max) / sampling.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (k, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= sampling.top_p {
            cut = k + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = next_unit(rng) * mass;
    for p in probs {
        if u < p.1 {
            return p.0 as u32;
        }
        u -= p.1;
    }
    probs[probs.len() - 1].0 as u32
}
