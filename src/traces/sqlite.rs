//! The embedded trace store: one SQLite file in WAL mode.
//!
//! A trace is stored as its JSON body plus the columns that lists filter
//! on. Two connections share the file: one for the writer thread (traces
//! and retrieval counts) and one for the admin API and extraction, so that
//! a slow admin query does not hold up recording. WAL lets them read while
//! the other writes.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rusqlite::{params, params_from_iter, types::Value as SqlValue, Connection, OpenFlags, Row};
use serde_json::Value;

use super::{
    BehaviorPatch, Feedback, FeedbackFilter, Retention, StoreError, StoredBehavior, Trace,
    TraceFilter, TracePage, TraceStore,
};

/// Schema version kept in `PRAGMA user_version`; a file with a higher one
/// was written by a newer mull and is not touched.
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's write lock before
/// it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS traces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    strategy TEXT NOT NULL,
    agreement REAL,
    converged INTEGER NOT NULL DEFAULT 0,
    feedback_score REAL,
    feedback_label TEXT,
    feedback_ms INTEGER,
    extracted INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_created ON traces (created_ms);
CREATE TABLE IF NOT EXISTS behaviors (
    name TEXT PRIMARY KEY,
    instruction TEXT NOT NULL,
    tags TEXT NOT NULL,
    source_traces TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    times_retrieved INTEGER NOT NULL DEFAULT 0,
    effect TEXT
);
";

pub struct SqliteStore {
    writer: Mutex<Connection>,
    admin: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and its folder when
    /// missing. An existing file that is not a sound SQLite database of
    /// this schema is reported and left as it is.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let unusable = |cause: String| StoreError::Unusable {
            path: path.display().to_string(),
            cause,
        };
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder)
                .map_err(|e| unusable(format!("cannot create its folder: {e}")))?;
        }
        let writer = connect(path).map_err(|e| unusable(e.to_string()))?;
        check(&writer).map_err(unusable)?;
        initialize(&writer).map_err(unusable)?;
        let admin = connect(path).map_err(|e| unusable(e.to_string()))?;
        Ok(Self {
            writer: Mutex::new(writer),
            admin: Mutex::new(admin),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable:
        // SQLite rolls back an unfinished statement itself.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admin(&self) -> MutexGuard<'_, Connection> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    Ok(connection)
}

/// Reads the file before anything is written to it: its header, its schema
/// version and SQLite's quick consistency check.
fn check(connection: &Connection) -> Result<(), String> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "its schema version is {version}, newer than this mull's {SCHEMA_VERSION}"
        ));
    }
    let problems = quick_check(connection).map_err(|e| e.to_string())?;
    if problems != ["ok"] {
        return Err(format!("it is damaged: {}", problems.join("; ")));
    }
    Ok(())
}

fn quick_check(connection: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = connection.prepare("PRAGMA quick_check")?;
    let problems = statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(problems)
}

fn initialize(connection: &Connection) -> Result<(), String> {
    let failed = |e: rusqlite::Error| e.to_string();
    // Takes effect only on a new file, before its first table: deleted
    // traces can then be returned to the file system.
    connection
        .pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .map_err(failed)?;
    let mode: String = connection
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(failed)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal mode WAL is unavailable (got {mode})"));
    }
    // In WAL mode, NORMAL keeps committed transactions when the process is
    // killed; only a power loss or an OS crash can roll back the last ones.
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(failed)?;
    connection.execute_batch(SCHEMA).map_err(failed)?;
    connection
        .pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(failed)?;
    Ok(())
}

/// Reads a trace from `body, feedback_score, feedback_label, feedback_ms`.
fn trace_from_row(row: &Row) -> rusqlite::Result<(String, Option<Feedback>)> {
    let body: String = row.get(0)?;
    let feedback_ms: Option<i64> = row.get(3)?;
    let feedback = match feedback_ms {
        Some(created_ms) => Some(Feedback {
            score: row.get(1)?,
            label: row.get(2)?,
            created_ms,
        }),
        None => None,
    };
    Ok((body, feedback))
}

fn decode_trace((body, feedback): (String, Option<Feedback>)) -> Result<Trace, StoreError> {
    let mut trace: Trace = serde_json::from_str(&body)?;
    trace.feedback = feedback;
    Ok(trace)
}

