//! dreamloop learning core.

pub mod checkpoint;
pub mod events;
pub mod rollback;
