//! receipts (to be built).
