//! General replay sources: the 25 % of every batch that keeps the model from forgetting.
//!
//! Following the operator's notes (SEED.md, "you forget what you don't practice"), the
//! replay covers arithmetic, code, short reasoning and plain text:
//!
//! - procedural arithmetic whose answers are verified: the expression tree computes the
//!   answer, and an independent parser re-reads the rendered question and must agree;
//! - small code tasks (write a function) with a reference solution and a worked example
//!   value computed here;
//! - short reasoning items (orderings, calendars, letter counts, rates) with computed
//!   answers;
//! - chunks of the bundled text corpus (`scenarios/corpus/train/*.txt`) as
//!   continue-the-text SFT examples, at random word windows so chunks rarely coincide.
//!
//! The held-out corpus (`scenarios/corpus/heldout/`) is only ever read by
//! [`load_heldout`], for the monitor's perplexity; nothing here samples from it.
//! Everything is SFT with kind `general`; deduplication is the ledger's job.

use std::fs;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::example::{Example, Kind, Message, Target};

/// Errors reading the corpus.
#[derive(Debug, thiserror::Error)]
pub enum GeneralError {
    /// A corpus directory or file could not be read.
    #[error("general corpus {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A corpus file is not UTF-8 text.
    #[error("general corpus {path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The first invalid byte.
        offset: usize,
    },
}

fn sft(prompt: String, completion: String, provenance: String) -> Example {
    Example {
        kind: Kind::General,
        prompt: vec![Message::new("user", prompt)],
        target: Target::Sft { completion },
        direction: None,
        provenance,
        reference: None,
    }
}

// ---------------------------------------------------------------------------------------
// Arithmetic
// ---------------------------------------------------------------------------------------

/// An arithmetic expression over integers.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// A literal.
    Num(i64),
    /// `left op right`, op one of `+ - * /`.
    Op(Box<Expr>, char, Box<Expr>),
}

impl Expr {
    fn eval(&self) -> Option<i64> {
        match self {
            Expr::Num(n) => Some(*n),
            Expr::Op(a, op, b) => apply(a.eval()?, *op, b.eval()?),
        }
    }

    fn render(&self, top: bool) -> String {
        match self {
            Expr::Num(n) => n.to_string(),
            Expr::Op(a, op, b) => {
                let s = format!("{} {op} {}", a.render(false), b.render(false));
                if top {
                    s
                } else {
                    format!("({s})")
                }
            }
        }
    }

    /// Post-order steps "a op b = c", one per operation.
    fn steps(&self, out: &mut Vec<String>) -> Option<i64> {
        match self {
            Expr::Num(n) => Some(*n),
            Expr::Op(a, op, b) => {
                let x = a.steps(out)?;
                let y = b.steps(out)?;
                let z = apply(x, *op, y)?;
                out.push(format!("{x} {op} {y} = {z}"));
                Some(z)
            }
        }
    }
}

/// Exact integer arithmetic; `None` on overflow or inexact division.
fn apply(x: i64, op: char, y: i64) -> Option<i64> {
    match op {
        '+' => x.checked_add(y),
        '-' => x.checked_sub(y),
        '*' => x.checked_mul(y),
        '/' if y != 0 && x % y == 0 => Some(x / y),
        _ => None,
    }
}

fn random_expr<R: Rng>(rng: &mut R, ops: usize) -> Expr {
    if ops == 0 {
        return Expr::Num(rng.random_range(2..=999));
    }
    let left_ops = rng.random_range(0..ops);
    let op = *['+', '-', '*', '/'].choose(rng).expect("non-empty");
    let a = random_expr(rng, left_ops);
    match op {
        '*' => {
            // Keep products readable: one factor small.
            let b = if ops - 1 - left_ops == 0 {
                Expr::Num(rng.random_range(2..=99))
            } else {
                random_expr(rng, ops - 1 - left_ops)
            };
            Expr::Op(Box::new(a), op, Box::new(b))
        }
        '/' => {
            // Divide a value by one of its divisors so the answer is an integer.
            let value = a.eval().unwrap_or(1);
            let divisors: Vec<i64> = (2..=60).filter(|d| value != 0 && value % d == 0).collect();
            match divisors.choose(rng) {
                Some(&d) => Expr::Op(Box::new(a), '/', Box::new(Expr::Num(d))),
                None => Expr::Op(
                    Box::new(a),
                    '+',
                    Box::new(Expr::Num(rng.random_range(2..=999))),
                ),
            }
        }
        _ => Expr::Op(
            Box::new(a),
            op,
            Box::new(random_expr(rng, ops - 1 - left_ops)),
        ),
    }
}

