//! Conversation-log files as operators really handle them (issue 15 #10, #11): rotated by
//! rename, rewritten in place, left with a huge unterminated tail, or linked to a file
//! elsewhere. Each case checks what was read, with which `file:line`, against the lines
//! written.

use std::fs;
use std::io::Write;
use std::path::Path;

use dreamloop::convo::{ConvoConfig, ConvoReader, Poll};

fn line(i: usize, words: &str) -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"{words} {i}"}},{{"role":"assistant","content":"ok"}}]}}"#
    ) + "\n"
}

fn lines(n: usize, words: &str) -> String {
    (1..=n).map(|i| line(i, words)).collect()
}

/// (line number, user text) of every conversation read, in order.
fn read(poll: &Poll) -> Vec<(u64, String)> {
    poll.conversations
        .iter()
        .map(|c| {
            let n = c.source.rsplit(':').next().unwrap().parse().unwrap();
            (n, c.messages[0].content.clone())
        })
        .collect()
}

fn expected(n: usize, words: &str) -> Vec<(u64, String)> {
    (1..=n)
        .map(|i| (i as u64, format!("{words} {i}")))
        .collect()
}

fn rewrite_in_place(path: &Path, text: &str) {
    // Same inode: truncate and write, as an editor that saves in place does.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn a_log_rewritten_in_place_is_read_again_from_line_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    fs::write(&path, lines(100, "short")).unwrap();
    let mut reader = ConvoReader::open(dir.path(), None, ConvoConfig::default()).unwrap();
    assert_eq!(read(&reader.poll().unwrap()), expected(100, "short"));
    let ino = fs::metadata(&path).unwrap();
    // Longer than before, so a length check alone sees nothing wrong.
    rewrite_in_place(&path, &lines(100, "a much longer question"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino.ino());
    assert_eq!(
        read(&reader.poll().unwrap()),
        expected(100, "a much longer question")
    );
    assert_eq!(reader.cursor().files["chat.jsonl"].line, 100);
    assert!(reader.poll().unwrap().conversations.is_empty());
}

#[test]
fn a_log_rotated_by_rename_is_read_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    fs::write(&path, lines(10, "old")).unwrap();
    let mut reader = ConvoReader::open(dir.path(), None, ConvoConfig::default()).unwrap();
    assert_eq!(read(&reader.poll().unwrap()), expected(10, "old"));
    fs::rename(&path, dir.path().join("chat.jsonl.1")).unwrap();
    fs::write(&path, lines(12, "the new file's line")).unwrap();
    assert_eq!(
        read(&reader.poll().unwrap()),
        expected(12, "the new file's line")
    );
    assert_eq!(reader.cursor().files["chat.jsonl"].line, 12);
}

#[test]
fn an_unterminated_huge_tail_is_scanned_once_and_polls_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    fs::write(&path, line(1, "first")).unwrap();
    let first_len = fs::metadata(&path).unwrap().len();
    // 8 GiB, sparse: one endless unterminated line of zero bytes after line 1.
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(first_len + (8 << 30))
        .unwrap();
    let config = ConvoConfig {
        max_line_bytes: 4096,
        max_poll_bytes: 1 << 20,
        ..ConvoConfig::default()
    };
    let mut reader = ConvoReader::open(dir.path(), None, config).unwrap();
    assert_eq!(read(&reader.poll().unwrap()), expected(1, "first"));
    let after_first = reader.cursor().files["big.jsonl"];
    assert_eq!(after_first.offset, first_len);
    let mut scanned = after_first.scanned;
    for _ in 0..3 {
        reader.poll().unwrap();
        let pos = reader.cursor().files["big.jsonl"];
        // Each poll goes on where the last stopped (not from the line's start), and reads
        // its share (1 MiB, give or take one 64 KiB buffer) and no more.
        assert_eq!(pos.offset, first_len);
        let delta = pos.scanned - scanned;
        assert!((1 << 20..=(1 << 20) + 65536).contains(&delta), "{delta}");
        scanned = pos.scanned;
    }

    // A small file whose tail gets its newline later: the over-long line is reported with
    // its number, the next line read with its own.
    let small = dir.path().join("small.jsonl");
    fs::remove_file(&path).unwrap();
    fs::write(&small, "x".repeat(10_000)).unwrap();
    let mut reader = ConvoReader::open(dir.path(), None, config).unwrap();
    assert!(reader.poll().unwrap().conversations.is_empty());
    assert_eq!(reader.cursor().files["small.jsonl"].scanned, 10_000);
    let mut f = fs::OpenOptions::new().append(true).open(&small).unwrap();
    f.write_all(b"\n").unwrap();
    f.write_all(line(2, "after").as_bytes()).unwrap();
    let poll = reader.poll().unwrap();
    assert_eq!(poll.malformed.len(), 1);
    assert_eq!(poll.malformed[0].line, 1);
    assert!(
        poll.malformed[0].reason.contains("10000 bytes"),
        "{}",
        poll.malformed[0].reason
    );
    assert_eq!(read(&poll), vec![(2, "after 2".to_string())]);
}

