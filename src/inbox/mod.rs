//! The inbox: watch, parse, ingest.

pub mod parse;
