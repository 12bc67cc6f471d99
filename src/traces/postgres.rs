//! The trace store on PostgreSQL, for deployments where several servers
//! share one store. It keeps the same tables as the SQLite store.
//!
//! The `postgres` client blocks on a runtime of its own, so every call must
//! come from a thread outside the async runtime: the writer thread,
//! `spawn_blocking`, or the thread that opens the store at start.

use std::{
    ops::{Deref, DerefMut},
    sync::{Mutex, MutexGuard},
};

use postgres::{types::ToSql, Client, NoTls, Row};
use serde_json::Value;

use super::{
    BehaviorPatch, Feedback, FeedbackFilter, Retention, StoreError, StoredBehavior, Trace,
    TraceFilter, TracePage, TraceStore,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS traces (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    strategy TEXT NOT NULL,
    agreement DOUBLE PRECISION,
    converged BOOLEAN NOT NULL DEFAULT FALSE,
    feedback_score DOUBLE PRECISION,
    feedback_label TEXT,
    feedback_ms BIGINT,
    extracted BOOLEAN NOT NULL DEFAULT FALSE,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_created ON traces (created_ms);
CREATE TABLE IF NOT EXISTS behaviors (
    name TEXT PRIMARY KEY,
    instruction TEXT NOT NULL,
    tags TEXT NOT NULL,
    source_traces TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    times_retrieved BIGINT NOT NULL DEFAULT 0,
    effect TEXT
);
";

const TRACE_COLUMNS: &str = "body, feedback_score, feedback_label, feedback_ms";
const BEHAVIOR_COLUMNS: &str =
    "name, instruction, tags, source_traces, created_ms, times_retrieved, effect";

pub struct PostgresStore {
    writer: Mutex<Option<Client>>,
    admin: Mutex<Option<Client>>,
}

/// A locked client; the `Option` is `None` only while the store drops.
struct ClientGuard<'a>(MutexGuard<'a, Option<Client>>);

impl Deref for ClientGuard<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0
            .as_ref()
            .expect("clients are present until the store drops")
    }
}

