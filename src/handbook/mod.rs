//! The learned behavior handbook: behaviors kept in the trace store,
//! served to the `handbook` strategy and grown by extraction from solved
//! traces ([`extract`]).
//!
//! Retrieval ranks an in-memory BM25 index ([`StaticHandbook`]) that is
//! rebuilt from the store after every change, so a request never waits for
//! the database. Retrieval counts reach the store through the trace
//! writer's queue.

pub mod extract;

use std::sync::{Arc, RwLock};

use crate::{
    decoding::{handbook::StaticHandbook, Behavior, BehaviorSource},
    traces::{now_ms, Recorder, StoreError, StoredBehavior, TraceStore},
};

/// Maximum length of a behavior name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Maximum length of an instruction, in characters.
pub const MAX_INSTRUCTION_CHARS: usize = 400;

/// Behaviors from the store, ranked in memory.
pub struct StoredHandbook {
    store: Arc<dyn TraceStore>,
    recorder: Arc<Recorder>,
    index: RwLock<Arc<StaticHandbook>>,
}

impl StoredHandbook {
    /// Loads the store's behaviors after importing those of `seed` whose
    /// names the store does not have yet. A stored behavior of the same
    /// name is kept as it is, edits included.
    pub fn open(
        store: Arc<dyn TraceStore>,
        recorder: Arc<Recorder>,
        seed: &[Behavior],
    ) -> Result<Self, StoreError> {
        for behavior in seed {
            let stored = StoredBehavior {
                name: behavior.name.clone(),
                instruction: behavior.instruction.clone(),
                tags: behavior.tags.clone(),
                source_traces: Vec::new(),
                created_ms: now_ms(),
                times_retrieved: 0,
                effect: None,
            };
            match store.add_behavior(&stored) {
                Ok(()) | Err(StoreError::DuplicateBehavior(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let handbook = Self {
            store,
            recorder,
            index: RwLock::new(Arc::new(StaticHandbook::default())),
        };
        handbook.reload()?;
        Ok(handbook)
    }

    /// Rebuilds the index from the store; call after every change.
    pub fn reload(&self) -> Result<(), StoreError> {
        let behaviors = self
            .store
            .behaviors()?
            .into_iter()
            .map(|b| Behavior {
                name: b.name,
                instruction: b.instruction,
                tags: b.tags,
            })
            .collect();
        let index = Arc::new(StaticHandbook::new(behaviors));
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(())
    }

    fn index(&self) -> Arc<StaticHandbook> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BehaviorSource for StoredHandbook {
    fn retrieve(&self, query: &str, k: usize) -> Vec<Behavior> {
        let found = self.index().retrieve(query, k);
        self.recorder
            .count_retrievals(found.iter().map(|b| b.name.clone()).collect());
        found
    }

    fn count(&self) -> usize {
        self.index().count()
    }
}

/// Checks a behavior name: lowercase letters, digits and underscores, at
/// most [`MAX_NAME_CHARS`] long. Returns the problem otherwise.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "must be 1 to {MAX_NAME_CHARS} characters, got {}",
            name.chars().count()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "must hold only lowercase letters, digits and underscores, got `{name}`"
        ));
    }
    Ok(())
}

/// Checks an instruction: one non-empty line of at most
/// [`MAX_INSTRUCTION_CHARS`] characters.
pub fn check_instruction(instruction: &str) -> Result<(), String> {
    let length = instruction.chars().count();
    if instruction.trim().is_empty() || length > MAX_INSTRUCTION_CHARS {
        return Err(format!(
            "must be 1 to {MAX_INSTRUCTION_CHARS} characters, got {length}"
        ));
    }
    if instruction.contains('\n') {
        return Err("must be one line".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        metrics::Metrics,
        traces::{sqlite::SqliteStore, Retention, TraceConfig},
    };

    #[test]
    fn seed_imported_once_and_retrieval_counted() {
        let dir = tempfile::tempdir().unwrap();
        let config = TraceConfig {
            path: dir.path().join("t.db"),
            postgres_url: None,
            queue_capacity: 16,
            retention: Retention {
                max_age: None,
                max_bytes: None,
            },
            retention_interval: Duration::from_secs(60),
        };
        let store: Arc<dyn TraceStore> = Arc::new(SqliteStore::open(&config.path).unwrap());
        let recorder = Arc::new(Recorder::start(
            store.clone(),
            &config,
            Arc::new(Metrics::new()),
        ));
        let seed = vec![Behavior {
            name: "rate_times_time".into(),
            instruction: "Distance equals speed multiplied by time.".into(),
            tags: vec!["speed".into()],
        }];
        let handbook = StoredHandbook::open(store.clone(), recorder.clone(), &seed).unwrap();
        // A second start finds the behavior and keeps it.
        StoredHandbook::open(store.clone(), recorder.clone(), &seed).unwrap();
        assert_eq!(handbook.count(), 1);
        let found = handbook.retrieve("a train at a speed of 80 km per hour", 2);
        assert_eq!(found.len(), 1);
        recorder.close(Duration::from_secs(10));
        let stored = store.behavior("rate_times_time").unwrap().unwrap();
        assert_eq!(stored.times_retrieved, 1);
    }

    #[test]
    fn names_checked() {
        assert!(check_name("check_units").is_ok());
        assert!(check_name("Check Units").is_err());
        assert!(check_name("").is_err());
        assert!(check_instruction("Check the units.").is_ok());
        assert!(check_instruction("two\nlines").is_err());
    }
}
