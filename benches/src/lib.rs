//! # meshchat-benches
//!
//! Criterion benches across the crates live in `benches/benches/*.rs`; run them all with
//! `cargo bench -p meshchat-benches`. This library is empty on purpose.
