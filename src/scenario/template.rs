//! Scenario templates: parsing, validation and rendering.
//!
//! A template file holds any number of `[[template]]` tables (schema in
//! `scenarios/README.md`). Text fields use `{{name}}` placeholders filled from the
//! template's slots (slot values may use other slots); the final user turn marks the
//! direction with exactly one `[[ … ]]`. Everything is validated at load time, so
//! rendering cannot fail: errors name the file, line, template id and slot.
//!
//! This module does not know about the ledger or about probes versus training; the
//! generator (`generate.rs`) decides what to sample.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::Deserialize;
use toml::Spanned;

use crate::example::{DirectionSpan, ExampleHash, Kind, Message, Scenario};

/// Whether a template feeds training or is held out for the monitor's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Sampled by the generator for training.
    Train,
    /// Never trained on; rendered only by `probes()` for evaluation.
    Probe,
}

/// One problem in a template file; names the file, the line and (when it applies) the
/// template and slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// The template file.
    pub path: PathBuf,
    /// 1-based line of the offending field, slot or table.
    pub line: usize,
    /// The template id, when the error is inside a template whose id could be read.
    pub template: Option<String>,
    /// The slot involved, if any.
    pub slot: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if let Some(id) = &self.template {
            write!(f, "template `{id}`: ")?;
        }
        if let Some(slot) = &self.slot {
            write!(f, "slot `{slot}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for TemplateError {}

/// Every error found while loading a library (all files are checked, not just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} template error(s):\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct LibraryError(pub Vec<TemplateError>);

/// A piece of parsed template text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text, copied as is.
    Lit(String),
    /// A placeholder: index into the template's slots.
    Slot(usize),
    /// `[[`: the direction span starts here.
    DirStart,
    /// `]]`: the direction span ends here.
    DirEnd,
}

type Text = Vec<Segment>;

/// A slot: a name and its alternative values.
#[derive(Debug, Clone)]
struct Slot {
    /// The placeholder name.
    name: String,
    /// Parsed values (they may reference other slots, never direction markers).
    values: Vec<Text>,
}

/// A validated template, ready to render.
#[derive(Debug, Clone)]
pub struct Template {
    /// Unique id across the library; the provenance of everything rendered from it.
    pub id: String,
    /// What the preferred response demonstrates.
    pub kind: Kind,
    /// Train or probe.
    pub split: Split,
    /// Free-form domain label (code, shell, data, writing, planning, general…).
    pub domain: String,
    /// `file:line` of the `[[template]]` table, for messages.
    pub source: String,
    /// Optional system prompt.
    system: Option<Text>,
    /// Earlier turns: (role, text).
    turns: Vec<(String, Text)>,
    /// The final user turn (holds the direction markers).
    user: Text,
    /// The response that should win.
    preferred: Text,
    /// The response that should lose.
    rejected: Text,
    /// Slots, indexed by the `Segment::Slot` numbers.
    slots: Vec<Slot>,
}

/// A template file as TOML gives it; spans locate errors. Field meanings are in
/// `scenarios/README.md` and on [`Template`].
#[derive(Deserialize)]
struct RawFile {
    /// The `[[template]]` tables, with the span of each table for its line.
    #[serde(default)]
    template: Vec<Spanned<RawTemplate>>,
}

/// One `[[template]]` table before validation; strings keep their spans so that an
/// error names the line of the field it is about.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    /// Unique id.
    id: Spanned<String>,
    /// Kind name, checked against [`Kind::parse`].
    kind: Spanned<String>,
    /// `train` (default) or `probe`.
    #[serde(default)]
    split: Option<Spanned<String>>,
    /// Free-form domain label.
    #[serde(default)]
    domain: Option<String>,
    /// Optional system prompt text.
    #[serde(default)]
    system: Option<Spanned<String>>,
    /// Earlier turns.
    #[serde(default)]
    turns: Vec<Spanned<RawTurn>>,
    /// Final user turn text, with the direction markers.
    user: Spanned<String>,
    /// Winning response text.
    preferred: Spanned<String>,
    /// Losing response text.
    rejected: Spanned<String>,
    /// Slot name → values; the list's span gives the slot's line.
    #[serde(default)]
    slots: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
}

