//! Embedded models that need no download: a named preset is a `config.json`, a byte-level
//! tokenizer with a ChatML template, and weights drawn from a seed.
//!
//! `tiny` is what the README's main command and the daemon's out-of-the-box run use: small
//! enough to train on a laptop CPU, shaped like the real thing (GQA, tied embeddings,
//! ChatML). Its weights follow transformers' `_init_weights` for llama: linear and embedding
//! weights ~ N(0, initializer_range²), RMSNorm weights 1.
//!
//! `tiny-hybrid` is the operator's model family in miniature: a `qwen3_5_text` decoder of
//! three Gated-DeltaNet layers and one gated full-attention layer, with the same tokenizer.
//! Its init follows transformers' for qwen3_5: zero-centred norms 0 (the gated GDN norm 1),
//! `dt_bias` 1, `A_log = log U(1, 16)`.

use serde_json::json;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};

use super::weights::{TensorSource, WeightError};

/// ChatML, as SmolLM2 and Qwen use it, without a default system prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of the byte-level tokenizer, after the 256 byte ids.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Names of the presets [`preset_config`] knows.
pub const PRESETS: [&str; 2] = ["tiny", "tiny-hybrid"];

/// The `config.json` of a named preset.
pub fn preset_config(name: &str) -> Option<serde_json::Value> {
    match name {
        // 256 bytes + 3 specials, rounded up to a multiple of 64 for matmul shapes.
        // 4 layers × (attn 4·128·32·… ) ≈ 0.9 M parameters: a training step is ~50 ms on CPU.
        "tiny" => Some(json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 320,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "initializer_range": 0.02,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 257,
            "eos_token_id": 258,
            "pad_token_id": 258,
            "torch_dtype": "float32"
        })),
        "tiny-hybrid" => Some(json!({
            "architectures": ["Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_text",
            "vocab_size": 320,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25
            },
            "max_position_embeddings": 2048,
            "initializer_range": 0.02,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "bos_token_id": 257,
            "eos_token_id": 258,
            "pad_token_id": 258,
            "torch_dtype": "float32"
        })),
        _ => None,
    }
}

/// GPT-2's byte → printable-character map (`bytes_to_unicode`), which byte-level BPE
/// vocabularies are written in.
fn byte_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        map[*b as usize] = char::from_u32(c).expect("GPT-2 byte map stays in the BMP");
    }
    map
}

/// A `tokenizer.json` that maps every byte to its own id (0..256) and the ChatML specials to
/// 256..259: no merges, so any text — any bytes — round-trips.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let map = byte_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (b, c) in map.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vocab.insert(t.to_string(), json!(256 + i));
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// `tokenizer_config.json` for the byte tokenizer.
pub fn byte_tokenizer_config() -> serde_json::Value {
    json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE
    })
}

/// SplitMix64: a tiny, portable, seedable generator (same numbers on every platform).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal by Box–Muller.
    fn next_normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Seeded initial weights: every tensor gets its own stream, derived from the seed and its
/// name, so the same preset and seed give the same model whatever the load order.
pub struct SeededInit {
    pub seed: u64,
    pub std: f64,
    pub device: Device,
    /// The model's RMSNorms scale by `1 + w` (hybrid families): their weights start at 0.
    pub zero_centred_norms: bool,
}

impl TensorSource for SeededInit {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        let len: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("linear_attn.norm.weight") {
            // The GDN output norm is a plain-`w` gated RMSNorm.
            vec![1.0; len]
        } else if name.ends_with("norm.weight") {
            vec![if self.zero_centred_norms { 0.0 } else { 1.0 }; len]
        } else if name.ends_with("dt_bias") {
            vec![1.0; len]
        } else if name.ends_with("A_log") {
            // log of evenly spread rates in [1, 16] (transformers draws them from U(0, 16)).
            (0..len)
                .map(|i| (1.0 + 15.0 * (i as f32 + 0.5) / len as f32).ln())
                .collect()
        } else if name.ends_with(".bias") {
            vec![0.0; len]
        } else {
            // FNV-1a of the name, mixed with the seed.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in name.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
            }
            let mut rng = SplitMix64(h ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            (0..len)
                .map(|_| (rng.next_normal() * self.std) as f32)
                .collect()
        };
        Ok(TensorData::new(values, shape.to_vec()))
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn finish(&mut self) -> Result<(), WeightError> {
        Ok(())
    }
}

/// Random weights drawn on the device itself in `dtype`: every matrix ~ N(0, std²) from the
/// device's own generator, the vectors (norms, biases, `A_log`, `dt_bias`) and the GDN conv
/// kernels as [`SeededInit`] makes them. For shape-only work on a GPU (`dreamloop
/// device-check step` on a 27B-shaped model): drawing 27 billion normals on the host and
/// copying them over would take minutes. Not reproducible across backends, so nothing that
/// compares numbers uses it.
pub struct DeviceInit {
    pub std: f64,
    pub device: Device,
    pub dtype: DType,
    /// As [`SeededInit::zero_centred_norms`].
    pub zero_centred_norms: bool,
}

impl DeviceInit {
    fn host(&self) -> SeededInit {
        SeededInit {
            seed: 0,
            std: self.std,
            device: self.device.clone(),
            zero_centred_norms: self.zero_centred_norms,
        }
    }
}

impl TensorSource for DeviceInit {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, WeightError> {
        self.host().take(name, shape)
    }

    fn take2(&mut self, _name: &str, shape: [usize; 2]) -> Result<Tensor<2>, WeightError> {
        // Only matrices come through here (embeddings, projections, the head), and SeededInit
        // draws every matrix from N(0, std²) too.
        Ok(Tensor::random(
            shape,
            Distribution::Normal(0.0, self.std),
            (&self.device, self.dtype),
        ))
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn finish(&mut self) -> Result<(), WeightError> {
        Ok(())
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