/// An independent reader for rendered expressions (integers, + - * /, parentheses), so
/// the answer is checked against the text the model will see, not the tree it came from.
fn parse_and_eval(s: &str) -> Option<i64> {
    fn expr(t: &[u8], i: &mut usize) -> Option<i64> {
        let mut v = term(t, i)?;
        while let Some(&c) = t.get(*i) {
            if c != b'+' && c != b'-' {
                break;
            }
            *i += 1;
            v = apply(v, c as char, term(t, i)?)?;
        }
        Some(v)
    }
    fn term(t: &[u8], i: &mut usize) -> Option<i64> {
        let mut v = atom(t, i)?;
        while let Some(&c) = t.get(*i) {
            if c != b'*' && c != b'/' {
                break;
            }
            *i += 1;
            v = apply(v, c as char, atom(t, i)?)?;
        }
        Some(v)
    }
    fn atom(t: &[u8], i: &mut usize) -> Option<i64> {
        if t.get(*i) == Some(&b'(') {
            *i += 1;
            let v = expr(t, i)?;
            (t.get(*i) == Some(&b')')).then_some(())?;
            *i += 1;
            return Some(v);
        }
        let start = *i;
        while t.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        std::str::from_utf8(&t[start..*i]).ok()?.parse().ok()
    }
    let compact: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut i = 0;
    let v = expr(&compact, &mut i)?;
    (i == compact.len()).then_some(v)
}

/// One arithmetic problem with a verified, worked answer (1 to 3 operations).
pub fn arithmetic<R: Rng>(rng: &mut R) -> Example {
    loop {
        let ops = rng.random_range(1..=3);
        let e = random_expr(rng, ops);
        let text = e.render(true);
        let mut steps = Vec::new();
        let (Some(answer), Some(checked)) = (e.steps(&mut steps), parse_and_eval(&text)) else {
            continue;
        };
        if answer != checked {
            continue;
        }
        let ask = [
            "What is {}?",
            "Compute {}.",
            "Calculate {} and show your steps.",
            "Evaluate {}.",
            "What does {} equal?",
        ]
        .choose(rng)
        .expect("non-empty")
        .replace("{}", &text);
        let completion = if steps.len() == 1 {
            format!("{text} = {answer}")
        } else {
            format!("{}\nSo {text} = {answer}.", steps.join("\n"))
        };
        return sft(ask, completion, "general:arithmetic".into());
    }
}

// ---------------------------------------------------------------------------------------
// Code tasks
// ---------------------------------------------------------------------------------------

