//! The clock's high-water mark in `meridian.clock`, kept as a lease.
//!
//! hlc-gen cannot be seeded, and a restarted proxy whose wall clock was set
//! back would otherwise issue stamps below ones it issued before. So the
//! proxy persists a mark *ahead* of what it stamps: before and while stamping
//! it keeps `high_water >= now + LEASE/2`, renewing to `now + LEASE`. At
//! start it moves its clock past the stored mark. The cost is two small
//! writes a second per proxy; the price of a crash
//! is that a restart within [`LEASE`] stamps up to one lease ahead of the wall
//! clock until time catches up.
//!
//! Stamps are never held back waiting for a renewal (a client's write must not
//! wait on meridian's own bookkeeping); if renewals fail for longer than the
//! lease, the proxy logs it, and the guarantee then rests on the wall clock.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::CaptureError;
use crate::clock::Clock;
use crate::config::Config;

/// How far ahead of local time the persisted mark is kept.
pub const LEASE: Duration = Duration::from_millis(1000);
const TICK: Duration = Duration::from_millis(100);

/// The persisted mark, or `None` when meridian's schema is not installed.
pub async fn load(client: &Client, region: u16) -> Result<Option<u64>, CaptureError> {
    let installed: bool = client
        .query_one("SELECT to_regclass('meridian.clock') IS NOT NULL", &[])
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "looking for meridian.clock".into(),
            source,
        })?
        .get(0);
    if !installed {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT high_water FROM meridian.clock WHERE region_id = $1",
            &[&i32::from(region)],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.clock".into(),
            source,
        })?;
    Ok(Some(row.map_or(0, |r| r.get::<_, i64>(0) as u64)))
}

/// Raises the persisted mark to `mark` (never lowers it).
pub async fn persist(client: &Client, region: u16, mark: u64) -> Result<(), CaptureError> {
    client
        .execute(
            "INSERT INTO meridian.clock (region_id, high_water) VALUES ($1, $2)
             ON CONFLICT (region_id) DO UPDATE
             SET high_water = greatest(meridian.clock.high_water, excluded.high_water)",
            &[&i32::from(region), &(mark as i64)],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "writing meridian.clock".into(),
            source,
        })?;
    Ok(())
}

/// Keeps the lease: connects (retrying), moves the clock past the stored mark,
/// then renews until `stop`. `ready` is cancelled once the clock has moved past
/// the stored mark (or it is known that there is none).
pub async fn keep_lease(
    config: Config,
    clock: Arc<Clock>,
    ready: CancellationToken,
    stop: CancellationToken,
) {
    let region = config.region.id;
    let mut warned = false;
    loop {
        let attempt = async {
            let client = super::connect(&config).await?;
            let stored = load(&client, region).await?;
            Ok::<_, CaptureError>((client, stored))
        };
        let (client, stored) = tokio::select! {
            r = attempt => match r {
                Ok(ok) => ok,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot read the clock's high-water mark yet; retrying");
                        warned = true;
                    }
                    ready.cancel();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            },
            _ = stop.cancelled() => return,
        };
        let Some(stored) = stored else {
            if !warned {
                tracing::warn!("meridian's schema is not installed in the backend database; run `meridian migrate` (stamps are not persisted until then)");
                warned = true;
            }
            ready.cancel();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = stop.cancelled() => return,
            }
        };
        clock.advance_past(stored);
        let mut persisted = stored;
        warned = false;
        loop {
            let now = clock.now_ms();
            let due = Clock::hlc_at(now + LEASE.as_millis() as i64 / 2);
            if persisted < due || persisted < clock.last() {
                let mark = Clock::hlc_at(now + LEASE.as_millis() as i64).max(clock.last());
                if let Err(e) = persist(&client, region, mark).await {
                    tracing::warn!(error = %e, "renewing the clock lease failed; reconnecting");
                    break;
                }
                persisted = mark;
            }
            ready.cancel();
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
