//! replication::progress: reading and recording how far this region has
//! applied each origin (`meridian.applied`) and each origin's floor, and the
//! applied vector every receiver of this process sees move
//! ([`AppliedVector`]).

use tokio::sync::watch;
use tokio_postgres::Client;

use super::protocol::{OriginPosition, Position};
use super::ReplicationError;
use crate::capture::CaptureError;

/// Records `origin`'s floor once everything it sent before is applied.
pub(super) async fn note_floor(
    client: &Client,
    origin: u16,
    hlc: i64,
) -> Result<(), ReplicationError> {
    client
        .execute(
            "SELECT meridian.note_floor($1, $2)",
            &[&i32::from(origin), &hlc],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "recording a peer's floor".into(),
            source,
        })?;
    Ok(())
}

/// Everything this region has applied, per origin.
pub(super) async fn applied_vector(
    client: &Client,
) -> Result<Vec<OriginPosition>, ReplicationError> {
    let rows = client
        .query("SELECT origin, xid, seq FROM meridian.applied", &[])
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.applied".into(),
            source,
        })?;
    Ok(rows
        .iter()
        .map(|r| OriginPosition {
            origin: r.get::<_, i32>(0) as u16,
            position: Position {
                xid: r.get::<_, i64>(1) as u64,
                seq: r.get(2),
            },
        })
        .collect())
}

pub(super) async fn applied_position(
    client: &Client,
    origin: u16,
) -> Result<Position, ReplicationError> {
    let row = client
        .query_opt(
            "SELECT xid, seq FROM meridian.applied WHERE origin = $1",
            &[&i32::from(origin)],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.applied".into(),
            source,
        })?;
    Ok(row.map_or(Position::default(), |r| Position {
        xid: r.get::<_, i64>(0) as u64,
        seq: r.get(1),
    }))
}

/// This region's applied vector as the receivers of this process know it:
/// each advances it after an apply commits, and a receiver whose changes
/// wait for another origin's wakes when it moves. (Applies made elsewhere,
/// by another process or `meridian.apply`, are merged in from
/// `meridian.applied` by the waiting receiver now and then.)
pub struct AppliedVector {
    tx: watch::Sender<Vec<OriginPosition>>,
}

impl Default for AppliedVector {
    fn default() -> Self {
        AppliedVector {
            tx: watch::Sender::new(Vec::new()),
        }
    }
}

impl AppliedVector {
    pub fn subscribe(&self) -> watch::Receiver<Vec<OriginPosition>> {
        self.tx.subscribe()
    }

    /// Raises the entries of `positions` that are ahead of what is known.
    pub fn merge(&self, positions: &[OriginPosition]) {
        self.tx.send_if_modified(|have| {
            let mut moved = false;
            for p in positions {
                match have.iter_mut().find(|h| h.origin == p.origin) {
                    Some(h) if h.position < p.position => {
                        h.position = p.position;
                        moved = true;
                    }
                    Some(_) => {}
                    None => {
                        have.push(*p);
                        moved = true;
                    }
                }
            }
            moved
        });
    }
}
