//! The APNs client (to be built).