const TRACE_COLUMNS: &str = "body, feedback_score, feedback_label, feedback_ms";

const BEHAVIOR_COLUMNS: &str =
    "name, instruction, tags, source_traces, created_ms, times_retrieved, effect";

/// A `behaviors` row with its JSON columns still as text.
struct BehaviorRow {
    name: String,
    instruction: String,
    tags: String,
    sources: String,
    created_ms: i64,
    times_retrieved: i64,
    effect: Option<String>,
}

fn read_behavior(row: &Row) -> rusqlite::Result<BehaviorRow> {
    Ok(BehaviorRow {
        name: row.get(0)?,
        instruction: row.get(1)?,
        tags: row.get(2)?,
        sources: row.get(3)?,
        created_ms: row.get(4)?,
        times_retrieved: row.get(5)?,
        effect: row.get(6)?,
    })
}

fn decode_behavior(row: BehaviorRow) -> Result<StoredBehavior, StoreError> {
    Ok(StoredBehavior {
        name: row.name,
        instruction: row.instruction,
        tags: serde_json::from_str(&row.tags)?,
        source_traces: serde_json::from_str(&row.sources)?,
        created_ms: row.created_ms,
        times_retrieved: row.times_retrieved.max(0) as u64,
        effect: row.effect.map(|e| serde_json::from_str(&e)).transpose()?,
    })
}

fn behavior_named(
    connection: &Connection,
    name: &str,
) -> Result<Option<StoredBehavior>, StoreError> {
    let mut statement = connection.prepare(&format!(
        "SELECT {BEHAVIOR_COLUMNS} FROM behaviors WHERE name = ?1"
    ))?;
    let mut rows = statement.query_map([name], read_behavior)?;
    rows.next().transpose()?.map(decode_behavior).transpose()
}

impl TraceStore for SqliteStore {
    fn insert(&self, trace: &Trace) -> Result<(), StoreError> {
        let body = serde_json::to_string(trace)?;
        let report = trace.decoding.as_ref();
        let agreement = report
            .and_then(|r| r.get("agreement"))
            .and_then(Value::as_f64);
        let converged = report.and_then(|r| r.get("converged")) == Some(&Value::Bool(true));
        self.writer().execute(
            "INSERT INTO traces (id, created_ms, model, endpoint, strategy, agreement, converged, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                trace.id,
                trace.created_ms,
                trace.model,
                trace.endpoint,
                trace.strategy,
                agreement,
                converged,
                body
            ],
        )?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Trace>, StoreError> {
        let connection = self.admin();
        let mut statement =
            connection.prepare(&format!("SELECT {TRACE_COLUMNS} FROM traces WHERE id = ?1"))?;
        let mut rows = statement.query_map([id], trace_from_row)?;
        rows.next().transpose()?.map(decode_trace).transpose()
    }

