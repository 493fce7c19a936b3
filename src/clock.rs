//! clock: meridian's hybrid logical clock, on top of hlc-gen.
//!
//! A stamp is hlc-gen's 64-bit HLC (42 bits of milliseconds since 2024-01-01,
//! 22 bits of counter). A [`Version`] is the pair (hlc, region id), totally
//! ordered, so two regions never tie. The clock:
//!
//! - never goes backwards across restarts: [`Clock::start`] takes the
//!   high-water mark persisted in Postgres and moves past it, even when the
//!   wall clock was set back by more than the maximum drift;
//! - always checks drift on receive events ([`Clock::observe`]): a stamp
//!   further ahead of local time than `max_drift` is refused, to be held by
//!   the caller. hlc-gen's own check is not used (the generator is built with
//!   drift 0) because it would also refuse to move past our own high-water
//!   mark after a clock set-back; the check here is always on instead;
//! - waits for the next millisecond when the 22-bit counter overflows;
//! - reads time only from its [`ClockSource`], so tests set it back or forward.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use hlc_gen::source::{ClockSource, ManualClock, UtcClock};
use hlc_gen::{HlcGenerator, HlcTimestamp};

pub use hlc_gen::source;

/// Default maximum drift, as CockroachDB and uhlc use.
pub const DEFAULT_MAX_DRIFT: Duration = Duration::from_millis(500);

/// A row version: the HLC of the writing transaction and the writing region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub hlc: u64,
    pub region: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("stamp is {ahead_ms} ms ahead of local time, above the maximum drift of {max_ms} ms")]
    TooFarAhead { ahead_ms: i64, max_ms: u64 },
    #[error("stamp {0} is not a valid HLC")]
    Invalid(u64),
}

/// Milliseconds since the Unix epoch of a stamp.
pub fn physical_ms(hlc: u64) -> Option<i64> {
    HlcTimestamp::try_from(hlc).ok().map(|t| t.timestamp())
}

/// Where the clock reads the time: the system clock, optionally shifted (so a
/// test can start a real proxy with its clock set back), or a manual value.
#[derive(Debug)]
enum TimeSource {
    System { offset_ms: i64 },
    Manual(AtomicI64),
}

/// The region's clock. Cheap to share: all operations are lock-free.
///
/// hlc-gen's generator only comes with a system or a manual source, so the
/// generator runs on a manual source that is set from [`TimeSource`] just
/// before each stamp.
pub struct Clock {
    generator: HlcGenerator<ManualClock>,
    max_drift: Duration,
    source: TimeSource,
}

impl Clock {
    /// A clock on system time that issues stamps above `high_water`.
    pub fn start(high_water: u64, max_drift: Duration) -> Clock {
        Clock::shifted(0, high_water, max_drift)
    }

    /// A clock on system time shifted by `offset_ms` (negative: set back).
    pub fn shifted(offset_ms: i64, high_water: u64, max_drift: Duration) -> Clock {
        Clock::with_source(TimeSource::System { offset_ms }, high_water, max_drift)
    }

    /// A clock on manually set time (milliseconds since the Unix epoch), for tests.
    pub fn manual(now_ms: i64, high_water: u64, max_drift: Duration) -> Clock {
        Clock::with_source(
            TimeSource::Manual(AtomicI64::new(now_ms)),
            high_water,
            max_drift,
        )
    }

    /// Sets a manual clock's time; ignored by a system clock.
    pub fn set_time(&self, now_ms: i64) {
        if let TimeSource::Manual(now) = &self.source {
            now.store(now_ms, Ordering::SeqCst);
        }
    }

    fn with_source(source: TimeSource, high_water: u64, max_drift: Duration) -> Clock {
        let generator = HlcGenerator::manual(0);
        let clock = Clock {
            generator,
            max_drift,
            source,
        };
        clock.generator.set_current_timestamp(clock.now_ms());
        clock.advance_past(high_water);
        clock
    }

    /// A stamp for a local event, larger than every stamp issued or observed before.
    pub fn stamp(&self) -> u64 {
        loop {
            self.generator.set_current_timestamp(self.now_ms());
            if let Some(ts) = self.generator.next_timestamp() {
                return ts.as_u64();
            }
            // 2^22 stamps in one millisecond: wait for the next one.
            std::thread::yield_now();
        }
    }

    /// A stamp for a local event that happened at `unix_ms` (a transaction's
    /// commit time, read back from the WAL a moment later): that time's HLC
    /// if it is above every stamp issued or observed before, else just
    /// above them. Never ahead of the clock's own time.
    pub fn stamp_at(&self, unix_ms: i64) -> u64 {
        loop {
            self.generator
                .set_current_timestamp(unix_ms.min(self.now_ms()));
            if let Some(ts) = self.generator.next_timestamp() {
                return ts.as_u64();
            }
            std::thread::yield_now();
        }
    }

    /// The last stamp issued or observed (what to persist as the high-water mark).
    pub fn last(&self) -> u64 {
        self.generator.timestamp().as_u64()
    }

    /// Receive event: after this, local stamps are above `incoming`. Refused,
    /// leaving the clock untouched, when `incoming` is too far ahead.
    pub fn observe(&self, incoming: u64) -> Result<(), ClockError> {
        let ts = HlcTimestamp::try_from(incoming).map_err(|_| ClockError::Invalid(incoming))?;
        let now = self.now_ms();
        let ahead_ms = ts.timestamp() - now;
        let max_ms = self.max_drift.as_millis() as u64;
        if ahead_ms > max_ms as i64 {
            return Err(ClockError::TooFarAhead { ahead_ms, max_ms });
        }
        self.generator.set_current_timestamp(now);
        let _ = self.generator.update(&ts);
        Ok(())
    }

