//! cluster: running meridian and PostgreSQL locally. [`postgres`] starts and
//! cleans up real PostgreSQL servers (the demo, the test harness and the
//! benchmarks all use it, so what the tests exercise is what users run);
//! [`demo`] builds a whole multi-region cluster on one machine.

pub mod demo;
pub mod postgres;