impl DerefMut for ClientGuard<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0
            .as_mut()
            .expect("clients are present until the store drops")
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let clients: Vec<Client> = [&self.writer, &self.admin]
            .into_iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take())
            .collect();
        // Each client owns a runtime, which panics when dropped on an async
        // thread, and the last reference to the store may go there.
        let _ = std::thread::spawn(move || drop(clients)).join();
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a libpq connection string or
    /// URL) and creates the tables when missing. `name` stands for the
    /// database in error messages, so that a password in `url` is not
    /// printed.
    pub fn connect(url: &str, name: &str) -> Result<Self, StoreError> {
        let unusable = |e: postgres::Error| StoreError::Unusable {
            path: name.to_string(),
            cause: e.to_string(),
        };
        let mut writer = Client::connect(url, NoTls).map_err(unusable)?;
        writer.batch_execute(SCHEMA).map_err(unusable)?;
        let admin = Client::connect(url, NoTls).map_err(unusable)?;
        Ok(Self {
            writer: Mutex::new(Some(writer)),
            admin: Mutex::new(Some(admin)),
        })
    }

    fn writer(&self) -> ClientGuard<'_> {
        ClientGuard(self.writer.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn admin(&self) -> ClientGuard<'_> {
        ClientGuard(self.admin.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn decode_trace(row: &Row) -> Result<Trace, StoreError> {
    let body: String = row.try_get(0)?;
    let mut trace: Trace = serde_json::from_str(&body)?;
    let feedback_ms: Option<i64> = row.try_get(3)?;
    trace.feedback = match feedback_ms {
        Some(created_ms) => Some(Feedback {
            score: row.try_get(1)?,
            label: row.try_get(2)?,
            created_ms,
        }),
        None => None,
    };
    Ok(trace)
}

fn decode_behavior(row: &Row) -> Result<StoredBehavior, StoreError> {
    let tags: String = row.try_get(2)?;
    let sources: String = row.try_get(3)?;
    let effect: Option<String> = row.try_get(6)?;
    let times_retrieved: i64 = row.try_get(5)?;
    Ok(StoredBehavior {
        name: row.try_get(0)?,
        instruction: row.try_get(1)?,
        tags: serde_json::from_str(&tags)?,
        source_traces: serde_json::from_str(&sources)?,
        created_ms: row.try_get(4)?,
        times_retrieved: times_retrieved.max(0) as u64,
        effect: effect.map(|e| serde_json::from_str(&e)).transpose()?,
    })
}

fn behavior_named(
    client: &mut impl postgres::GenericClient,
    name: &str,
) -> Result<Option<StoredBehavior>, StoreError> {
    let row = client.query_opt(
        format!("SELECT {BEHAVIOR_COLUMNS} FROM behaviors WHERE name = $1").as_str(),
        &[&name],
    )?;
    row.as_ref().map(decode_behavior).transpose()
}

fn json_text(value: &Option<Value>) -> Result<Option<String>, StoreError> {
    Ok(value.as_ref().map(serde_json::to_string).transpose()?)
}

impl TraceStore for PostgresStore {
    fn insert(&self, trace: &Trace) -> Result<(), StoreError> {
        let body = serde_json::to_string(trace)?;
        let report = trace.decoding.as_ref();
        let agreement = report
            .and_then(|r| r.get("agreement"))
            .and_then(Value::as_f64);
        let converged = report.and_then(|r| r.get("converged")) == Some(&Value::Bool(true));
        self.writer().execute(
            "INSERT INTO traces (id, created_ms, model, endpoint, strategy, agreement, converged, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &trace.id,
                &trace.created_ms,
                &trace.model,
                &trace.endpoint,
                &trace.strategy,
                &agreement,
                &converged,
                &body,
            ],
        )?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Trace>, StoreError> {
        let row = self.admin().query_opt(
            format!("SELECT {TRACE_COLUMNS} FROM traces WHERE id = $1").as_str(),
            &[&id],
        )?;
        row.as_ref().map(decode_trace).transpose()
    }

    fn list(&self, filter: &TraceFilter) -> Result<TracePage, StoreError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        let mut add = |column: &str, operator: &str, value: Box<dyn ToSql + Sync>| {
            values.push(value);
            conditions.push(format!("{column} {operator} ${}", values.len()));
        };
        if let Some(model) = &filter.model {
            add("model", "=", Box::new(model.clone()));
        }
        if let Some(strategy) = &filter.strategy {
            add("strategy", "=", Box::new(strategy.clone()));
        }
        if let Some(endpoint) = &filter.endpoint {
            add("endpoint", "=", Box::new(endpoint.clone()));
        }
        if let Some(since) = filter.since_ms {
            add("created_ms", ">=", Box::new(since));
        }
        if let Some(until) = filter.until_ms {
            add("created_ms", "<", Box::new(until));
        }
        if let Some(cursor) = filter.cursor {
            add("seq", "<", Box::new(cursor));
        }
        match filter.feedback {
            Some(FeedbackFilter::Positive) => conditions.push("feedback_score > 0".into()),
            Some(FeedbackFilter::Negative) => conditions.push("feedback_score < 0".into()),
            Some(FeedbackFilter::Any) => conditions.push("feedback_ms IS NOT NULL".into()),
            Some(FeedbackFilter::None) => conditions.push("feedback_ms IS NULL".into()),
            None => {}
        }
        let condition = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        // One row past the page tells whether another page follows.
        values.push(Box::new(filter.limit as i64 + 1));
        let sql = format!(
            "SELECT {TRACE_COLUMNS}, seq FROM traces {condition} ORDER BY seq DESC LIMIT ${}",
            values.len()
        );
        let parameters: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_ref()).collect();
        let rows = self.admin().query(sql.as_str(), &parameters)?;
        let more = rows.len() > filter.limit;
        let mut traces = Vec::with_capacity(filter.limit);
        let mut last_seq = None;
        for row in rows.iter().take(filter.limit) {
            traces.push(decode_trace(row)?);
            last_seq = Some(row.try_get::<_, i64>(4)?);
        }
        Ok(TracePage {
            traces,
            next_cursor: if more { last_seq } else { None },
        })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let deleted = self
            .admin()
            .execute("DELETE FROM traces WHERE id = $1", &[&id])?;
        Ok(deleted > 0)
    }

    fn set_feedback(&self, id: &str, feedback: &Feedback) -> Result<bool, StoreError> {
        let changed = self.admin().execute(
            "UPDATE traces SET feedback_score = $1, feedback_label = $2, feedback_ms = $3
             WHERE id = $4",
            &[&feedback.score, &feedback.label, &feedback.created_ms, &id],
        )?;
        Ok(changed > 0)
    }

    /// Deletes by age, then the oldest traces while their bodies exceed the
    /// size bound. Table files shrink only when PostgreSQL vacuums them, so
    /// the bound counts the stored trace bodies rather than the files.
    fn prune(&self, retention: &Retention, now_ms: i64) -> Result<usize, StoreError> {
        let mut client = self.writer();
        let mut deleted = 0;
        if let Some(max_age) = retention.max_age {
            let oldest_kept = now_ms.saturating_sub(max_age.as_millis() as i64);
            deleted += client
                .execute("DELETE FROM traces WHERE created_ms < $1", &[&oldest_kept])?
                as usize;
        }
        if let Some(max_bytes) = retention.max_bytes {
            loop {
                let row = client.query_one(
                    "SELECT COALESCE(SUM(octet_length(body)), 0)::BIGINT, count(*) FROM traces",
                    &[],
                )?;
                let live = row.try_get::<_, i64>(0)?.max(0) as u64;
                if live <= max_bytes {
                    break;
                }
                let batch = client.execute(
                    "DELETE FROM traces WHERE seq IN
                     (SELECT seq FROM traces ORDER BY seq LIMIT $1)",
                    &[&super::excess_traces(row.try_get(1)?, live, max_bytes)],
                )?;
                if batch == 0 {
                    break;
                }
                deleted += batch as usize;
            }
        }
        Ok(deleted)
    }

    fn solved_unextracted(
        &self,
        min_agreement: f64,
        limit: usize,
    ) -> Result<Vec<Trace>, StoreError> {
        let rows = self.admin().query(
            format!(
                "SELECT {TRACE_COLUMNS} FROM traces
                 WHERE NOT extracted AND endpoint = 'chat'
                   AND (agreement >= $1 OR converged OR feedback_score > 0)
                 ORDER BY seq LIMIT $2"
            )
            .as_str(),
            &[&min_agreement, &(limit as i64)],
        )?;
        rows.iter().map(decode_trace).collect()
    }

    fn mark_extracted(&self, ids: &[String]) -> Result<(), StoreError> {
        self.admin().execute(
            "UPDATE traces SET extracted = TRUE WHERE id = ANY($1)",
            &[&ids],
        )?;
        Ok(())
    }

    fn behaviors(&self) -> Result<Vec<StoredBehavior>, StoreError> {
        let rows = self.admin().query(
            format!("SELECT {BEHAVIOR_COLUMNS} FROM behaviors ORDER BY name").as_str(),
            &[],
        )?;
        rows.iter().map(decode_behavior).collect()
    }

    fn behavior(&self, name: &str) -> Result<Option<StoredBehavior>, StoreError> {
        behavior_named(&mut *self.admin(), name)
    }

    fn add_behavior(&self, behavior: &StoredBehavior) -> Result<(), StoreError> {
        let inserted = self.admin().execute(
            "INSERT INTO behaviors
             (name, instruction, tags, source_traces, created_ms, times_retrieved, effect)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
            &[
                &behavior.name,
                &behavior.instruction,
                &serde_json::to_string(&behavior.tags)?,
                &serde_json::to_string(&behavior.source_traces)?,
                &behavior.created_ms,
                &(behavior.times_retrieved as i64),
                &json_text(&behavior.effect)?,
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
        let mut client = self.admin();
        let mut transaction = client.transaction()?;
        let Some(mut behavior) = behavior_named(&mut transaction, name)? else {
            return Ok(None);
        };
        if let Some(new_name) = patch.name.as_ref().filter(|n| *n != name) {
            if behavior_named(&mut transaction, new_name)?.is_some() {
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
        transaction.execute(
            "UPDATE behaviors SET name = $1, instruction = $2, tags = $3, effect = $4
             WHERE name = $5",
            &[
                &behavior.name,
                &behavior.instruction,
                &serde_json::to_string(&behavior.tags)?,
                &json_text(&behavior.effect)?,
                &name,
            ],
        )?;
        transaction.commit()?;
        Ok(Some(behavior))
    }

    fn delete_behavior(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self
            .admin()
            .execute("DELETE FROM behaviors WHERE name = $1", &[&name])?;
        Ok(deleted > 0)
    }

    fn add_behavior_sources(&self, name: &str, traces: &[String]) -> Result<(), StoreError> {
        let mut client = self.admin();
        let mut transaction = client.transaction()?;
        let Some(mut behavior) = behavior_named(&mut transaction, name)? else {
            return Ok(());
        };
        for trace in traces {
            if !behavior.source_traces.contains(trace) {
                behavior.source_traces.push(trace.clone());
            }
        }
        transaction.execute(
            "UPDATE behaviors SET source_traces = $1 WHERE name = $2",
            &[&serde_json::to_string(&behavior.source_traces)?, &name],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn count_retrievals(&self, names: &[String]) -> Result<(), StoreError> {
        self.writer().execute(
            "UPDATE behaviors SET times_retrieved = times_retrieved + 1 WHERE name = ANY($1)",
            &[&names],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traces::contract::contract_tests;

    /// Opens a store in a new database on the server that
    /// `MULL_TEST_POSTGRES_URL` names (a `key=value` connection string, as
    /// `scripts/test` sets it), or returns `None` when it is not set.
    fn open() -> Option<(Box<dyn std::any::Any>, Box<dyn TraceStore>)> {
        let url = std::env::var("MULL_TEST_POSTGRES_URL").ok()?;
        let name = format!("mull_test_{}", uuid::Uuid::new_v4().simple());
        let mut server = Client::connect(&url, NoTls).expect("the test server accepts connections");
        server
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("the test user may create databases");
        let store = PostgresStore::connect(&format!("{url} dbname={name}"), &name).unwrap();
        Some((Box::new(()), Box::new(store)))
    }

    contract_tests!(open);
}