    /// Moves past a persisted high-water mark, however far ahead of local
    /// time it is (the wall clock may have been set back since it was written).
    pub fn advance_past(&self, high_water: u64) {
        if let Ok(mark) = HlcTimestamp::try_from(high_water) {
            self.generator.set_current_timestamp(self.now_ms());
            let _ = self.generator.update(&mark);
        }
    }

    /// Local time in milliseconds since the Unix epoch, from the injected source.
    pub fn now_ms(&self) -> i64 {
        match &self.source {
            TimeSource::Manual(now) => now.load(Ordering::SeqCst),
            TimeSource::System { offset_ms } => UtcClock.current_timestamp() + offset_ms,
        }
    }

    /// The HLC whose physical part is `unix_ms` and whose counter is 0.
    pub fn hlc_at(unix_ms: i64) -> u64 {
        HlcTimestamp::from_parts(unix_ms, 0)
            .map(|t| t.as_u64())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_790_000_000_000; // 2026-09

    #[test]
    fn stamps_increase_and_carry_physical_time() {
        let clock = Clock::manual(T0, 0, DEFAULT_MAX_DRIFT);
        let a = clock.stamp();
        let b = clock.stamp();
        assert!(b > a);
        assert_eq!(physical_ms(a), Some(T0));
        clock.set_time(T0 + 5);
        assert_eq!(physical_ms(clock.stamp()), Some(T0 + 5));
    }

    #[test]
    fn restart_with_clock_set_back_far_still_issues_larger_stamps() {
        let before = Clock::manual(T0, 0, DEFAULT_MAX_DRIFT);
        let last = (0..10).map(|_| before.stamp()).last().unwrap();
        // An hour back: far beyond the maximum drift.
        let after = Clock::manual(T0 - 3_600_000, before.last(), DEFAULT_MAX_DRIFT);
        assert!(after.stamp() > last);
    }

    #[test]
    fn observe_refuses_stamps_beyond_max_drift_and_accepts_within() {
        let remote = Clock::manual(T0 + 10_000, 0, DEFAULT_MAX_DRIFT);
        let local = Clock::manual(T0, 0, DEFAULT_MAX_DRIFT);
        let far = remote.stamp();
        assert!(matches!(
            local.observe(far),
            Err(ClockError::TooFarAhead {
                ahead_ms: 10_000,
                max_ms: 500
            })
        ));
        assert!(
            local.stamp() < far,
            "a refused stamp leaves the clock untouched"
        );
        remote.set_time(T0 + 400);
        let near = Clock::manual(T0 + 400, 0, DEFAULT_MAX_DRIFT).stamp();
        local.observe(near).unwrap();
        assert!(
            local.stamp() > near,
            "receive event: later local stamps follow the remote one"
        );
    }

    #[test]
    fn counter_overflow_waits_for_the_next_millisecond() {
        let clock = std::sync::Arc::new(Clock::manual(T0, 0, DEFAULT_MAX_DRIFT));
        // Exhaust the 22-bit counter within one millisecond.
        for _ in 0..(1u32 << 22) - 1 {
            clock.stamp();
        }
        let ticker = {
            let clock = clock.clone();
            std::thread::spawn(move || {
                // Advance time once the stamping thread is waiting.
                std::thread::sleep(Duration::from_millis(50));
                clock.set_time(T0 + 1);
            })
        };
        let next = clock.stamp();
        ticker.join().unwrap();
        assert_eq!(physical_ms(next), Some(T0 + 1));
    }

    proptest! {
        /// Whatever the wall clock does (jumps back or forward) and whatever is
        /// observed, stamps strictly increase and stay above everything observed.
        #[test]
        fn stamps_are_monotonic_under_any_time_and_receive_events(
            steps in proptest::collection::vec((-2_000i64..2_000, proptest::option::of(-400i64..400)), 1..200)
        ) {
            let clock = Clock::manual(T0, 0, DEFAULT_MAX_DRIFT);
            let mut now = T0;
            let mut last = clock.stamp();
            for (jump, remote_offset) in steps {
                now += jump;
                clock.set_time(now);
                if let Some(off) = remote_offset {
                    let remote = Clock::manual(now + off, 0, DEFAULT_MAX_DRIFT).stamp();
                    clock.observe(remote).unwrap();
                    let s = clock.stamp();
                    prop_assert!(s > remote);
                    prop_assert!(s > last);
                    last = s;
                }
                let s = clock.stamp();
                prop_assert!(s > last);
                last = s;
            }
        }

        /// Versions order by HLC first and region second; equal HLCs never tie.
        #[test]
        fn version_order_is_total_and_breaks_hlc_ties_by_region(a in any::<u64>(), b in any::<u64>(), ra in any::<u16>(), rb in any::<u16>()) {
            let (va, vb) = (Version { hlc: a, region: ra }, Version { hlc: b, region: rb });
            prop_assert_eq!(va.cmp(&vb), a.cmp(&b).then(ra.cmp(&rb)));
            prop_assert_eq!(va == vb, a == b && ra == rb);
        }
    }
}
