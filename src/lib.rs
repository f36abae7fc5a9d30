//! dreamloop learning core.
pub mod model;
