//! `call-proxy-loadgen`: drives simulated TVs against a call-proxy server (placeholder).

fn main() {}
