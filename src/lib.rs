//! dreamloop's learning core: models, losses, optimizers, the data plane and the policies
//! that decide what the daemon does. Everything here is plain, synchronous and testable on
//! CPU; the runtime (actors, signals, metrics export) lives in the `dreamloop-actors` crate.
//! See `DESIGN.md` for the map.

pub mod checkpoint;
pub mod config;
pub mod controller;
pub mod convo;
pub mod dream;
pub mod durable;
pub mod eval;
pub mod events;
pub mod example;
pub mod general;
pub mod history;
pub mod label;
pub mod metrics;
pub mod mix;
pub mod model;
pub mod pending;
pub mod plan;
pub mod report;
pub mod rollback;
pub mod scenario;
pub mod segmented;
pub mod selfcheck;
pub mod sink;
pub mod train;
