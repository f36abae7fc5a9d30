//! The GGUF reader and importer on the real SmolLM2-135M-Instruct Q4_1 file.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-smollm2.sh` puts it there);
//! each test prints a note and returns when it is absent. References:
//! `fixtures/smollm2_reference.json` (gguf-py dequantisation checksums, architecture, prompt
//! token ids from transformers) and `fixtures/smollm2_tokenizer/` (the tokenizer files
//! transformers 5.23 writes from this GGUF, and a rendered chat with its ids and offsets).

use dreamloop::model::gguf::llama::{hf_tensor, unpermute_qk_rows, LlamaParams};
use dreamloop::model::gguf::tokenizer::hf_tokenizer;
use dreamloop::model::gguf::{import_gguf, GgufFile};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn real_gguf() -> Option<Vec<u8>> {
    let path: PathBuf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            eprintln!(
                "skipping: {} is absent (run scripts/fetch-smollm2.sh)",
                path.display()
            );
            None
        }
    }
}

fn fixture(rel: &str) -> Value {
    let path = root().join("tests/fixtures").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn close(got: f64, want: f64, atol: f64, what: &str) {
    assert!(
        (got - want).abs() <= atol,
        "{what}: got {got}, want {want} (atol {atol})"
    );
}

#[test]
fn every_tensor_dequantizes_like_gguf_py() {
    let Some(bytes) = real_gguf() else { return };
    let file = GgufFile::parse(&bytes).unwrap();
    let reference = fixture("smollm2_reference.json");
    assert_eq!(
        bytes.len() as u64,
        reference["source"]["bytes"].as_u64().unwrap()
    );
    let checksums = reference["tensor_checksums"].as_array().unwrap();
    assert_eq!(file.tensors.len(), checksums.len());
    assert_eq!(file.version, 3);
    for c in checksums {
        let name = c["name"].as_str().unwrap();
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            info.ty.to_string(),
            c["ggml_type"].as_str().unwrap(),
            "{name}"
        );
        let dims: Vec<u64> = serde_json::from_value(c["gguf_shape(ne0 first)"].clone()).unwrap();
        assert_eq!(info.dims, dims, "{name}");
        let shape: Vec<usize> =
            serde_json::from_value(c["numpy_shape(row-major)"].clone()).unwrap();
        assert_eq!(info.row_major_shape(), shape, "{name}");

        let values = file.dequantize(info).unwrap();
        let (mut sum, mut sum_abs, mut sum_sq) = (0.0f64, 0.0f64, 0.0f64);
        for &v in &values {
            let v = f64::from(v);
            sum += v;
            sum_abs += v.abs();
            sum_sq += v * v;
        }
        let want_abs = c["sum_abs"].as_f64().unwrap();
        close(
            sum,
            c["sum"].as_f64().unwrap(),
            1e-9 * want_abs,
            &format!("{name} sum"),
        );
        close(
            sum_abs,
            want_abs,
            1e-9 * want_abs,
            &format!("{name} sum|x|"),
        );
        let want_sq = c["sum_sq"].as_f64().unwrap();
        close(sum_sq, want_sq, 1e-9 * want_sq, &format!("{name} sum x^2"));
        for (i, want) in c["first8"].as_array().unwrap().iter().enumerate() {
            assert_eq!(values[i], want.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        for (i, want) in c["at_flat_index"].as_object().unwrap() {
            let i: usize = i.parse().unwrap();
            assert_eq!(values[i], want.as_f64().unwrap() as f32, "{name}[{i}]");
        }
    }
}

#[test]
fn config_matches_reference_architecture() {
    let Some(bytes) = real_gguf() else { return };
    let file = GgufFile::parse(&bytes).unwrap();
    let arch = &fixture("smollm2_reference.json")["architecture"];
    let params = LlamaParams::from_gguf(&file).unwrap();
    let config = params.hf_config();
    for (key, arch_key) in [
        ("hidden_size", "embedding_length"),
        ("intermediate_size", "feed_forward_length"),
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "head_count"),
        ("num_key_value_heads", "head_count_kv"),
        ("head_dim", "head_dim"),
        ("max_position_embeddings", "context_length"),
        ("vocab_size", "vocab_size"),
        ("tie_word_embeddings", "tied_embeddings"),
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ] {
        assert_eq!(
            config[key], arch[arch_key],
            "config.json {key} vs architecture.{arch_key}"
        );
    }
    assert_eq!(
        config["rope_theta"].as_f64(),
        arch["rope_freq_base"].as_f64()
    );
    assert_eq!(
        config["rms_norm_eps"].as_f64(),
        arch["rms_norm_eps"].as_f64()
    );
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
}

/// Strings covering what a byte-level BPE with a digit split can get wrong.
fn tokenizer_corpus(chat: &Value, reference: &Value) -> Vec<String> {
    let mut texts: Vec<String> = vec![
        chat["rendered"].as_str().unwrap().into(),
        chat["plain_text"].as_str().unwrap().into(),
        "".into(),
        " ".into(),
        "     ".into(),
        "a   b\t\tc\n\n\nd \n e".into(),
        "   leading and trailing   ".into(),
        "12345 678.90 -42 3e-7 0x1F 1,000,000".into(),
        " 2024-01-01T12:34:56Z".into(),
        "x² + y³ = z⁴, ½ + ¼, ٣٤٥, ४२, ①②, Ⅻ".into(),
        "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!(\"{v:?}\");\n}\n".into(),
        "def f(x):\n\treturn x**2  # square\n".into(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n".into(),
        "text<|im_end|>more<|endoftext|><repo_name>x".into(),
        "I'm sure you'll see it's done, we've, they'd, I'LL, DON'T".into(),
        "日本語のテキスト、中文文本，한국어 텍스트".into(),
        "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧 ✓ ✗ → ←".into(),
        "Ünïcödé àccents: café naïve coöperate Øresund".into(),
        "mixed123abc 4you l33t h4x0r".into(),
        "\u{0}\u{1}\u{7f} control \r\n chars".into(),
        "https://example.com/path?q=1&r=2#frag".into(),
        "$$\\frac{a}{b}$$ and `code` and **bold**".into(),
        "     indented\n        more".into(),
        "....!!!???---___===+++".into(),
    ];
    for p in reference["prompts"].as_array().unwrap() {
        texts.push(p["rendered"].as_str().unwrap().into());
    }
    let pieces = [
        "the",
        " The",
        "cat",
        " 7",
        "9",
        "00",
        " ",
        "  ",
        "\n",
        "\t",
        "é",
        "ß",
        "中",
        "😀",
        "²",
        "'s",
        "'re",
        "don't",
        "<|im_end|>",
        "fn",
        "(",
        ")",
        "{",
        "}",
        ";",
        "=",
        "->",
        "_x",
        "ĠĠ",
        "Ġ",
        "\u{a0}",
        "\u{3000}",
        "٣",
        "Zürich",
        "x86_64",
        "3.14",
        "-",
        "@",
        "#",
    ];
    // Deterministic combinations (a linear congruential stream).
    let mut state = 12345u64;
    for _ in 0..300 {
        let mut t = String::new();
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = 1 + (state >> 33) as usize % 12;
        for _ in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t.push_str(pieces[(state >> 33) as usize % pieces.len()]);
        }
        texts.push(t);
    }
    texts
}

#[test]
fn tokenizer_encodes_like_transformers() {
    let Some(bytes) = real_gguf() else { return };
    let file = GgufFile::parse(&bytes).unwrap();
    let hf = hf_tokenizer(&file, 8192).unwrap();
    let ours: Tokenizer = serde_json::to_string(&hf.tokenizer_json)
        .unwrap()
        .parse()
        .unwrap();
    let reference =
        Tokenizer::from_file(root().join("tests/fixtures/smollm2_tokenizer/tokenizer.json"))
            .unwrap();
    let chat = fixture("smollm2_tokenizer/chat_reference.json");
    let smol = fixture("smollm2_reference.json");

    // The stored ids and offsets.
    let rendered = ours
        .encode(chat["rendered"].as_str().unwrap(), false)
        .unwrap();
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(rendered.get_ids(), want.as_slice());
    let plain = ours
        .encode(chat["plain_text"].as_str().unwrap(), false)
        .unwrap();
    let want: Vec<u32> = serde_json::from_value(chat["plain_ids"].clone()).unwrap();
    assert_eq!(plain.get_ids(), want.as_slice());
    let want: Vec<(usize, usize)> = serde_json::from_value(chat["plain_offsets"].clone()).unwrap();
    assert_eq!(plain.get_offsets(), want.as_slice());
    for p in smol["prompts"].as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(p["token_ids"].clone()).unwrap();
        let got = ours.encode(p["rendered"].as_str().unwrap(), false).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "prompt {}", p["name"]);
    }

    // Same ids, offsets and decoding as transformers' tokenizer.json on a varied corpus.
    let corpus = tokenizer_corpus(&chat, &smol);
    assert!(corpus.len() > 300);
    for text in &corpus {
        for add_special in [false, true] {
            let a = ours.encode(text.as_str(), add_special).unwrap();
            let b = reference.encode(text.as_str(), add_special).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "ids of {text:?}");
            assert_eq!(a.get_offsets(), b.get_offsets(), "offsets of {text:?}");
        }
        let ids = reference
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            ours.decode(&ids, false).unwrap(),
            reference.decode(&ids, false).unwrap()
        );
    }
    assert_eq!(ours.get_vocab_size(true), reference.get_vocab_size(true));
    assert_eq!(
        ours.get_added_tokens_decoder(),
        reference.get_added_tokens_decoder()
    );

    // Chat template and special tokens.
    let template = std::fs::read_to_string(
        root().join("tests/fixtures/smollm2_tokenizer/chat_template.jinja"),
    )
    .unwrap();
    assert_eq!(hf.chat_template.as_deref(), Some(template.as_str()));
    let want_config = fixture("smollm2_tokenizer/tokenizer_config.json");
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        assert_eq!(hf.tokenizer_config[key], want_config[key], "{key}");
    }
    assert_eq!(hf.tokenizer_config["add_bos_token"], false);
    let mut env = minijinja::Environment::new();
    env.add_template("chat", &template).unwrap();
    let rendered = env
        .get_template("chat")
        .unwrap()
        .render(minijinja::context! {
            messages => chat["messages"].clone(),
            add_generation_prompt => chat["add_generation_prompt"].clone(),
        })
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
}

