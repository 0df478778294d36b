//! `tv-agent`: the daemon that runs on each network TV.
//!
//! Skeleton only: the agent (power-on sequence, cached-call fetch, dialling and voice
//! media) is built in its own issue on top of the server core. Until then the
//! load generator in `call-proxy-server` plays the TVs.

fn main() {
    eprintln!(
        "tv-agent {}: not built yet (protocol version {}); use call-proxy-loadgen to simulate TVs",
        env!("CARGO_PKG_VERSION"),
        shared_proto::PROTOCOL_VERSION
    );
    std::process::exit(2);
}
