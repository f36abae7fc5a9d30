//! dreamloop learning core.

pub mod train;
