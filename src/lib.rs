//! dreamloop learning core.
pub mod convo;
pub mod example;
pub mod general;
pub mod label;
pub mod mix;
pub mod scenario;