    fn list(&self, filter: &TraceFilter) -> Result<TracePage, StoreError> {
        let mut conditions: Vec<&'static str> = Vec::new();
        let mut values: Vec<SqlValue> = Vec::new();
        let mut text = |condition: &'static str, value: &Option<String>| {
            if let Some(value) = value {
                conditions.push(condition);
                values.push(SqlValue::Text(value.clone()));
            }
        };
        text("model = ?", &filter.model);
        text("strategy = ?", &filter.strategy);
        text("endpoint = ?", &filter.endpoint);
        let mut integer = |condition: &'static str, value: Option<i64>| {
            if let Some(value) = value {
                conditions.push(condition);
                values.push(SqlValue::Integer(value));
            }
        };
        integer("created_ms >= ?", filter.since_ms);
        integer("created_ms < ?", filter.until_ms);
        integer("seq < ?", filter.cursor);
        match filter.feedback {
            Some(FeedbackFilter::Positive) => conditions.push("feedback_score > 0"),
            Some(FeedbackFilter::Negative) => conditions.push("feedback_score < 0"),
            Some(FeedbackFilter::Any) => conditions.push("feedback_ms IS NOT NULL"),
            Some(FeedbackFilter::None) => conditions.push("feedback_ms IS NULL"),
            None => {}
        }
        let condition = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        // One row past the page tells whether another page follows.
        values.push(SqlValue::Integer(filter.limit as i64 + 1));
        let connection = self.admin();
        let mut statement = connection.prepare(&format!(
            "SELECT {TRACE_COLUMNS}, seq FROM traces {condition} ORDER BY seq DESC LIMIT ?"
        ))?;
        let rows = statement
            .query_map(params_from_iter(values), |row| {
                Ok((trace_from_row(row)?, row.get::<_, i64>(4)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() > filter.limit;
        let mut traces = Vec::with_capacity(filter.limit);
        let mut last_seq = None;
        for (row, seq) in rows.into_iter().take(filter.limit) {
            traces.push(decode_trace(row)?);
            last_seq = Some(seq);
        }
        Ok(TracePage {
            traces,
            next_cursor: if more { last_seq } else { None },
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let deleted = self
            .admin()
            .execute("DELETE FROM traces WHERE id = ?1", [id])?;
        Ok(deleted > 0)
    }

    fn set_feedback(&self, id: &str, feedback: &Feedback) -> Result<bool, StoreError> {
        let changed = self.admin().execute(
            "UPDATE traces SET feedback_score = ?1, feedback_label = ?2, feedback_ms = ?3
             WHERE id = ?4",
            params![feedback.score, feedback.label, feedback.created_ms, id],
        )?;
        Ok(changed > 0)
    }

    fn prune(&self, retention: &Retention, now_ms: i64) -> Result<usize, StoreError> {
        let connection = self.writer();
        let mut deleted = 0;
        if let Some(max_age) = retention.max_age {
            let oldest_kept = now_ms.saturating_sub(max_age.as_millis() as i64);
            deleted +=
                connection.execute("DELETE FROM traces WHERE created_ms < ?1", [oldest_kept])?;
        }
        if let Some(max_bytes) = retention.max_bytes {
            loop {
                let live = live_bytes(&connection)?;
                if live <= max_bytes {
                    break;
                }
                let count: i64 =
                    connection.query_row("SELECT count(*) FROM traces", [], |row| row.get(0))?;
                let batch = connection.execute(
                    "DELETE FROM traces WHERE seq IN
                     (SELECT seq FROM traces ORDER BY seq LIMIT ?1)",
                    [super::excess_traces(count, live, max_bytes)],
                )?;
                if batch == 0 {
                    break;
                }
                deleted += batch;
            }
        }
        if deleted > 0 {
            // Returns the freed pages to the file system (the file was
            // created with incremental auto-vacuum).
            connection.execute_batch("PRAGMA incremental_vacuum")?;
        }
        Ok(deleted)
    }

    fn solved_unextracted(
        &self,
        min_agreement: f64,
        limit: usize,
    ) -> Result<Vec<Trace>, StoreError> {
        let connection = self.admin();
        let mut statement = connection.prepare(&format!(
            "SELECT {TRACE_COLUMNS} FROM traces
             WHERE extracted = 0 AND endpoint = 'chat'
               AND (agreement >= ?1 OR converged = 1 OR feedback_score > 0)
             ORDER BY seq LIMIT ?2"
        ))?;
        let rows = statement
            .query_map(params![min_agreement, limit as i64], trace_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode_trace).collect()
    }

    fn mark_extracted(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut connection = self.admin();
        let transaction = connection.transaction()?;
        {
            let mut statement =
                transaction.prepare("UPDATE traces SET extracted = 1 WHERE id = ?1")?;
            for id in ids {
                statement.execute([id])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn behaviors(&self) -> Result<Vec<StoredBehavior>, StoreError> {
        let connection = self.admin();
        let mut statement = connection.prepare(&format!(
            "SELECT {BEHAVIOR_COLUMNS} FROM behaviors ORDER BY name"
        ))?;
        let rows = statement
            .query_map([], read_behavior)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode_behavior).collect()
    }

    fn behavior(&self, name: &str) -> Result<Option<StoredBehavior>, StoreError> {
        behavior_named(&self.admin(), name)
    }

    fn add_behavior(&self, behavior: &StoredBehavior) -> Result<(), StoreError> {
        let effect = behavior
            .effect
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let inserted = self.admin().execute(
            "INSERT INTO behaviors
             (name, instruction, tags, source_traces, created_ms, times_retrieved, effect)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
            params![
                behavior.name,
                behavior.instruction,
                serde_json::to_string(&behavior.tags)?,
                serde_json::to_string(&behavior.source_traces)?,
                behavior.created_ms,
                behavior.times_retrieved as i64,
                effect
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::DuplicateBehavior(behavior.name.clone()));
        }
        Ok(())
    }

    fn update_behavior(
        &self,
        name: &str,
        patch: &BehaviorPatch,
    ) -> Result<Option<StoredBehavior>, StoreError> {
        let mut connection = self.admin();
        let transaction = connection.transaction()?;
        let Some(mut behavior) = behavior_named(&transaction, name)? else {
            return Ok(None);
        };
        if let Some(new_name) = patch.name.as_ref().filter(|n| *n != name) {
            if behavior_named(&transaction, new_name)?.is_some() {
                return Err(StoreError::DuplicateBehavior(new_name.clone()));
            }
            behavior.name = new_name.clone();
        }
        if let Some(instruction) = &patch.instruction {
            behavior.instruction = instruction.clone();
        }
        if let Some(tags) = &patch.tags {
            behavior.tags = tags.clone();
        }
        if let Some(effect) = &patch.effect {
            behavior.effect = effect.clone();
        }
        let effect = behavior
            .effect
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        transaction.execute(
            "UPDATE behaviors SET name = ?1, instruction = ?2, tags = ?3, effect = ?4
             WHERE name = ?5",
            params![
                behavior.name,
                behavior.instruction,
                serde_json::to_string(&behavior.tags)?,
                effect,
                name
            ],
        )?;
        transaction.commit()?;
        Ok(Some(behavior))
    }

    fn delete_behavior(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self
            .admin()
            .execute("DELETE FROM behaviors WHERE name = ?1", [name])?;
        Ok(deleted > 0)
    }

    fn add_behavior_sources(&self, name: &str, traces: &[String]) -> Result<(), StoreError> {
        let mut connection = self.admin();
        let transaction = connection.transaction()?;
        let Some(mut behavior) = behavior_named(&transaction, name)? else {
            return Ok(());
        };
        for trace in traces {
            if !behavior.source_traces.contains(trace) {
                behavior.source_traces.push(trace.clone());
            }
        }
        transaction.execute(
            "UPDATE behaviors SET source_traces = ?1 WHERE name = ?2",
            params![serde_json::to_string(&behavior.source_traces)?, name],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn count_retrievals(&self, names: &[String]) -> Result<(), StoreError> {
        let mut connection = self.writer();
        let transaction = connection.transaction()?;
        {
            let mut statement = transaction.prepare(
                "UPDATE behaviors SET times_retrieved = times_retrieved + 1 WHERE name = ?1",
            )?;
            for name in names {
                statement.execute([name])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }
}

/// Bytes of the file in use: all pages but the free ones.
fn live_bytes(connection: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| -> rusqlite::Result<i64> {
        connection.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
    };
    let pages = pragma("page_count")? - pragma("freelist_count")?;
    Ok((pages.max(0) * pragma("page_size")?) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::contract::{self, contract_tests};

    fn open() -> Option<(Box<dyn std::any::Any>, Box<dyn TraceStore>)> {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("traces.db")).unwrap();
        Some((Box::new(dir), Box::new(store)))
    }

    contract_tests!(open);

    #[test]
    fn prune_by_size_bounds_live_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("traces.db")).unwrap();
        contract::fill_big_traces(&store, 50);
        let retention = Retention {
            max_age: None,
            max_bytes: Some(200_000),
        };
        assert!(store.prune(&retention, 0).unwrap() > 0);
        assert!(live_bytes(&store.writer()).unwrap() <= 200_000);
    }

    #[test]
    fn corrupt_file_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traces.db");
        let garbage = b"this is not a database, and it must survive a failed start".repeat(100);
        std::fs::write(&path, &garbage).unwrap();
        let error = SqliteStore::open(&path)
            .err()
            .expect("a corrupt file is rejected");
        assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
        assert!(error.to_string().contains("traces.db"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn missing_folder_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("traces.db");
        SqliteStore::open(&path).unwrap();
        assert!(path.is_file());
        // Opening again finds the same schema.
        SqliteStore::open(&path).unwrap();
    }
}