#[test]
fn import_writes_hf_checkpoint() {
    let Some(bytes) = real_gguf() else { return };
    let file = GgufFile::parse(&bytes).unwrap();
    let params = LlamaParams::from_gguf(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let report = import_gguf(&root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), &out).unwrap();
    assert_eq!(report.tensors, 272);
    assert_eq!(report.parameters, 134_515_008);

    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.len(), 272);
    assert!(st.tensor("lm_head.weight").is_err());
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for info in &file.tensors {
        let target = hf_tensor(&info.name, &params).unwrap();
        let view = st.tensor(&target.name).unwrap();
        assert_eq!(
            view.shape(),
            info.row_major_shape().as_slice(),
            "{}",
            target.name
        );
        let mut want = file.dequantize(info).unwrap();
        if let Some(heads) = target.unpermute_heads {
            let [rows, cols] = [info.dims[1] as usize, info.dims[0] as usize];
            want = unpermute_qk_rows(&want, rows, cols, heads).unwrap();
        }
        assert_eq!(f32s(&target.name), want, "{}", target.name);
    }
    // K of layer 0: HF row 32 (second rotate-half component of head 0) is GGUF row 1.
    let k_gguf = file
        .dequantize(file.tensor("blk.0.attn_k.weight").unwrap())
        .unwrap();
    let k_hf = f32s("model.layers.0.self_attn.k_proj.weight");
    assert_eq!(k_hf[32 * 576..33 * 576], k_gguf[576..2 * 576]);
    assert_eq!(
        k_hf[64 * 576 + 33 * 576..64 * 576 + 34 * 576],
        k_gguf[64 * 576 + 3 * 576..64 * 576 + 4 * 576]
    );

    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config, params.hf_config());
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let chat = fixture("smollm2_tokenizer/chat_reference.json");
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(
        tok.encode(chat["rendered"].as_str().unwrap(), false)
            .unwrap()
            .get_ids(),
        want.as_slice()
    );
}