/// One "write a function" task with a reference solution and a worked example value.
pub fn code_task<R: Rng>(rng: &mut R) -> Example {
    let python = rng.random_bool(0.5);
    let lang = if python { "Python" } else { "Rust" };
    let (prompt, completion) = match rng.random_range(0..5) {
        0 => {
            let k = rng.random_range(2..=9i64);
            let n = rng.random_range(10..=60i64);
            let name = *["sum_multiples", "multiples_total", "add_multiples"]
                .choose(rng)
                .expect("non-empty");
            let example: i64 = (0..n).filter(|i| i % k == 0).sum();
            let code = if python {
                format!("def {name}(n):\n    return sum(i for i in range(n) if i % {k} == 0)")
            } else {
                format!(
                    "fn {name}(n: u64) -> u64 {{\n    (0..n).filter(|i| i % {k} == 0).sum()\n}}"
                )
            };
            (
                format!("Write a {lang} function `{name}(n)` that returns the sum of the non-negative multiples of {k} below n."),
                format!("```{}\n{code}\n```\nFor example, `{name}({n})` returns {example}.", lang.to_lowercase()),
            )
        }
        1 => {
            let word = *WORDS.choose(rng).expect("non-empty");
            let name = *["count_vowels", "vowel_count", "num_vowels"]
                .choose(rng)
                .expect("non-empty");
            let count = word.chars().filter(|c| "aeiou".contains(*c)).count();
            let code = if python {
                format!("def {name}(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")")
            } else {
                format!("fn {name}(s: &str) -> usize {{\n    s.to_lowercase().chars().filter(|c| \"aeiou\".contains(*c)).count()\n}}")
            };
            (
                format!("Write a {lang} function `{name}` that counts the vowels (a, e, i, o, u) in a string, ignoring case."),
                format!("```{}\n{code}\n```\nFor example, on \"{word}\" it returns {count}.", lang.to_lowercase()),
            )
        }
        2 => {
            let lo = rng.random_range(-50..=0i64);
            let hi = rng.random_range(1..=100i64);
            let x = rng.random_range(-120..=150i64);
            let name = *["clamp_value", "bound", "limit"]
                .choose(rng)
                .expect("non-empty");
            let code = if python {
                format!("def {name}(x):\n    return max({lo}, min({hi}, x))")
            } else {
                format!("fn {name}(x: i64) -> i64 {{\n    x.clamp({lo}, {hi})\n}}")
            };
            (
                format!("Write a {lang} function `{name}(x)` that limits x to the range {lo} to {hi}, inclusive."),
                format!("```{}\n{code}\n```\nFor example, `{name}({x})` returns {}.", lang.to_lowercase(), x.clamp(lo, hi)),
            )
        }
        3 => {
            let n = rng.random_range(5..=40u32);
            let name = *["fib", "fibonacci", "nth_fib"]
                .choose(rng)
                .expect("non-empty");
            let (mut a, mut b) = (0u64, 1u64);
            for _ in 0..n {
                (a, b) = (b, a + b);
            }
            let code = if python {
                format!("def {name}(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a")
            } else {
                format!("fn {name}(n: u32) -> u64 {{\n    let (mut a, mut b) = (0u64, 1u64);\n    for _ in 0..n {{\n        (a, b) = (b, a + b);\n    }}\n    a\n}}")
            };
            (
                format!("Write a {lang} function `{name}(n)` returning the n-th Fibonacci number, with {name}(0) = 0 and {name}(1) = 1, iteratively."),
                format!("```{}\n{code}\n```\nFor example, `{name}({n})` returns {a}.", lang.to_lowercase()),
            )
        }
        _ => {
            let words: Vec<&str> = WORDS.choose_multiple(rng, 3).copied().collect();
            let sentence = words.join(" ");
            let reversed: Vec<&str> = words.iter().rev().copied().collect();
            let name = *["reverse_words", "flip_words", "words_backwards"]
                .choose(rng)
                .expect("non-empty");
            let code = if python {
                format!("def {name}(s):\n    return \" \".join(reversed(s.split()))")
            } else {
                format!("fn {name}(s: &str) -> String {{\n    s.split_whitespace().rev().collect::<Vec<_>>().join(\" \")\n}}")
            };
            (
                format!("Write a {lang} function `{name}` that reverses the order of the words in a string."),
                format!("```{}\n{code}\n```\nFor example, \"{sentence}\" becomes \"{}\".", lang.to_lowercase(), reversed.join(" ")),
            )
        }
    };
    sft(prompt, completion, "general:code".into())
}

