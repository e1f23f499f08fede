//! admin (to be built).
