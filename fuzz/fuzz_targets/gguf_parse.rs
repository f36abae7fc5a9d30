//! `cargo +nightly fuzz run gguf_parse`: arbitrary bytes through the GGUF reader and
//! everything downstream of a successful parse. Any panic is a bug; errors are expected.
#![no_main]

use dreamloop::model::gguf::llama::LlamaParams;
use dreamloop::model::gguf::tokenizer::hf_tokenizer;
use dreamloop::model::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data) {
        for t in &file.tensors {
            let _ = file.dequantize(t);
        }
        let _ = LlamaParams::from_gguf(&file);
        let _ = hf_tokenizer(&file, 16);
    }
});