const WORDS: &[&str] = &[
    "strawberry",
    "banana",
    "keyboard",
    "mountain",
    "library",
    "elephant",
    "umbrella",
    "orange",
    "committee",
    "bookkeeper",
    "mississippi",
    "algorithm",
    "parallel",
    "occurrence",
    "rhythm",
    "queue",
    "engineer",
    "balloon",
    "coffee",
    "tomorrow",
    "address",
    "successful",
    "necessary",
    "assessment",
    "referee",
    "giraffe",
    "pepper",
    "window",
    "garden",
    "river",
    "compiler",
];

const NAMES: &[&str] = &[
    "Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira",
    "Liam", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara",
];

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

// ---------------------------------------------------------------------------------------
// Reasoning
// ---------------------------------------------------------------------------------------

/// One short reasoning item with a computed answer.
pub fn reasoning<R: Rng>(rng: &mut R) -> Example {
    let (prompt, completion) = match rng.random_range(0..5) {
        0 => {
            let p: Vec<&str> = NAMES.choose_multiple(rng, 3).copied().collect();
            let (adj, most, least) = *[
                ("older", "oldest", "youngest"),
                ("taller", "tallest", "shortest"),
                ("faster", "fastest", "slowest"),
            ]
            .choose(rng)
            .expect("non-empty");
            // p[0] > p[1] > p[2]; the facts are given in either order.
            let facts = if rng.random_bool(0.5) {
                format!(
                    "{} is {adj} than {}. {} is {adj} than {}.",
                    p[0], p[1], p[1], p[2]
                )
            } else {
                format!(
                    "{} is {adj} than {}. {} is {adj} than {}.",
                    p[1], p[2], p[0], p[1]
                )
            };
            if rng.random_bool(0.5) {
                (
                    format!("{facts} Who is the {most}?"),
                    format!(
                        "{} is {adj} than {}, who is {adj} than {}, so {} is the {most}.",
                        p[0], p[1], p[2], p[0]
                    ),
                )
            } else {
                (
                    format!("{facts} Who is the {least}?"),
                    format!(
                        "{} is {adj} than {}, who is {adj} than {}, so {} is the {least}.",
                        p[0], p[1], p[2], p[2]
                    ),
                )
            }
        }
        1 => {
            let today = rng.random_range(0..7usize);
            let n = rng.random_range(2..=100usize);
            let day = DAYS[(today + n) % 7];
            (
                format!("If today is {}, what day of the week will it be in {n} days?", DAYS[today]),
                format!("{n} days is {} weeks and {} days, and {} days after {} is {day}. So it will be {day}.", n / 7, n % 7, n % 7, DAYS[today]),
            )
        }
        2 => {
            let word = *WORDS.choose(rng).expect("non-empty");
            let letters: Vec<char> = word.chars().collect();
            let letter = *letters.choose(rng).expect("words are non-empty");
            let count = letters.iter().filter(|&&c| c == letter).count();
            let times = if count == 1 { "time" } else { "times" };
            (
                format!("How many times does the letter '{letter}' appear in \"{word}\"?"),
                format!(
                    "Spelling it out: {}. The letter '{letter}' appears {count} {times}.",
                    letters
                        .iter()
                        .map(char::to_string)
                        .collect::<Vec<_>>()
                        .join("-")
                ),
            )
        }
        3 => {
            let hours = rng.random_range(2..=9i64);
            let speed = rng.random_range(3..=120i64);
            let km = hours * speed;
            (
                format!("A train travels {km} km in {hours} hours at a steady speed. What is its speed in km/h?"),
                format!("Speed is distance over time: {km} km / {hours} h = {speed} km/h."),
            )
        }
        _ => {
            let minutes = rng.random_range(61..=1000i64);
            (
                format!("How many hours and minutes are {minutes} minutes?"),
                format!(
                    "{minutes} = 60 × {} + {}, so it is {} hours and {} minutes.",
                    minutes / 60,
                    minutes % 60,
                    minutes / 60,
                    minutes % 60
                ),
            )
        }
    };
    sft(prompt, completion, "general:reasoning".into())
}

// ---------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------