#[test]
fn symbolic_links_in_the_log_directory_are_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.jsonl");
    fs::write(&secret, lines(3, "private")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&secret, dir.path().join("link.jsonl")).unwrap();
    fs::write(dir.path().join("real.jsonl"), lines(2, "real")).unwrap();
    let mut reader = ConvoReader::open(dir.path(), None, ConvoConfig::default()).unwrap();
    let poll = reader.poll().unwrap();
    assert_eq!(read(&poll), expected(2, "real"));
    assert!(!reader.cursor().files.contains_key("link.jsonl"));
}

/// Issue 15 #12: one ShareGPT line of 6,000 labelled turn pairs (under the 1 MiB line cap)
/// used to yield ~3.9 GB of examples, each repeating everything before it. The examples of
/// one line are now bounded in bytes, the first ones are exactly what they were, and the
/// rest of the line is reported as not labeled.
#[test]
fn a_very_long_conversation_costs_a_bounded_amount() {
    use dreamloop::example::Target;
    use dreamloop::label::{LabelConfig, Labeler, MAX_CONVERSATION_EXAMPLE_BYTES};
    let turns: Vec<String> = (0..6000)
        .map(|i| {
            format!(
                r#"{{"from":"human","value":"q{i}"}},{{"from":"gpt","value":"a{i}","label":"good"}}"#
            )
        })
        .collect();
    let text = format!(r#"{{"conversations":[{}]}}"#, turns.join(","));
    assert!(text.len() < 1 << 20);
    let c = dreamloop::convo::parse_line(&text, "long.jsonl:1".into()).unwrap();
    let labeled = Labeler::new(&LabelConfig::default()).conversation(&c);
    let bytes: usize = labeled
        .examples
        .iter()
        .map(|e| {
            let prompt: usize = e
                .prompt
                .iter()
                .map(|m| m.role.len() + m.content.len())
                .sum();
            let target = match &e.target {
                Target::Sft { completion } => completion.len(),
                Target::Dpo { chosen, rejected } => chosen.len() + rejected.len(),
            };
            prompt + target
        })
        .sum();
    assert!(bytes <= MAX_CONVERSATION_EXAMPLE_BYTES, "{bytes}");
    let n = labeled.examples.len();
    assert!(n > 100 && n < 6000, "{n} examples");
    // Example k answers turn pair k with the whole conversation before it.
    for (k, e) in labeled.examples.iter().enumerate().step_by(97) {
        assert_eq!(e.prompt.len(), 2 * k + 1);
        assert_eq!(e.prompt[2 * k].content, format!("q{k}"));
        assert_eq!(
            e.target,
            Target::Sft {
                completion: format!("a{k}")
            }
        );
    }
    assert_eq!(labeled.skipped.len(), 1, "{:?}", labeled.skipped);
    assert!(
        labeled.skipped[0].contains("long.jsonl:1"),
        "{}",
        labeled.skipped[0]
    );
}
