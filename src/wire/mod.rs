//! wire: the Postgres protocol front door.
//!
//! Owns everything between a client's socket and the region's PostgreSQL:
//! framing ([`frame`], [`startup`]), TLS ([`tls`], [`stream`]), client
//! authentication ([`scram`]), the backend session ([`backend`]), cancel keys
//! ([`cancel`]), the per-session handshake ([`session`]) and the byte relay
//! ([`relay`]). It is a frame relay, not a Postgres re-implementation: it
//! decodes only startup, authentication, message boundaries, statement texts
//! and names, and ReadyForQuery, and forwards everything else byte for byte.
//! (It injects nothing: capture stamps transactions from the WAL.)
//! It calls nothing above it; the proxy's accept loop calls into it.

pub mod backend;
pub mod cancel;
pub mod frame;
pub mod relay;
pub mod scram;
pub mod session;
pub mod startup;
pub mod stream;
pub mod tls;