/// One earlier turn before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    /// `user` or `assistant`.
    role: Spanned<String>,
    /// The turn's text.
    content: Spanned<String>,
}

/// 1-based line number of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Which field a text belongs to; decides whether direction markers are allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    /// The final user turn: the one place markers belong.
    User,
    /// System, turns, preferred, rejected.
    Other,
    /// A slot value: markers there would make the span depend on sampling.
    SlotValue,
}

/// Parses `{{name}}`, `[[` and `]]` out of `s`; slot names are looked up in `names`.
/// Errors are (message, offending slot name).
fn parse_text(
    s: &str,
    field: Field,
    names: &BTreeMap<String, usize>,
) -> Result<Text, (String, Option<String>)> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{{") {
            let Some(close) = after.find("}}") else {
                return Err(("`{{` without a closing `}}`".into(), None));
            };
            let name = &after[..close];
            let valid = !name.is_empty()
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err((
                    format!(
                        "`{{{{{name}}}}}` is not a placeholder (names are letters, digits and `_`)"
                    ),
                    None,
                ));
            }
            let Some(&index) = names.get(name) else {
                return Err((
                    format!("placeholder `{{{{{name}}}}}` has no slot of that name"),
                    Some(name.to_string()),
                ));
            };
            if !lit.is_empty() {
                out.push(Segment::Lit(std::mem::take(&mut lit)));
            }
            out.push(Segment::Slot(index));
            rest = &after[close + 2..];
        } else if rest.starts_with("}}") {
            return Err(("`}}` without an opening `{{`".into(), None));
        } else if rest.starts_with("[[") || rest.starts_with("]]") {
            match field {
                Field::User => {}
                Field::Other => {
                    return Err((
                        "direction markers `[[`/`]]` are only allowed in `user`".into(),
                        None,
                    ))
                }
                Field::SlotValue => {
                    return Err((
                        "direction markers `[[`/`]]` are not allowed in slot values".into(),
                        None,
                    ))
                }
            }
            if !lit.is_empty() {
                out.push(Segment::Lit(std::mem::take(&mut lit)));
            }
            out.push(if rest.starts_with("[[") {
                Segment::DirStart
            } else {
                Segment::DirEnd
            });
            rest = &rest[2..];
        } else {
            let c = rest.chars().next().expect("rest is not empty");
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !lit.is_empty() {
        out.push(Segment::Lit(lit));
    }
    Ok(out)
}

/// Checks the `[[ … ]]` structure of the user text: `None` if there is no marker,
/// an error unless there is exactly one non-empty, ordered pair.
fn check_direction(text: &Text) -> Result<bool, String> {
    let starts: Vec<usize> = positions(text, &Segment::DirStart);
    let ends: Vec<usize> = positions(text, &Segment::DirEnd);
    match (starts.as_slice(), ends.as_slice()) {
        ([], []) => Ok(false),
        ([s], [e]) if s < e => {
            if e - s == 1 {
                Err("the direction span `[[ ]]` is empty".into())
            } else {
                Ok(true)
            }
        }
        ([_], [_]) => Err("`]]` comes before `[[`".into()),
        _ if starts.len() > 1 || ends.len() > 1 => Err(format!(
            "two direction markers: `user` must hold exactly one `[[ … ]]` (found {} `[[` and {} `]]`)",
            starts.len(),
            ends.len()
        )),
        _ => Err("unbalanced direction marker: `[[` and `]]` must come as a pair".into()),
    }
}

fn positions(text: &Text, seg: &Segment) -> Vec<usize> {
    text.iter()
        .enumerate()
        .filter(|(_, s)| *s == seg)
        .map(|(i, _)| i)
        .collect()
}

fn slot_refs(text: &Text) -> impl Iterator<Item = usize> + '_ {
    text.iter().filter_map(|s| match s {
        Segment::Slot(i) => Some(*i),
        _ => None,
    })
}

