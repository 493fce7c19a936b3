//! A bounded, shared cache of classifications keyed by statement text.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::{classify, Classification};

/// Texts longer than this are classified every time instead of cached, so
/// the cache's memory stays bounded by entries x this size.
pub const MAX_CACHED_TEXT: usize = 8 * 1024;

pub struct ClassifierCache {
    entries: Mutex<LruCache<Box<str>, Arc<Classification>>>,
}

impl ClassifierCache {
    pub fn new(capacity: usize) -> ClassifierCache {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        ClassifierCache {
            entries: Mutex::new(LruCache::new(capacity)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Box<str>, Arc<Classification>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The classification of `text`, from the cache when possible.
    pub fn classify(&self, text: &str) -> Arc<Classification> {
        if text.len() > MAX_CACHED_TEXT {
            return Arc::new(classify(text));
        }
        if let Some(hit) = self.lock().get(text) {
            return hit.clone();
        }
        // Parse outside the lock: other sessions keep hitting the cache meanwhile.
        let fresh = Arc::new(classify(text));
        self.lock().put(text.into(), fresh.clone());
        fresh
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
    use proptest::prelude::*;

    #[test]
    fn bounded_and_consistent() {
        let cache = ClassifierCache::new(2);
        let a = cache.classify("INSERT INTO t VALUES (1)");
        assert!(
            Arc::ptr_eq(&a, &cache.classify("INSERT INTO t VALUES (1)")),
            "second lookup is a hit"
        );
        cache.classify("SELECT 1");
        cache.classify("SELECT 2");
        assert_eq!(cache.len(), 2);
        let long = format!("SELECT {}", "1 + ".repeat(MAX_CACHED_TEXT)) + "1";
        assert!(!cache.classify(&long).writes_rows());
        assert_eq!(cache.len(), 2, "long texts are not cached");
    }

    proptest! {
        /// Any text classifies without panicking, and the cache agrees with a fresh parse.
        #[test]
        fn any_text_classifies_and_cache_agrees(text in ".{0,200}") {
            let cache = ClassifierCache::new(16);
            let first = cache.classify(&text);
            prop_assert_eq!(&*first, &classify(&text));
            prop_assert_eq!(&*cache.classify(&text), &*first);
        }
    }
}
