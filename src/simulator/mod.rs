//! The APNs simulator (to be built).
