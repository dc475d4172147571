//! Benchmark tools: the bare-axum baseline (the HTTP ceiling on this machine) and, with the
//! benchmark harness, the load generator.
