//! Parsing and validating drop files.
