//! dreamloop learning core.
