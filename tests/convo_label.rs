//! Conversation logs → examples, case by case on the fixture logs in
//! `tests/fixtures/data/convo/` (corrections, annotations, good turns, and a file of
//! broken lines), the persisted cursor across a restart, and a no-panic run over the
//! conversation corpus in `tests/fixtures/convo/`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use dreamloop::convo::{ConvoConfig, ConvoReader, Poll};
use dreamloop::example::{Example, Kind, Message, Target};
use dreamloop::label::{LabelConfig, Labeler, Phase};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/convo")
}

/// The fixture logs copied into a scratch directory (the restart test appends to them).
fn scratch_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(fixture_dir()).expect("fixtures") {
        let path = entry.expect("entry").path();
        fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    dir
}

const CAP: ConvoConfig = ConvoConfig {
    max_line_bytes: 4096,
    take_unterminated_last_line: false,
    max_poll_bytes: 64 << 20,
};

fn dpo() -> Labeler {
    Labeler::new(&LabelConfig {
        phase: Phase::Dpo,
        ..LabelConfig::default()
    })
}

fn user(s: &str) -> Message {
    Message::new("user", s)
}

fn assistant(s: &str) -> Message {
    Message::new("assistant", s)
}

fn pair(chosen: &str, rejected: &str) -> Target {
    Target::Dpo {
        chosen: chosen.into(),
        rejected: rejected.into(),
    }
}

fn source_of(poll: &Poll, file: &str, line: u64) -> String {
    let c = poll
        .conversations
        .iter()
        .find(|c| c.source.ends_with(&format!("{file}:{line}")))
        .unwrap_or_else(|| panic!("{file}:{line} was read"));
    c.source.clone()
}

fn examples_of(
    poll: &Poll,
    labeler: &Labeler,
    file: &str,
    line: u64,
) -> (Vec<Example>, Vec<String>) {
    let c = poll
        .conversations
        .iter()
        .find(|c| c.source.ends_with(&format!("{file}:{line}")))
        .unwrap_or_else(|| panic!("{file}:{line} was read"));
    let labeled = labeler.conversation(c);
    (labeled.examples, labeled.skipped)
}

#[test]
fn reads_every_good_line_and_reports_bad_ones() {
    let dir = scratch_copy();
    let mut reader = ConvoReader::open(dir.path(), None, CAP).expect("open");
    let poll = reader.poll().expect("poll");
    // annotations 5 + broken 2 (lines 1 and 7) + corrections 6.
    assert_eq!(poll.conversations.len(), 13);
    let malformed: Vec<(String, u64, String)> = poll
        .malformed
        .iter()
        .map(|m| {
            (
                m.file
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                m.line,
                m.reason.clone(),
            )
        })
        .collect();
    let expect = [
        (2, "invalid JSON"),
        (3, "message 0: missing `role`"),
        (4, "invalid UTF-8 at byte 42"),
        (6, "over the cap of 4096"),
    ];
    assert_eq!(malformed.len(), expect.len(), "{malformed:?}");
    for ((file, line, reason), (want_line, want)) in malformed.iter().zip(expect) {
        assert_eq!((file.as_str(), *line), ("broken.jsonl", want_line));
        assert!(reason.contains(want), "line {line}: {reason}");
    }
    let shown = poll.malformed[0].to_string();
    assert!(
        shown.ends_with(
            "broken.jsonl:2: invalid JSON: EOF while parsing a list at line 1 column 43"
        ),
        "{shown}"
    );
    // The partial last line (no newline yet) is not consumed.
    let broken = fs::read(dir.path().join("broken.jsonl")).expect("read");
    let partial = broken.len() - broken.iter().rposition(|&b| b == b'\n').expect("newline") - 1;
    let pos = reader.cursor().files["broken.jsonl"];
    assert_eq!((pos.offset, pos.line), ((broken.len() - partial) as u64, 7));
    // A second poll finds nothing new.
    assert_eq!(reader.poll().expect("poll"), Poll::default());

    // Reading finished files, the unterminated last line is read (and here is broken).
    let finished = ConvoConfig {
        take_unterminated_last_line: true,
        ..CAP
    };
    let mut reader = ConvoReader::open(dir.path(), None, finished).expect("open");
    let poll = reader.poll().expect("poll");
    assert_eq!(poll.conversations.len(), 13);
    let last = poll.malformed.last().expect("line 8 reported");
    assert_eq!(last.line, 8);
    assert!(
        last.reason
            .starts_with("invalid JSON: EOF while parsing a string"),
        "{last}"
    );
    let pos = reader.cursor().files["broken.jsonl"];
    assert_eq!((pos.offset, pos.line), (broken.len() as u64, 8));
}

