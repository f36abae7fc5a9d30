//! Conversation logs: JSONL files in a directory, read incrementally with a persisted
//! cursor.
//!
//! Two line formats are read (one JSON object per line):
//!
//! - OpenAI chat: `{"messages":[{"role":"user","content":"…"}, …]}`; `content` may also
//!   be a list of `{"type":"text","text":"…"}` parts. `developer` is read as `system`.
//! - ShareGPT: `{"conversations":[{"from":"human","value":"…"}, …]}` with `from` in
//!   `human`/`user`, `gpt`/`assistant`, `system`.
//!
//! Optional extras (documented in `scenarios/README.md`): a message field
//! `"label": "good"`, and top-level `"preferred"`/`"rejected"` strings (a reviewer's
//! annotation) with an optional `"kind"`. What they mean is the labeler's business.
//!
//! New files and appended lines are picked up on every [`ConvoReader::poll`]. The cursor
//! keeps, per file, the byte offset just past its last complete line (a last line
//! without its newline is not consumed: the writer may still be writing it; finished
//! files can opt in with `take_unterminated_last_line`) and the line count, so after
//! [`ConvoReader::save_cursor`] a restart neither skips nor re-reads. A bad line (invalid
//! JSON or UTF-8, a line over the size cap, a message with no role) is reported as
//! `file:line` and skipped; it never stops the reader. Huge lines are skipped without being
//! held in memory, and an unterminated tail already scanned past the cap is not read again.
//!
//! A file is known by its identity, not only its name: the cursor keeps its device and
//! inode and fingerprints of its first bytes and of the bytes before the read position, so
//! a file rotated, truncated or rewritten in place is read again from line 1 (with right
//! line numbers) instead of resuming at a stale offset. One poll reads at most
//! `max_poll_bytes` of each file. Symbolic links in the directory are refused with a
//! warning: they could point the reader at any file the daemon can read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::example::Kind;

/// Errors that stop a poll or a cursor save (bad lines never do).
#[derive(Debug, thiserror::Error)]
pub enum ConvoError {
    /// Reading the log directory, a log file or the cursor failed.
    #[error("conversation logs: {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The cursor file exists but is not valid JSON of the expected shape.
    #[error("conversation log cursor {path} is corrupt: {source}")]
    Cursor {
        /// The cursor file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConvoError + '_ {
    move |source| ConvoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvoConfig {
    /// Lines longer than this many bytes are skipped and reported (default 1 MiB).
    pub max_line_bytes: usize,
    /// Read a last line that has no newline as if it had one. Off for live logs (the
    /// writer may be mid-line); on for finished files (a corpus, a one-off import),
    /// where such a line is simply the file's last. Only for files no longer written.
    pub take_unterminated_last_line: bool,
    /// Bytes read from one file in one poll (default 64 MiB); the rest waits for the next
    /// poll, so a huge file or an endless line costs a bounded time per step.
    pub max_poll_bytes: u64,
}

impl Default for ConvoConfig {
    fn default() -> Self {
        ConvoConfig {
            max_line_bytes: 1 << 20,
            take_unterminated_last_line: false,
            max_poll_bytes: 64 << 20,
        }
    }
}

/// One message of a logged conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMessage {
    /// `system`, `user` or `assistant` (ShareGPT roles are mapped to these).
    pub role: String,
    /// The text.
    pub content: String,
    /// An operator's mark on this turn, e.g. `good`.
    pub label: Option<String>,
}

/// One parsed log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The turns, in order.
    pub messages: Vec<LogMessage>,
    /// A reviewer's preferred reply to the conversation (annotation), if any.
    pub preferred: Option<String>,
    /// A reviewer's rejected reply (annotation), if any.
    pub rejected: Option<String>,
    /// The behaviour class the annotation teaches, when the line says.
    pub kind: Option<Kind>,
    /// `file:line`, the provenance of everything labeled from it.
    pub source: String,
}

/// A line that could not be read; reported, never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The log file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

/// What one poll found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Poll {
    /// Conversations from complete new lines, in file-name then line order.
    pub conversations: Vec<Conversation>,
    /// Lines that were skipped, with the reason.
    pub malformed: Vec<Malformed>,
}

