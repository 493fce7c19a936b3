//! meridian: an active-active, geo-replicated PostgreSQL proxy.
//!
//! The crate is a library driven by a thin binary (`src/main.rs`), so every
//! behaviour can be exercised from tests. Modules follow the data path:
//!
//! - [`wire`]: the Postgres protocol front door (startup, TLS, auth, relay, cancel).
//! - [`proxy`]: a region's accept loop, connection limit and graceful shutdown.
//! - [`admin`]: the per-region HTTP endpoint (`/health`, `/metrics`, `/status`).
//! - [`config`]: the TOML configuration and its validation.
//! - [`sql`]: statement classification; [`clock`]: the hybrid logical clock.
//! - [`capture`]: `meridian migrate`, the change reader, the clock lease;
//!   [`rules`]: the conflict rule files and the rule engine (`rules::merge`).
//! - [`replication`]: shipping changes to peers and applying theirs.
//! - [`link`]: the WAN emulator between regions.
//! - [`cluster`]: local PostgreSQL servers and the multi-region `demo`.
//! - [`ops`]: `meridian status` and `meridian verify`, for operators.
//! - [`shutdown`]: the drain and abort signals every part stops on.

pub mod admin;
pub mod capture;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod link;
pub mod net;
pub mod ops;
pub mod proxy;
pub mod replication;
pub mod rules;
pub mod shutdown;
pub mod sql;
pub mod wire;
