//! SmolLM2's real tokenizer files (as transformers wrote them) reproduce transformers'
//! `apply_chat_template` output and token ids (`chat_reference.json`), and a direction span
//! inside a message maps to the right token positions.

use std::path::Path;

use dreamloop::model::{cpu, ChatMessage, Model, Tokenizer};
use serde_json::Value;

fn smollm2() -> (Tokenizer, Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokenizer");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("chat_reference.json")).unwrap()).unwrap();
    (Tokenizer::from_dir(&dir).unwrap(), reference)
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn chat_template_renders_and_tokenizes_like_transformers() {
    let (tok, r) = smollm2();
    let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
    let add = r["add_generation_prompt"].as_bool().unwrap();
    assert_eq!(
        tok.render_chat(&messages, add).unwrap(),
        r["rendered"].as_str().unwrap()
    );
    let enc = tok.encode_chat(&messages, add).unwrap();
    assert_eq!(enc.encoding.ids, u32s(&r["ids"]));
}

#[test]
fn plain_text_ids_and_offsets() {
    let (tok, r) = smollm2();
    let enc = tok
        .encode(r["plain_text"].as_str().unwrap(), false)
        .unwrap();
    assert_eq!(enc.ids, u32s(&r["plain_ids"]));
    let offsets: Vec<(usize, usize)> = r["plain_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(enc.offsets, offsets);
}

#[test]
fn default_system_prompt_is_added_by_the_template() {
    let (tok, _) = smollm2();
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let text = tok.render_chat(&messages, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// "Don't suggest alternatives." in the reference chat's user turn is the direction span;
/// its tokens in the reference ids are `4250, 982, 1820, 8837, 30` at positions 22..27.
#[test]
fn direction_span_maps_to_token_positions() {
    let (tok, r) = smollm2();
    let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
    let enc = tok.encode_chat(&messages, true).unwrap();
    let content = &messages[1].content;
    let start = content.find("Don't").unwrap();
    let end = content.len();
    let positions = enc.span_tokens(&messages, 1, start, end).unwrap();
    let ids = u32s(&r["ids"]);
    let span_ids: Vec<u32> = positions.iter().map(|&p| ids[p]).collect();
    assert_eq!(positions, (22..27).collect::<Vec<_>>());
    assert_eq!(
        tok.decode(&span_ids, false).unwrap(),
        " Don't suggest alternatives."
    );

    // "ripgrep" (bytes 4..11 of the first user message) covers tokens " rip", "g", "rep" at 14..17.
    let positions = enc.span_tokens(&messages, 1, 4, 11).unwrap();
    assert_eq!(positions, vec![14, 15, 16]);
    assert!(enc.span_tokens(&messages, 1, 4, 999).is_err());
}

#[test]
fn preset_tokenizer_is_byte_level_with_chatml() {
    let model = Model::preset("tiny", 0, &cpu()).unwrap();
    let tok = model.tokenizer.as_ref().unwrap();
    let text = "héllo, wörld ✓";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(enc.ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&enc.ids, false).unwrap(), text);
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let enc = tok.encode_chat(&messages, true).unwrap();
    assert_eq!(
        enc.text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(enc.encoding.ids[0], 257);
    assert_eq!(
        enc.encoding.ids[enc.encoding.ids.len() - 13],
        258,
        "<|im_end|> is one token"
    );
}