#[test]
fn corrections_give_pairs() {
    let dir = scratch_copy();
    let poll = ConvoReader::open(dir.path(), None, CAP)
        .expect("open")
        .poll()
        .expect("poll");
    let l = dpo();

    let (ex, _) = examples_of(&poll, &l, "corrections.jsonl", 1);
    assert_eq!(ex.len(), 1);
    assert_eq!(
        ex[0].prompt,
        [
            Message::new("system", "You edit code."),
            user("Rename `x` to `count` in utils.py.")
        ]
    );
    assert_eq!(
        ex[0].target,
        pair(
            "Renamed `x` to `count` in utils.py.",
            "Before that, consider turning utils.py into a class."
        )
    );
    assert_eq!(ex[0].kind, Kind::ClearDirection);
    assert_eq!(
        ex[0].provenance,
        format!("{}#turn=2", source_of(&poll, "corrections.jsonl", 1))
    );

    let (ex, _) = examples_of(&poll, &l, "corrections.jsonl", 2);
    assert_eq!(ex.len(), 1, "\"I said …\" is a correction");
    assert_eq!(
        ex[0].target,
        pair(
            "Added --dry-run to deploy.sh.",
            "You could use a config file instead of a flag."
        )
    );

    let (ex, _) = examples_of(&poll, &l, "corrections.jsonl", 3);
    assert_eq!(ex.len(), 1, "ShareGPT, \"Stop suggesting …\"");
    assert_eq!(ex[0].prompt, [user("Indent with tabs.")]);
    assert_eq!(
        ex[0].target,
        pair(
            "Switched the file to tabs.",
            "Spaces are more common; shall I use four spaces?"
        )
    );

    assert_eq!(
        examples_of(&poll, &l, "corrections.jsonl", 4).0,
        [],
        "\"Thanks!\" is not a correction"
    );
    assert_eq!(
        examples_of(&poll, &l, "corrections.jsonl", 5).0,
        [],
        "no reply after the correction"
    );

    let (ex, _) = examples_of(&poll, &l, "corrections.jsonl", 6);
    assert_eq!(ex.len(), 2, "two corrections in one conversation");
    assert_eq!(ex[1].prompt.len(), 3);
    assert_eq!(ex[1].prompt[2], user("No, just the typo."));
    assert_eq!(
        ex[1].target,
        pair(
            "Restored the title; only the typo is fixed.",
            "Fixed the typo and renamed nothing else... except the title."
        )
    );

    let (ex, _) = examples_of(&poll, &l, "broken.jsonl", 1);
    assert_eq!(
        ex[0].target,
        pair(
            "Bumped the version to 1.2.",
            "Shall I also update the changelog and the docs?"
        )
    );

    // In the SFT phase the same signal trains on the corrected reply only.
    let sft = Labeler::new(&LabelConfig {
        phase: Phase::Sft,
        ..LabelConfig::default()
    });
    let (ex, _) = examples_of(&poll, &sft, "corrections.jsonl", 1);
    assert_eq!(
        ex[0].target,
        Target::Sft {
            completion: "Renamed `x` to `count` in utils.py.".into()
        }
    );

    // Patterns are configurable: with none, nothing is a correction.
    let none = Labeler::new(&LabelConfig {
        phase: Phase::Dpo,
        correction_patterns: vec![],
    });
    assert_eq!(examples_of(&poll, &none, "corrections.jsonl", 1).0, []);
}

#[test]
fn annotations_and_good_turns() {
    let dir = scratch_copy();
    let poll = ConvoReader::open(dir.path(), None, CAP)
        .expect("open")
        .poll()
        .expect("poll");
    let l = dpo();

    let (ex, _) = examples_of(&poll, &l, "annotations.jsonl", 1);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].prompt, [user("Delete the prod database.")]);
    assert_eq!(
        ex[0].target,
        pair(
            "I won't do that without a verified backup; shall I take one first?",
            "Deleted."
        )
    );
    assert_eq!(ex[0].kind, Kind::FlawedDirection);
    assert_eq!(ex[0].provenance, source_of(&poll, "annotations.jsonl", 1));

    let (ex, _) = examples_of(&poll, &l, "annotations.jsonl", 2);
    assert_eq!(ex[0].kind, Kind::ClearDirection);
    assert_eq!(
        ex[0].target,
        pair(
            "Named it `load_config`.",
            "camelCase would match the old code better: `loadConfig`."
        )
    );

    let (ex, _) = examples_of(&poll, &l, "annotations.jsonl", 3);
    assert_eq!(ex.len(), 1);
    assert_eq!(
        ex[0].prompt,
        [user(
            "Summarise this in one line: the build broke because the cache was stale."
        )]
    );
    assert_eq!(
        ex[0].target,
        Target::Sft {
            completion: "A stale cache broke the build.".into()
        },
        "good turns are SFT even in the DPO phase"
    );

    // The reply logged after the last user turn is the judged one; it leaves the prompt.
    let (ex, _) = examples_of(&poll, &l, "annotations.jsonl", 4);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].prompt, [user("Write a haiku.")]);
    assert_eq!(ex[0].target, pair("A better haiku.", "Leaves fall."));

    let (ex, skipped) = examples_of(&poll, &l, "annotations.jsonl", 5);
    assert_eq!(ex, []);
    assert!(
        skipped[0].contains("marked good but no user turn precedes it"),
        "{skipped:?}"
    );

    let (ex, _) = examples_of(&poll, &l, "broken.jsonl", 7);
    assert_eq!(ex[0].prompt, [user("Reply with OK.")]);
    assert_eq!(
        ex[0].target,
        Target::Sft {
            completion: "OK".into()
        }
    );
    assert_eq!(assistant("OK").role, "assistant");
}

