//! replication::progress: reading and recording how far this region has
//! applied each origin (`meridian.applied`) and each origin's floor.

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