/// One corpus document.
#[derive(Debug, Clone)]
struct Doc {
    /// Path for provenance.
    path: PathBuf,
    /// The text.
    text: String,
    /// Byte offsets of word starts, for word-aligned windows.
    words: Vec<usize>,
}

/// The bundled general-text training corpus.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// The documents, in path order.
    docs: Vec<Doc>,
    /// Total words, to weight documents by size.
    total_words: usize,
}

/// Reads every `*.txt` directly in `dir`, sorted by name, as (path, text). A missing
/// directory is an empty list.
fn read_texts(dir: &Path) -> Result<Vec<(PathBuf, String)>, GeneralError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GeneralError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let bytes = fs::read(&path).map_err(io(&path))?;
        let text = String::from_utf8(bytes).map_err(|e| GeneralError::NotUtf8 {
            path: path.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        out.push((path, text));
    }
    Ok(out)
}

impl Corpus {
    /// The training corpus of a scenario directory: `<scenarios>/corpus/train/*.txt`.
    pub fn load_train(scenarios_dir: &Path) -> Result<Corpus, GeneralError> {
        Corpus::load_dir(&scenarios_dir.join("corpus").join("train"))
    }

    /// Every `*.txt` in `dir`.
    pub fn load_dir(dir: &Path) -> Result<Corpus, GeneralError> {
        let mut corpus = Corpus::default();
        for (path, text) in read_texts(dir)? {
            let words: Vec<usize> = text
                .char_indices()
                .filter(|&(i, c)| {
                    !c.is_whitespace() && (i == 0 || text[..i].ends_with(char::is_whitespace))
                })
                .map(|(i, _)| i)
                .collect();
            if words.len() < 8 {
                continue;
            }
            corpus.total_words += words.len();
            corpus.docs.push(Doc { path, text, words });
        }
        Ok(corpus)
    }

    /// Whether there is any usable text.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// A continue-the-text example from a random window of `min_words..=max_words` words:
    /// the first third is the prompt, the rest the completion. `None` if empty.
    pub fn chunk<R: Rng>(
        &self,
        rng: &mut R,
        min_words: usize,
        max_words: usize,
    ) -> Option<Example> {
        if self.docs.is_empty() {
            return None;
        }
        let mut pick = rng.random_range(0..self.total_words);
        let doc = self
            .docs
            .iter()
            .find(|d| {
                if pick < d.words.len() {
                    true
                } else {
                    pick -= d.words.len();
                    false
                }
            })
            .expect("pick < total_words");
        let n = doc.words.len();
        let len = rng
            .random_range(min_words.max(4)..=max_words.max(min_words.max(4)))
            .min(n);
        let first = rng.random_range(0..=n - len);
        let start = doc.words[first];
        let split = doc.words[first + len / 3];
        let end = doc
            .words
            .get(first + len)
            .copied()
            .unwrap_or(doc.text.len());
        let head = doc.text[start..split].trim_end();
        let tail = doc.text[split..end].trim_end();
        let line = doc.text[..start].matches('\n').count() + 1;
        let ask = [
            "Continue this text:",
            "Continue the passage:",
            "Write what comes next:",
        ]
        .choose(rng)
        .expect("non-empty");
        Some(sft(
            format!("{ask}\n\n{head}"),
            tail.to_string(),
            format!("{}:{line}", doc.path.display()),
        ))
    }
}

/// A held-out text for the monitor's perplexity; never trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldoutText {
    /// The file it came from.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// The held-out texts of a scenario directory: `<scenarios>/corpus/heldout/*.txt`.
pub fn load_heldout(scenarios_dir: &Path) -> Result<Vec<HeldoutText>, GeneralError> {
    Ok(read_texts(&scenarios_dir.join("corpus").join("heldout"))?
        .into_iter()
        .map(|(path, text)| HeldoutText { path, text })
        .collect())
}

// ---------------------------------------------------------------------------------------
// The replay source
// ---------------------------------------------------------------------------------------