/// Where reading stopped in one file, and what the file looked like there (so a file
/// replaced or rewritten under the same name is read again from its start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    /// Byte offset just past the last complete line consumed.
    pub offset: u64,
    /// Complete lines consumed (so line numbers stay right after a restart).
    pub line: u64,
    /// Bytes after `offset` already scanned without finding a newline (an unterminated
    /// tail). Once over the line cap they are not read again: the line is skipped anyway.
    #[serde(default)]
    pub scanned: u64,
    /// Device and inode of the file read (0: not known yet, a cursor of an older version).
    #[serde(default)]
    pub dev: u64,
    /// See `dev`.
    #[serde(default)]
    pub ino: u64,
    /// Fingerprint of the file's first `head_len` bytes.
    #[serde(default)]
    pub head: u64,
    /// How many leading bytes `head` covers (up to [`FINGERPRINT_BYTES`], never past `offset`).
    #[serde(default)]
    pub head_len: u64,
    /// Fingerprint of the [`FINGERPRINT_BYTES`] (or fewer) bytes just before `offset`.
    #[serde(default)]
    pub tail: u64,
}

/// Bytes each fingerprint of [`FilePos`] covers.
pub const FINGERPRINT_BYTES: u64 = 1024;

/// The persisted cursor: a position per file name (relative to the log directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Position per file.
    pub files: BTreeMap<String, FilePos>,
}

/// Incremental reader over a directory of `*.jsonl` logs.
#[derive(Debug)]
pub struct ConvoReader {
    /// The log directory.
    dir: PathBuf,
    /// Where the cursor persists (`None`: in memory only).
    cursor_path: Option<PathBuf>,
    /// Positions reached so far.
    cursor: Cursor,
    /// Settings.
    config: ConvoConfig,
    /// Symbolic links already warned about (once each, not every poll).
    refused_links: std::collections::BTreeSet<PathBuf>,
}

impl ConvoReader {
    /// A reader over `dir`, resuming from the cursor at `cursor_path` if it exists.
    pub fn open(
        dir: &Path,
        cursor_path: Option<&Path>,
        config: ConvoConfig,
    ) -> Result<ConvoReader, ConvoError> {
        let cursor = match cursor_path {
            Some(path) if path.exists() => {
                let bytes = fs::read(path).map_err(io_err(path))?;
                serde_json::from_slice(&bytes).map_err(|source| ConvoError::Cursor {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            _ => Cursor::default(),
        };
        Ok(ConvoReader {
            dir: dir.to_path_buf(),
            cursor_path: cursor_path.map(Path::to_path_buf),
            cursor,
            config,
            refused_links: Default::default(),
        })
    }

    /// The positions reached so far.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Reads every complete line added since the last poll, in every `*.jsonl` file of
    /// the directory (new files included), and advances the in-memory cursor.
    pub fn poll(&mut self) -> Result<Poll, ConvoError> {
        let mut names: Vec<String> = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            // `file_type` does not follow links: a link could lead the reader to any file
            // this process can read (and train on it), so it is refused.
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_symlink() {
                if self.refused_links.insert(path.clone()) {
                    tracing::warn!(path = %path.display(), "Skipped a symbolic link in the conversation log directory; only regular files are read.");
                }
                continue;
            }
            if kind.is_file() {
                if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        let mut poll = Poll::default();
        for name in names {
            let path = self.dir.join(&name);
            let pos = self.cursor.files.get(&name).copied().unwrap_or_default();
            // One unreadable file (removed mid-poll, permissions) must not stop the
            // others; its position is kept and it is tried again next poll.
            match self.read_file(&path, pos, &mut poll) {
                Ok(pos) => {
                    self.cursor.files.insert(name, pos);
                }
                Err(error) => {
                    tracing::warn!(%error, "Could not read a conversation log; will retry next poll.")
                }
            }
        }
        Ok(poll)
    }

    /// Persists the cursor atomically (temporary sibling, fsync, rename, directory fsync;
    /// mode 0600). Call it after the polled conversations are durable elsewhere (the
    /// labeler's pending queue), or a crash loses them.
    pub fn save_cursor(&self) -> Result<(), ConvoError> {
        let Some(path) = &self.cursor_path else {
            return Ok(());
        };
        let json =
            serde_json::to_vec_pretty(&self.cursor).map_err(|source| ConvoError::Cursor {
                path: path.clone(),
                source,
            })?;
        crate::durable::write_atomic(path, &json).map_err(io_err(path))
    }

    fn read_file(
        &self,
        path: &Path,
        mut pos: FilePos,
        poll: &mut Poll,
    ) -> Result<FilePos, ConvoError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if let Some(why) = replaced(&mut file, &meta, &pos).map_err(io_err(path))? {
            tracing::warn!(path = %path.display(), offset = pos.offset, line = pos.line, why, "Conversation log replaced or rewritten; reading it again from the start.");
            pos = FilePos::default();
        }
        pos.dev = meta.dev();
        pos.ino = meta.ino();
        let cap = self.config.max_line_bytes;
        // An unterminated tail already known to be over the cap is skipped, not re-read.
        let mut line_bytes: u64 = if pos.scanned > cap as u64 {
            pos.scanned
        } else {
            0
        };
        file.seek(SeekFrom::Start(pos.offset + line_bytes))
            .map_err(io_err(path))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line: Vec<u8> = Vec::new();
        let mut read: u64 = 0;
        loop {
            if read >= self.config.max_poll_bytes {
                // This poll's share is spent; the next one goes on from here.
                break;
            }
            let buf = reader.fill_buf().map_err(io_err(path))?;
            let at_end = buf.is_empty();
            if at_end && (line_bytes == 0 || !self.config.take_unterminated_last_line) {
                // End of file: a partial last line stays unconsumed for the next poll.
                break;
            }
            let (chunk, complete) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], true),
                None => (buf, at_end),
            };
            if line_bytes <= cap as u64 {
                let room = (cap + 1).saturating_sub(line.len());
                line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            line_bytes += chunk.len() as u64;
            let used = chunk.len() + usize::from(complete && !at_end);
            read += used as u64;
            reader.consume(used);
            if complete {
                pos.offset += line_bytes + u64::from(!at_end);
                pos.line += 1;
                let source_line = pos.line;
                if line_bytes > cap as u64 {
                    poll.malformed.push(Malformed {
                        file: path.to_path_buf(),
                        line: source_line,
                        reason: format!("line is {line_bytes} bytes, over the cap of {cap}"),
                    });
                } else {
                    self.take_line(path, source_line, &line, poll);
                }
                line.clear();
                line_bytes = 0;
            }
        }
        pos.scanned = line_bytes;
        fingerprint(reader.get_mut(), &mut pos).map_err(io_err(path))?;
        Ok(pos)
    }

    fn take_line(&self, path: &Path, line_no: u64, bytes: &[u8], poll: &mut Poll) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let source = format!("{}:{line_no}", path.display());
        let result = std::str::from_utf8(bytes)
            .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))
            .and_then(|text| parse_line(text, source));
        match result {
            Ok(c) => poll.conversations.push(c),
            Err(reason) => {
                tracing::warn!(file = %path.display(), line = line_no, %reason, "Skipped a malformed conversation log line.");
                poll.malformed.push(Malformed {
                    file: path.to_path_buf(),
                    line: line_no,
                    reason,
                })
            }
        }
    }
}