/// Parses every template in one file's source. Valid templates are returned even when
/// others in the file have errors.
pub fn parse_file(path: &Path, src: &str) -> (Vec<Template>, Vec<TemplateError>) {
    let err = |offset: usize, template: Option<&str>, slot: Option<String>, message: String| {
        TemplateError {
            path: path.to_path_buf(),
            line: line_of(src, offset),
            template: template.map(str::to_string),
            slot,
            message,
        }
    };
    let raw: RawFile = match toml::from_str(src) {
        Ok(raw) => raw,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().to_string();
            return (Vec::new(), vec![err(offset, None, None, message)]);
        }
    };
    let mut templates = Vec::new();
    let mut errors = Vec::new();
    for raw in raw.template {
        let table_start = raw.span().start;
        let raw = raw.into_inner();
        match build(&raw, table_start, &err) {
            Ok(t) => templates.push(Template {
                source: format!("{}:{}", path.display(), line_of(src, table_start)),
                ..t
            }),
            Err(mut e) => errors.append(&mut e),
        }
    }
    (templates, errors)
}

type ErrFn<'a> = dyn Fn(usize, Option<&str>, Option<String>, String) -> TemplateError + 'a;

fn build(
    raw: &RawTemplate,
    table_start: usize,
    err: &ErrFn<'_>,
) -> Result<Template, Vec<TemplateError>> {
    let id = raw.id.get_ref().trim().to_string();
    let tid = Some(id.as_str());
    let mut errors = Vec::new();
    if id.is_empty() {
        errors.push(err(raw.id.span().start, None, None, "`id` is empty".into()));
    }
    let kind = Kind::parse(raw.kind.get_ref());
    if kind.is_none() {
        errors.push(err(
            raw.kind.span().start,
            tid,
            None,
            format!(
                "`kind = \"{}\"`: expected clear_direction, flawed_direction or general",
                raw.kind.get_ref()
            ),
        ));
    }
    let split = match raw
        .split
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span().start))
    {
        None | Some(("train", _)) => Split::Train,
        Some(("probe", _)) => Split::Probe,
        Some((other, at)) => {
            errors.push(err(
                at,
                tid,
                None,
                format!("`split = \"{other}\"`: expected train or probe"),
            ));
            Split::Train
        }
    };

    let names: BTreeMap<String, usize> = raw
        .slots
        .keys()
        .enumerate()
        .map(|(i, name)| (name.clone(), i))
        .collect();
    let mut slots = Vec::new();
    for (name, values) in &raw.slots {
        let at = values.span().start;
        if values.get_ref().is_empty() {
            errors.push(err(
                at,
                tid,
                Some(name.clone()),
                "slot has no values".into(),
            ));
        }
        let mut parsed = Vec::new();
        for value in values.get_ref() {
            match parse_text(value.get_ref(), Field::SlotValue, &names) {
                Ok(t) => parsed.push(t),
                Err((message, inner)) => {
                    let message = match inner {
                        Some(unknown) => format!(
                            "{message} (used in a value of this slot; unknown slot `{unknown}`)"
                        ),
                        None => message,
                    };
                    errors.push(err(value.span().start, tid, Some(name.clone()), message));
                }
            }
        }
        slots.push(Slot {
            name: name.clone(),
            values: parsed,
        });
    }

    let mut field = |label: &str, s: &Spanned<String>, f: Field| -> Text {
        match parse_text(s.get_ref(), f, &names) {
            Ok(t) => t,
            Err((message, slot)) => {
                errors.push(err(
                    s.span().start,
                    tid,
                    slot,
                    format!("`{label}`: {message}"),
                ));
                Vec::new()
            }
        }
    };
    let system = raw
        .system
        .as_ref()
        .map(|s| field("system", s, Field::Other));
    let mut turns = Vec::new();
    let mut bad_roles = Vec::new();
    for turn in &raw.turns {
        let role = turn.get_ref().role.get_ref().clone();
        if role != "user" && role != "assistant" {
            bad_roles.push((turn.get_ref().role.span().start, role.clone()));
        }
        turns.push((
            role,
            field("turns.content", &turn.get_ref().content, Field::Other),
        ));
    }
    let user = field("user", &raw.user, Field::User);
    let preferred = field("preferred", &raw.preferred, Field::Other);
    let rejected = field("rejected", &raw.rejected, Field::Other);
    for (at, role) in bad_roles {
        errors.push(err(
            at,
            tid,
            None,
            format!("turn role `{role}`: expected user or assistant"),
        ));
    }

    match check_direction(&user) {
        Ok(false) if matches!(kind, Some(Kind::ClearDirection | Kind::FlawedDirection)) => {
            errors.push(err(
                raw.user.span().start,
                tid,
                None,
                "`user` has no direction span: mark it with exactly one `[[ … ]]`".into(),
            ));
        }
        Ok(_) => {}
        Err(message) => errors.push(err(
            raw.user.span().start,
            tid,
            None,
            format!("`user`: {message}"),
        )),
    }
    if raw.preferred.get_ref() == raw.rejected.get_ref() {
        errors.push(err(
            raw.rejected.span().start,
            tid,
            None,
            "`preferred` and `rejected` are identical".into(),
        ));
    }

    // Reachability from the text fields (unused slots are errors) and cycles. A text
    // that failed to parse lost its references, so "unused" would be a false alarm.
    let texts_parsed = errors.is_empty();
    let mut roots: Vec<usize> = Vec::new();
    for text in system
        .iter()
        .chain(turns.iter().map(|(_, t)| t))
        .chain([&user, &preferred, &rejected])
    {
        roots.extend(slot_refs(text));
    }
    let mut reachable = vec![false; slots.len()];
    let mut stack = roots;
    while let Some(i) = stack.pop() {
        if i < reachable.len() && !reachable[i] {
            reachable[i] = true;
            if let Some(slot) = slots.get(i) {
                for v in &slot.values {
                    stack.extend(slot_refs(v));
                }
            }
        }
    }
    for (i, slot) in slots.iter().enumerate() {
        if texts_parsed && !reachable[i] {
            let at = raw
                .slots
                .get(&slot.name)
                .map_or(table_start, |v| v.span().start);
            errors.push(err(
                at,
                tid,
                Some(slot.name.clone()),
                "slot is never used".into(),
            ));
        }
    }
    if let Some(cycle) = find_cycle(&slots) {
        let first = &slots[cycle[0]].name;
        let at = raw.slots.get(first).map_or(table_start, |v| v.span().start);
        let path: Vec<&str> = cycle.iter().map(|&i| slots[i].name.as_str()).collect();
        errors.push(err(
            at,
            tid,
            Some(first.clone()),
            format!(
                "slots refer to each other in a cycle: {} → {first}",
                path.join(" → ")
            ),
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Template {
        id,
        kind: kind.expect("checked above: errors is empty"),
        split,
        domain: raw.domain.clone().unwrap_or_else(|| "general".into()),
        source: String::new(),
        system,
        turns,
        user,
        preferred,
        rejected,
        slots,
    })
}

/// A cycle in the slot reference graph, as slot indices, if there is one.
fn find_cycle(slots: &[Slot]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the current path, 2 = done.
    fn visit(
        i: usize,
        slots: &[Slot],
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[i] = 1;
        path.push(i);
        for v in &slots[i].values {
            for j in slot_refs(v) {
                if state[j] == 1 {
                    let from = path.iter().position(|&p| p == j).expect("j is on the path");
                    return Some(path[from..].to_vec());
                }
                if state[j] == 0 {
                    if let Some(c) = visit(j, slots, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; slots.len()];
    for i in 0..slots.len() {
        if state[i] == 0 {
            if let Some(c) = visit(i, slots, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Per-render state: the value chosen for each slot (lazily, first use decides).
struct Render<'a, R: Rng> {
    /// The template's slots.
    slots: &'a [Slot],
    /// The value index chosen per slot, once first reached.
    chosen: Vec<Option<usize>>,
    /// The sampling stream.
    rng: &'a mut R,
}

impl<R: Rng> Render<'_, R> {
    /// Renders `text` into `out`; returns the byte offsets of the direction markers.
    fn text(&mut self, text: &Text, out: &mut String) -> (Option<usize>, Option<usize>) {
        let (mut start, mut end) = (None, None);
        for seg in text {
            match seg {
                Segment::Lit(s) => out.push_str(s),
                Segment::Slot(i) => {
                    let pick = match self.chosen[*i] {
                        Some(pick) => pick,
                        None => {
                            let pick = self.rng.random_range(0..self.slots[*i].values.len());
                            self.chosen[*i] = Some(pick);
                            pick
                        }
                    };
                    let slots = self.slots;
                    self.text(&slots[*i].values[pick], out);
                }
                Segment::DirStart => start = Some(out.len()),
                Segment::DirEnd => end = Some(out.len()),
            }
        }
        (start, end)
    }

    fn string(&mut self, text: &Text) -> String {
        let mut out = String::new();
        self.text(text, &mut out);
        out
    }
}

impl Template {
    /// Renders one scenario, choosing one value per reachable slot with `rng`. The same
    /// slot renders the same value everywhere it appears within one scenario.
    pub fn render<R: Rng>(&self, rng: &mut R) -> Scenario {
        let mut r = Render {
            slots: &self.slots,
            chosen: vec![None; self.slots.len()],
            rng,
        };
        let mut prompt = Vec::with_capacity(self.turns.len() + 2);
        if let Some(system) = &self.system {
            prompt.push(Message::new("system", r.string(system)));
        }
        for (role, text) in &self.turns {
            prompt.push(Message::new(role, r.string(text)));
        }
        let mut user = String::new();
        let (start, end) = r.text(&self.user, &mut user);
        let direction = match (start, end) {
            (Some(start), Some(end)) => Some(DirectionSpan {
                message: prompt.len(),
                start,
                end,
            }),
            _ => None,
        };
        prompt.push(Message::new("user", user));
        let preferred = r.string(&self.preferred);
        let rejected = r.string(&self.rejected);
        let hash: ExampleHash = Scenario::content_hash(&prompt, &preferred, &rejected);
        Scenario {
            kind: self.kind,
            template_id: self.id.clone(),
            prompt,
            direction,
            preferred,
            rejected,
            hash,
        }
    }

    /// Upper bound on distinct renderings: the product of the sizes of all slots
    /// (saturating). Exact when no slot value introduces another slot.
    pub fn combinations(&self) -> u128 {
        self.slots
            .iter()
            .fold(1u128, |acc, s| acc.saturating_mul(s.values.len() as u128))
    }
}

/// Every template of a scenario directory.
#[derive(Debug, Clone, Default)]
pub struct Library {
    /// The templates, in file-name order then file order.
    pub templates: Vec<Template>,
}

impl Library {
    /// Loads every `*.toml` under `dir` (recursively, in sorted path order). All files
    /// are checked; if any has errors, all of them are returned together.
    pub fn load_dir(dir: &Path) -> Result<Library, LibraryError> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        collect_toml(dir, &mut files, &mut errors);
        files.sort();
        let mut sources = Vec::new();
        for path in files {
            match std::fs::read_to_string(&path) {
                Ok(src) => sources.push((path, src)),
                Err(e) => errors.push(TemplateError {
                    path: path.clone(),
                    line: 1,
                    template: None,
                    slot: None,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        let mut library =
            Library::from_sources(sources.iter().map(|(p, s)| (p.as_path(), s.as_str())))
                .unwrap_or_else(|LibraryError(mut e)| {
                    errors.append(&mut e);
                    Library::default()
                });
        if errors.is_empty() {
            tracing::info!(path = %dir.display(), templates = library.templates.len(), "Scenario templates loaded.");
            Ok(std::mem::take(&mut library))
        } else {
            Err(LibraryError(errors))
        }
    }

    /// Builds a library from (path, source) pairs; checks ids are unique across them.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Library, LibraryError> {
        let mut templates: Vec<Template> = Vec::new();
        let mut errors = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (path, src) in sources {
            let (parsed, mut errs) = parse_file(path, src);
            errors.append(&mut errs);
            for t in parsed {
                if let Some(first) = seen.get(&t.id) {
                    let line = t
                        .source
                        .rsplit(':')
                        .next()
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(1);
                    errors.push(TemplateError {
                        path: path.to_path_buf(),
                        line,
                        template: Some(t.id.clone()),
                        slot: None,
                        message: format!("duplicate template id (first defined at {first})"),
                    });
                    continue;
                }
                seen.insert(t.id.clone(), t.source.clone());
                templates.push(t);
            }
        }
        if errors.is_empty() {
            Ok(Library { templates })
        } else {
            Err(LibraryError(errors))
        }
    }

    /// Templates of the given split.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Template> {
        self.templates.iter().filter(move |t| t.split == split)
    }
}

fn collect_toml(dir: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<TemplateError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(TemplateError {
                path: dir.to_path_buf(),
                line: 1,
                template: None,
                slot: None,
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_toml(&path, files, errors);
        } else if path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn parse(src: &str) -> (Vec<Template>, Vec<TemplateError>) {
        parse_file(Path::new("t.toml"), src)
    }

    fn one_error(src: &str) -> TemplateError {
        let (ok, errs) = parse(src);
        assert!(ok.is_empty(), "expected the template to be rejected");
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().expect("one error")
    }

    const GOOD: &str = r#"
[[template]]
id = "code.rename"
kind = "clear_direction"
split = "train"
domain = "code"
system = "You review {{lang}}."
turns = [ { role = "user", content = "Hi" }, { role = "assistant", content = "Hello." } ]
user = "Code:\n{{snippet}}\n[[Rename `{{old}}` to `{{new}}`.]] Thanks"
preferred = "Renamed `{{old}}` to `{{new}}`."
rejected = "Maybe rename something else?"

[template.slots]
lang = ["Python"]
old = ["tmp"]
new = ["total"]
snippet = ["def f({{old}}): return {{old}}"]
"#;

    #[test]
    fn renders_slots_markers_and_span() {
        let (ts, errs) = parse(GOOD);
        assert!(errs.is_empty(), "{errs:?}");
        let t = &ts[0];
        assert_eq!(t.source, "t.toml:2");
        let s = t.render(&mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(s.prompt.len(), 4);
        assert_eq!(s.prompt[0], Message::new("system", "You review Python."));
        assert_eq!(s.prompt[2], Message::new("assistant", "Hello."));
        let user = "Code:\ndef f(tmp): return tmp\nRename `tmp` to `total`. Thanks";
        assert_eq!(s.prompt[3], Message::new("user", user));
        let d = s.direction.expect("span");
        assert_eq!(d.message, 3);
        // "Code:\n" (6) + "def f(tmp): return tmp\n" (23) = 29.
        assert_eq!(
            (d.start, d.end),
            (29, 29 + "Rename `tmp` to `total`.".len())
        );
        assert_eq!(&user[d.start..d.end], "Rename `tmp` to `total`.");
        assert_eq!(s.preferred, "Renamed `tmp` to `total`.");
        assert_eq!(
            s.hash,
            Scenario::content_hash(&s.prompt, &s.preferred, &s.rejected)
        );
    }

    #[test]
    fn same_slot_same_value_within_a_scenario() {
        let src = GOOD.replace(
            r#"old = ["tmp"]"#,
            r#"old = ["a", "b", "c", "d", "e", "f"]"#,
        );
        let (ts, _) = parse(&src);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..50 {
            let s = ts[0].render(&mut rng);
            let old = s
                .preferred
                .split('`')
                .nth(1)
                .expect("old in preferred")
                .to_string();
            assert!(s.prompt[3]
                .content
                .contains(&format!("def f({old}): return {old}")));
        }
    }

    #[test]
    fn unknown_placeholder_names_line_template_and_slot() {
        let src = GOOD.replace("Renamed `{{old}}`", "Renamed `{{olde}}`");
        let e = one_error(&src);
        assert_eq!(e.line, 10);
        assert_eq!(e.template.as_deref(), Some("code.rename"));
        assert_eq!(e.slot.as_deref(), Some("olde"));
        assert_eq!(
            e.to_string(),
            "t.toml:10: template `code.rename`: slot `olde`: `preferred`: placeholder `{{olde}}` has no slot of that name"
        );
    }

    #[test]
    fn unused_slot_is_an_error_on_its_line() {
        let src = GOOD.replace(r#"new = ["total"]"#, "new = [\"total\"]\nspare = [\"x\"]");
        let e = one_error(&src);
        assert_eq!((e.line, e.slot.as_deref()), (17, Some("spare")));
        assert!(e.message.contains("never used"));
    }

    #[test]
    fn cycle_is_an_error() {
        let src = GOOD
            .replace(r#"lang = ["Python"]"#, r#"lang = ["{{snippet}}"]"#)
            .replace(
                r#"snippet = ["def f({{old}}): return {{old}}"]"#,
                r#"snippet = ["{{lang}} code"]"#,
            );
        let e = one_error(&src);
        assert!(e.message.contains("cycle"), "{e}");
        assert_eq!(e.slot.as_deref(), Some("lang"));
        assert_eq!(e.line, 14);
    }

    #[test]
    fn marker_errors() {
        let missing = one_error(&GOOD.replace("[[Rename", "Rename").replace(".]]", "."));
        assert!(missing.message.contains("no direction span"), "{missing}");
        assert_eq!(missing.line, 9);
        let two = one_error(&GOOD.replace(" Thanks", " [[Thanks]]"));
        assert!(two.message.contains("two direction markers"), "{two}");
        let outside = one_error(&GOOD.replace("Maybe rename", "[[Maybe]] rename"));
        assert!(
            outside.message.contains("only allowed in `user`"),
            "{outside}"
        );
        assert_eq!(outside.line, 11);
        let in_slot = one_error(&GOOD.replace(r#"new = ["total"]"#, r#"new = ["[[total]]"]"#));
        assert_eq!(in_slot.slot.as_deref(), Some("new"));
        let reversed = one_error(&GOOD.replace("[[Rename", "]]Rename").replace(".]]", ".[["));
        assert!(reversed.message.contains("before"), "{reversed}");
    }

    #[test]
    fn general_templates_may_omit_the_span() {
        let src = GOOD
            .replace("clear_direction", "general")
            .replace("[[Rename", "Rename")
            .replace(".]]", ".");
        let (ts, errs) = parse(&src);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            ts[0].render(&mut ChaCha8Rng::seed_from_u64(0)).direction,
            None
        );
    }

    #[test]
    fn toml_and_schema_errors_have_lines() {
        let e = one_error("[[template]]\nid = \"x\"\nkind = \n");
        assert_eq!(e.line, 3);
        let e =
            one_error(&GOOD.replace("domain = \"code\"", "domain = \"code\"\ncolour = \"red\""));
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.line, 7);
        let e = one_error(&GOOD.replace("\"clear_direction\"", "\"clear\""));
        assert_eq!((e.line, e.template.as_deref()), (4, Some("code.rename")));
        let e = one_error(&GOOD.replace("role = \"assistant\"", "role = \"robot\""));
        assert!(e.message.contains("robot"), "{e}");
        let e = one_error(&GOOD.replace("{{lang}}.", "{{lang}.}"));
        assert!(e.message.contains("without a closing"), "{e}");
    }

    #[test]
    fn duplicate_ids_across_files() {
        let a = Path::new("a.toml");
        let b = Path::new("b.toml");
        let err = Library::from_sources([(a, GOOD), (b, GOOD)]).expect_err("duplicate");
        assert_eq!(err.0.len(), 1);
        assert_eq!(
            err.0[0].to_string(),
            "b.toml:2: template `code.rename`: duplicate template id (first defined at a.toml:2)"
        );
    }
}
