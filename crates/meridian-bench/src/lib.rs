//! Benchmark tools: the bare-axum baseline (the HTTP ceiling on this machine) and the load
//! generator (`loadgen`), which also checks that everything it got a 200 for was stored.

pub mod messages;
