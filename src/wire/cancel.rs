//! Cancel keys. Clients get keys issued by the proxy, never the backend's, so
//! a cancel request must come through meridian, which maps it to the backend
//! session it belongs to and forwards it there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::wire::backend::{send_cancel, BackendAddr};

#[derive(Debug, Clone, Copy)]
struct Target {
    secret: i32,
    backend_pid: i32,
    backend_secret: i32,
}

#[derive(Debug)]
pub struct CancelRegistry {
    backend: BackendAddr,
    next_pid: AtomicI32,
    sessions: Mutex<HashMap<i32, Target>>,
}

/// A session's registration; removed from the registry when dropped.
#[derive(Debug)]
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn new(backend: BackendAddr) -> Arc<CancelRegistry> {
        Arc::new(CancelRegistry {
            backend,
            next_pid: AtomicI32::new(1),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Target>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a client-facing key for a backend session.
    pub fn register(self: &Arc<Self>, backend_pid: i32, backend_secret: i32) -> CancelKey {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & i32::MAX;
        let secret = rand::thread_rng().gen();
        self.lock().insert(
            pid,
            Target {
                secret,
                backend_pid,
                backend_secret,
            },
        );
        CancelKey {
            registry: self.clone(),
            pid,
            secret,
        }
    }

    /// Forwards a client's cancel request; false when the key is unknown.
    pub async fn cancel(&self, pid: i32, secret: i32) -> bool {
        let target = self.lock().get(&pid).copied();
        match target {
            Some(t) if t.secret == secret => {
                if let Err(e) = send_cancel(&self.backend, t.backend_pid, t.backend_secret).await {
                    tracing::warn!(error = %e, "could not forward cancel request");
                }
                true
            }
            _ => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_unique_and_released() {
        let reg = CancelRegistry::new(BackendAddr::Unix("/nonexistent".into()));
        let a = reg.register(10, 11);
        let b = reg.register(10, 11);
        assert_ne!(a.pid, b.pid);
        assert_eq!(reg.len(), 2);
        assert!(
            !reg.cancel(a.pid, a.secret.wrapping_add(1)).await,
            "wrong secret must not cancel"
        );
        drop(a);
        assert_eq!(reg.len(), 1);
    }
}
