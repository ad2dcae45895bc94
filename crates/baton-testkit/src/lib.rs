//! baton's test support, shared by the integration tests (`tests/*.rs`, as `common::testkit`)
//! and the `baton-chaos` load tool. It is never published and nothing in the proxy uses it.
//!
//! Everything runs on loopback, on ephemeral ports:
//!
//! - [`origin`]: an HTTP origin with a few routes (sized, chunked and slow bodies, a body
//!   hash, the request headers, a request that never ends);
//! - [`echo`]: a TCP echo server, the far end of CONNECT tunnels;
//! - [`client`]: a keep-alive HTTP/1.1 client that talks to the proxy in absolute form
//!   ([`ProxyConnection`]) and a CONNECT tunnel opener ([`open_tunnel`]);
//! - [`load`]: a background client pool ([`Load`]) that counts every request that does not
//!   end in a complete 200, for "nothing fails while baton hands off";
//! - [`tunnels`]: long-lived CONNECT tunnels that echo hash-checked data ([`LongTunnels`]);
//! - [`tls`]: a test certificate authority and the TLS client side, for TLS listeners;
//! - [`data`]: the deterministic bodies the origin serves ([`pattern`]) and [`sha256_hex`];
//! - [`browser`]: a headless Chromium driven over the DevTools protocol ([`Browser`]), for
//!   pages whose own scripts must run.

pub mod bench;
pub mod browser;
pub mod client;
pub mod data;
pub mod echo;
pub mod h2;
pub mod load;
pub mod origin;
pub mod sockets;
pub mod tls;
pub mod tunnels;
pub mod websocket;

pub use browser::Browser;
pub use client::{
    ClientError, ClientStream, ProxyConnection, connect_tcp, content_length, open_tunnel, open_tunnel_over,
    open_tunnel_via, read_head, read_response,
};
pub use data::{pattern, pattern_byte, sha256_hex};
pub use echo::start_echo;
pub use load::{Load, LoadReport, LoadSpec};
pub use origin::{start_counted_origin, start_origin, start_tls_origin};
pub use tls::{ProxyTls, TestCa, write_secret};
pub use tunnels::{LongTunnels, TunnelReport, assert_intact};
