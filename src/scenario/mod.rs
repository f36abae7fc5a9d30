//! Scenarios: template parsing and rendering (`template`), the never-repeat ledger
//! (`ledger`) and the generator that combines them (`generate`).
//!
//! Templates live in `scenarios/**/*.toml`; their schema is documented in
//! `scenarios/README.md`. The generator yields fresh train scenarios, the labeler
//! (`crate::label`) turns them into training examples.

pub mod generate;
pub mod ledger;
pub mod template;

pub use generate::{probe_scenarios, GenerateError, Generator, GeneratorConfig};
pub use ledger::{Ledger, LedgerError, LedgerPolicy, Recovery};
pub use template::{Library, LibraryError, Split, Template, TemplateError};