/// Replay settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneralConfig {
    /// Relative weights of arithmetic, code, reasoning and corpus items.
    pub weights: [f64; 4],
    /// Corpus window length in words, inclusive range.
    pub chunk_words: (usize, usize),
}

impl Default for GeneralConfig {
    fn default() -> Self {
        GeneralConfig {
            weights: [0.25, 0.25, 0.2, 0.3],
            chunk_words: (48, 160),
        }
    }
}

/// An endless, seeded stream of general examples.
#[derive(Debug, Clone)]
pub struct GeneralReplay {
    /// The training corpus (may be empty: its weight then goes to the others).
    corpus: Corpus,
    /// The sampling stream.
    rng: ChaCha8Rng,
    /// Settings.
    config: GeneralConfig,
}

impl GeneralReplay {
    /// A replay stream over `corpus`, seeded.
    pub fn new(corpus: Corpus, seed: u64, config: GeneralConfig) -> GeneralReplay {
        GeneralReplay {
            corpus,
            rng: ChaCha8Rng::seed_from_u64(seed),
            config,
        }
    }

    /// Replaces the sources' relative weights (the controller's targeted replay).
    pub fn set_weights(&mut self, weights: [f64; 4]) {
        self.config.weights = weights;
    }

    /// The sources' relative weights in force.
    pub fn weights(&self) -> [f64; 4] {
        self.config.weights
    }

    /// The next general example.
    pub fn next_example(&mut self) -> Example {
        let mut w = self.config.weights.map(|x| x.max(0.0));
        if self.corpus.is_empty() {
            w[3] = 0.0;
        }
        let total: f64 = w.iter().sum();
        let mut x = if total > 0.0 {
            self.rng.random_range(0.0..total)
        } else {
            0.0
        };
        let mut which = 0;
        for (i, wi) in w.iter().enumerate() {
            if x < *wi {
                which = i;
                break;
            }
            x -= wi;
        }
        match which {
            1 => code_task(&mut self.rng),
            2 => reasoning(&mut self.rng),
            3 => {
                let (lo, hi) = self.config.chunk_words;
                self.corpus
                    .chunk(&mut self.rng, lo, hi)
                    .unwrap_or_else(|| arithmetic(&mut self.rng))
            }
            _ => arithmetic(&mut self.rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(e: &Example) -> &str {
        match &e.target {
            Target::Sft { completion } => completion,
            Target::Dpo { .. } => panic!("general examples are SFT"),
        }
    }

    #[test]
    fn parser_agrees_with_hand_computed_values() {
        assert_eq!(parse_and_eval("(17 + 5) * 3"), Some(66));
        assert_eq!(parse_and_eval("100 - 2 * 3"), Some(94));
        assert_eq!(parse_and_eval("(84 / 12) - 10"), Some(-3));
        assert_eq!(parse_and_eval("7 / 2"), None);
        assert_eq!(parse_and_eval("(1 + 2"), None);
    }

    #[test]
    fn arithmetic_answers_are_right() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..500 {
            let e = arithmetic(&mut rng);
            let done = completion(&e);
            // The last line ends with "<expr> = <answer>" (or is it); recompute from the
            // expression text with the independent parser.
            let last = done
                .lines()
                .last()
                .expect("non-empty")
                .trim_start_matches("So ")
                .trim_end_matches('.');
            let (expr, answer) = last.rsplit_once(" = ").expect("has =");
            assert_eq!(parse_and_eval(expr), answer.parse().ok(), "{done}");
            assert!(e.prompt[0].content.contains(expr), "{e:?}");
        }
    }

    #[test]
    fn reasoning_and_code_are_well_formed() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let r = reasoning(&mut rng);
            assert_eq!(r.kind, Kind::General);
            let c = code_task(&mut rng);
            assert!(completion(&c).starts_with("```"), "{c:?}");
        }
        // Day arithmetic checked by hand: 10 days after Tuesday is a Friday.
        assert_eq!(DAYS[(1 + 10) % 7], "Friday");
    }
}