/// 64 bits of SHA-256 over `bytes`.
fn digest(bytes: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    u64::from_le_bytes(d[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// `len` bytes of `file` from `start` (fewer at its end).
fn read_at(file: &mut File, start: u64, len: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity(len as usize);
    file.by_ref().take(len).read_to_end(&mut out)?;
    Ok(out)
}

/// Why the file under this name is no longer the one `pos` describes, if it is not: another
/// inode (rotated by rename), shorter than the offset (truncated), or other bytes at its
/// head or just before the offset (rewritten in place, as an editor saves).
fn replaced(
    file: &mut File,
    meta: &fs::Metadata,
    pos: &FilePos,
) -> io::Result<Option<&'static str>> {
    if pos.offset == 0 && pos.scanned == 0 {
        return Ok(None);
    }
    if pos.ino != 0 && (pos.dev, pos.ino) != (meta.dev(), meta.ino()) {
        return Ok(Some("another file under the same name"));
    }
    if meta.len() < pos.offset + pos.scanned {
        return Ok(Some("shorter than the part already read"));
    }
    if pos.head_len > 0 && digest(&read_at(file, 0, pos.head_len)?) != pos.head {
        return Ok(Some("its first bytes changed"));
    }
    let tail_len = pos.offset.min(FINGERPRINT_BYTES);
    if pos.ino != 0
        && tail_len > 0
        && digest(&read_at(file, pos.offset - tail_len, tail_len)?) != pos.tail
    {
        return Ok(Some("the bytes before the read position changed"));
    }
    Ok(None)
}

/// Records in `pos` the fingerprints of the bytes up to its offset.
fn fingerprint(file: &mut File, pos: &mut FilePos) -> io::Result<()> {
    let head_len = pos.offset.min(FINGERPRINT_BYTES);
    if head_len != pos.head_len {
        pos.head = digest(&read_at(file, 0, head_len)?);
        pos.head_len = head_len;
    }
    let tail_len = pos.offset.min(FINGERPRINT_BYTES);
    pos.tail = if tail_len > 0 {
        digest(&read_at(file, pos.offset - tail_len, tail_len)?)
    } else {
        0
    };
    Ok(())
}

/// Parses one log line (OpenAI chat or ShareGPT); the error says what is wrong.
pub fn parse_line(text: &str, source: String) -> Result<Conversation, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object".into());
    };
    let (list, role_key, content_key) = match (obj.get("messages"), obj.get("conversations")) {
        (Some(list), _) => (list, "role", "content"),
        (None, Some(list)) => (list, "from", "value"),
        (None, None) => {
            return Err("neither `messages` (OpenAI) nor `conversations` (ShareGPT)".into())
        }
    };
    let Value::Array(items) = list else {
        return Err("the message list is not an array".into());
    };
    if items.is_empty() {
        return Err("the conversation has no messages".into());
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(format!("message {i} is not an object"));
        };
        let role = match m.get(role_key) {
            Some(Value::String(r)) => {
                map_role(r).ok_or_else(|| format!("message {i}: unknown role `{r}`"))?
            }
            Some(_) => return Err(format!("message {i}: `{role_key}` is not a string")),
            None => return Err(format!("message {i}: missing `{role_key}`")),
        };
        let content = match m.get(content_key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(parts)
                .ok_or_else(|| format!("message {i}: `{content_key}` parts hold no text"))?,
            Some(_) => return Err(format!("message {i}: `{content_key}` is not text")),
            None => return Err(format!("message {i}: missing `{content_key}`")),
        };
        let label = match m.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(l)) => Some(l.clone()),
            Some(_) => return Err(format!("message {i}: `label` is not a string")),
        };
        messages.push(LogMessage {
            role: role.to_string(),
            content,
            label,
        });
    }
    let string_field = |key: &str| -> Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("`{key}` is not a string")),
        }
    };
    let preferred = string_field("preferred")?;
    let rejected = string_field("rejected")?;
    if preferred.is_some() != rejected.is_some() {
        return Err("an annotation needs both `preferred` and `rejected`".into());
    }
    let kind = match string_field("kind")? {
        None => None,
        Some(k) => Some(Kind::parse(&k).ok_or_else(|| {
            format!("`kind` `{k}`: expected clear_direction, flawed_direction or general")
        })?),
    };
    Ok(Conversation {
        messages,
        preferred,
        rejected,
        kind,
        source,
    })
}