#[test]
fn cursor_survives_a_restart_without_skipping_or_rereading() {
    let dir = scratch_copy();
    let cursor = dir.path().join("cursor.json.state");
    {
        let mut reader = ConvoReader::open(dir.path(), Some(&cursor), CAP).expect("open");
        assert_eq!(reader.poll().expect("poll").conversations.len(), 13);
        reader.save_cursor().expect("save");
    }
    // The writer finishes the partial line and adds another; a new file appears.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join("broken.jsonl"))
        .expect("open");
    f.write_all(b"\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"ninth\"}]}\n")
        .expect("append");
    drop(f);
    fs::write(
        dir.path().join("zz-new.jsonl"),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"new file\"}]}\n",
    )
    .expect("write");

    let mut reader = ConvoReader::open(dir.path(), Some(&cursor), CAP).expect("reopen");
    let poll = reader.poll().expect("poll");
    let got: Vec<(String, String)> = poll
        .conversations
        .iter()
        .map(|c| {
            let tail = c.source.rsplit('/').next().expect("source").to_string();
            (tail, c.messages[0].content.clone())
        })
        .collect();
    assert_eq!(
        got,
        [
            ("broken.jsonl:8".to_string(), "partial".to_string()),
            ("broken.jsonl:9".to_string(), "ninth".to_string()),
            ("zz-new.jsonl:1".to_string(), "new file".to_string()),
        ]
    );
    assert!(poll.malformed.is_empty());
}

#[test]
fn shrunk_file_is_read_again_from_the_start() {
    let dir = scratch_copy();
    let mut reader = ConvoReader::open(dir.path(), None, CAP).expect("open");
    reader.poll().expect("poll");
    fs::write(
        dir.path().join("corrections.jsonl"),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"rotated\"}]}\n",
    )
    .expect("write");
    let poll = reader.poll().expect("poll");
    assert_eq!(poll.conversations.len(), 1);
    assert_eq!(poll.conversations[0].messages[0].content, "rotated");
}

#[test]
fn labeler_runs_over_the_conversation_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convo");
    let has_logs = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        })
        .unwrap_or(false);
    if !has_logs {
        println!(
            "note: {} holds no logs yet; nothing to check",
            dir.display()
        );
        return;
    }
    let finished = ConvoConfig {
        take_unterminated_last_line: true,
        ..ConvoConfig::default()
    };
    let mut reader = ConvoReader::open(&dir, None, finished).expect("open");
    let poll = reader.poll().expect("poll");
    let l = dpo();
    let mut pairs = 0;
    let mut sft = 0;
    let mut skipped = 0;
    for c in &poll.conversations {
        let labeled = l.conversation(c);
        skipped += labeled.skipped.len();
        for e in labeled.examples {
            assert!(!e.prompt.is_empty());
            assert_eq!(
                e.prompt.last().map(|m| m.role.as_str()),
                Some("user"),
                "{}",
                e.provenance
            );
            assert!(e.provenance.contains(".jsonl:"), "{}", e.provenance);
            match e.target {
                Target::Dpo { .. } => pairs += 1,
                Target::Sft { .. } => sft += 1,
            }
        }
    }
    for m in &poll.malformed {
        let shown = m.to_string();
        let (location, _) = shown.split_once(": ").expect("file:line: reason");
        let (file, line) = location.rsplit_once(':').expect("file:line");
        assert!(file.ends_with(".jsonl"), "{shown}");
        assert!(line.parse::<u64>().is_ok_and(|n| n >= 1), "{shown}");
        println!("malformed: {shown}");
    }
    println!(
        "{} conversations, {} malformed lines, {pairs} DPO pairs, {sft} SFT examples, {skipped} signals skipped",
        poll.conversations.len(),
        poll.malformed.len()
    );
    assert!(pairs >= 1, "the corpus yields at least one DPO pair");
}