/// xorshift64*: a deterministic stream for the fuzz loop (the field is the state).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzz_real_header_region_never_panics() {
    let Some(bytes) = real_gguf() else { return };
    let header_end = GgufFile::parse(&bytes).unwrap().data_offset as usize;
    // The first MiB covers the header, the 49152 tokens and most of the merges.
    let region = &bytes[..(1 << 20).min(header_end)];
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for case in 0..400 {
        let len = if case % 4 == 0 {
            rng.below(region.len())
        } else {
            region.len()
        };
        let mut b = region[..len].to_vec();
        if case % 4 != 0 {
            for _ in 0..1 + rng.below(6) {
                // Most edits near the start, where the counts and lengths live.
                let at = if rng.below(2) == 0 {
                    rng.below(4096.min(b.len()))
                } else {
                    rng.below(b.len())
                };
                match rng.below(3) {
                    0 => b[at] = rng.next() as u8,
                    1 => b[at] ^= 1 << rng.below(8),
                    _ => {
                        let end = (at + 8).min(b.len());
                        let v = rng.next().to_le_bytes();
                        b[at..end].copy_from_slice(&v[..end - at]);
                    }
                }
            }
        }
        // Mostly an error (the region stops before the tensor data), but a mutated count can
        // make a shorter file that parses; then the tokenizer builder gets to run on it.
        if let Ok(file) = GgufFile::parse(&b) {
            let _ = hf_tokenizer(&file, 8192);
            let _ = LlamaParams::from_gguf(&file);
        }
    }
}
