//! Shared helpers of the end-to-end tests, one module per area.
#![allow(dead_code)]

pub mod inbox;
pub mod ops;
pub mod sim;
pub mod world;
