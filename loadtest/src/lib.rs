//! # meshchat-loadtest
//!
//! Owns `meshchat-loadtest`: opens 100k+ QUIC connections, drives chat scenarios, and reports
//! latency, throughput and memory per connection.
//!
//! Not built yet: this crate is filled in by the load-test issue.
