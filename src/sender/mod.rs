//! The sender loop (to be built).