fn map_role(role: &str) -> Option<&'static str> {
    match role {
        "system" | "developer" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" => Some("assistant"),
        _ => None,
    }
}

/// Concatenates the `text` of `{"type":"text"}` parts; `None` if there is none.
fn text_parts(parts: &[Value]) -> Option<String> {
    let texts: Vec<&str> = parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_formats_and_extras() {
        let openai = r#"{"messages":[{"role":"developer","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]},{"role":"assistant","content":"ok","label":"good"}]}"#;
        let c = parse_line(openai, "f:1".into()).expect("parses");
        assert_eq!(c.messages.len(), 3);
        assert_eq!(c.messages[0].role, "system");
        assert_eq!(c.messages[1].content, "a\nb");
        assert_eq!(c.messages[2].label.as_deref(), Some("good"));
        let sharegpt = r#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"yo"}],"preferred":"p","rejected":"r","kind":"flawed_direction"}"#;
        let c = parse_line(sharegpt, "f:2".into()).expect("parses");
        assert_eq!(
            (c.messages[0].role.as_str(), c.messages[1].role.as_str()),
            ("user", "assistant")
        );
        assert_eq!(
            (c.preferred.as_deref(), c.kind),
            (Some("p"), Some(Kind::FlawedDirection))
        );
    }

    #[test]
    fn rejects_with_reasons() {
        let cases = [
            (
                r#"{"messages":[{"content":"x"}]}"#,
                "message 0: missing `role`",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
                "unknown role `tool`",
            ),
            (r#"{"messages":[]}"#, "no messages"),
            (r#"[1,2]"#, "not a JSON object"),
            (r#"{"text":"x"}"#, "neither"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"preferred":"p"}"#,
                "both",
            ),
            (
                r#"{"messages":[{"role":"user","content":null}]}"#,
                "is not text",
            ),
            (r#"{"messages":[{"role":"user""#, "invalid JSON"),
        ];
        for (line, want) in cases {
            let err = parse_line(line, "f:1".into()).expect_err(line);
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
