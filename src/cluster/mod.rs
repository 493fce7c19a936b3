//! cluster: running meridian and PostgreSQL locally. [`postgres`] starts and
//! cleans up real PostgreSQL servers (the demo, the test harness and the
//! benchmarks all use it, so what the tests exercise is what users run);
//! [`demo`] builds a whole multi-region cluster on one machine; [`certs`]
//! issues the certificates its peer links use.

pub mod certs;
pub mod demo;
pub mod postgres;
