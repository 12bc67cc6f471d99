//! Tests that every [`TraceStore`] must pass, run by each store's test
//! module through [`contract_tests`].

use std::{collections::BTreeMap, time::Duration};

use serde_json::{json, Value};

use super::{
    BehaviorPatch, Choice, Feedback, FeedbackFilter, Latency, Message, Retention, StoreError,
    StoredBehavior, Trace, TraceFilter, TraceStore, Usage,
};

/// Generates one `#[test]` per contract check. `$open` returns a guard that
/// must outlive the store (such as its temporary folder) and the store, or
/// `None` to skip, for a store whose server is not available.
macro_rules! contract_tests {
    ($open:path) => {
        contract_tests!(@each $open,
            insert_then_get_round_trips,
            list_pages_newest_first,
            list_filters_by_columns,
            feedback_filters_and_attaches,
            prune_by_age_keeps_recent,
            prune_by_size_deletes_oldest,
            solved_traces_selected_once,
            behaviors_add_edit_delete,
            deletes_report_existence);
    };
    (@each $open:path, $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                let Some((_guard, store)) = $open() else {
                    eprintln!("skipped: the store's server is not configured");
                    return;
                };
                $crate::traces::contract::$check(store.as_ref());
            }
        )*
    };
}
pub(crate) use contract_tests;

pub fn trace(id: &str, created_ms: i64, decoding: Option<Value>) -> Trace {
    Trace {
        id: id.into(),
        created_ms,
        model: "m".into(),
        adapter: None,
        endpoint: "chat".into(),
        strategy: "plain".into(),
        params: json!({"temperature": 0.0}),
        messages: Some(vec![Message {
            role: "user".into(),
            content: "What is 2 + 2?".into(),
            name: None,
        }]),
        prompt: None,
        choices: vec![Choice {
            index: 0,
            text: "4".into(),
            finish_reason: Some("stop".into()),
            tokens: 1,
            answer: Some("4".into()),
            entropy: None,
        }],
        decoding,
        usage: Usage::default(),
        latency: Latency::default(),
        stream: false,
        user: None,
        metadata: BTreeMap::new(),
        feedback: None,
    }
}

/// Inserts `count` traces of about 10 kB each, `t00` the oldest.
pub fn fill_big_traces(store: &dyn TraceStore, count: usize) {
    let mut big = trace("x", 0, None);
    big.choices[0].text = "word ".repeat(2_000);
    for i in 0..count {
        big.id = format!("t{i:02}");
        big.created_ms = i as i64;
        store.insert(&big).unwrap();
    }
}

pub fn insert_then_get_round_trips(store: &dyn TraceStore) {
    let original = trace("a", 1, Some(json!({"agreement": 0.5})));
    store.insert(&original).unwrap();
    assert_eq!(store.get("a").unwrap(), Some(original));
    assert_eq!(store.get("missing").unwrap(), None);
}

pub fn list_pages_newest_first(store: &dyn TraceStore) {
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        store.insert(&trace(id, i as i64, None)).unwrap();
    }
    let mut filter = TraceFilter {
        limit: 2,
        ..TraceFilter::default()
    };
    let first = store.list(&filter).unwrap();
    let ids: Vec<&str> = first.traces.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["c", "b"]);
    filter.cursor = first.next_cursor;
    assert!(filter.cursor.is_some());
    let second = store.list(&filter).unwrap();
    assert_eq!(second.traces.len(), 1);
    assert_eq!(second.traces[0].id, "a");
    assert_eq!(second.next_cursor, None);
}

pub fn list_filters_by_columns(store: &dyn TraceStore) {
    let mut other = trace("other", 50, None);
    other.model = "other-model".into();
    other.strategy = "self_consistency".into();
    store.insert(&trace("early", 10, None)).unwrap();
    store.insert(&other).unwrap();
    let ids = |filter: TraceFilter| -> Vec<String> {
        let filter = TraceFilter {
            limit: 10,
            ..filter
        };
        store
            .list(&filter)
            .unwrap()
            .traces
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    let by_model = ids(TraceFilter {
        model: Some("other-model".into()),
        ..TraceFilter::default()
    });
    assert_eq!(by_model, ["other"]);
    let by_strategy = ids(TraceFilter {
        strategy: Some("plain".into()),
        ..TraceFilter::default()
    });
    assert_eq!(by_strategy, ["early"]);
    let in_range = ids(TraceFilter {
        since_ms: Some(5),
        until_ms: Some(20),
        ..TraceFilter::default()
    });
    assert_eq!(in_range, ["early"]);
    let completions = ids(TraceFilter {
        endpoint: Some("completion".into()),
        ..TraceFilter::default()
    });
    assert!(completions.is_empty());
}

pub fn feedback_filters_and_attaches(store: &dyn TraceStore) {
    store.insert(&trace("good", 1, None)).unwrap();
    store.insert(&trace("plain", 2, None)).unwrap();
    let feedback = Feedback {
        score: Some(1.0),
        label: Some("correct".into()),
        created_ms: 5,
    };
    assert!(store.set_feedback("good", &feedback).unwrap());
    assert!(!store.set_feedback("missing", &feedback).unwrap());
    let listed = |feedback: FeedbackFilter| -> Vec<Trace> {
        let filter = TraceFilter {
            feedback: Some(feedback),
            limit: 10,
            ..TraceFilter::default()
        };
        store.list(&filter).unwrap().traces
    };
    let positive = listed(FeedbackFilter::Positive);
    assert_eq!(positive.len(), 1);
    assert_eq!(positive[0].feedback, Some(feedback));
    assert!(listed(FeedbackFilter::Negative).is_empty());
    assert_eq!(listed(FeedbackFilter::Any).len(), 1);
    assert_eq!(listed(FeedbackFilter::None)[0].id, "plain");
}

pub fn prune_by_age_keeps_recent(store: &dyn TraceStore) {
    store.insert(&trace("old", 1_000, None)).unwrap();
    store.insert(&trace("new", 90_000, None)).unwrap();
    let retention = Retention {
        max_age: Some(Duration::from_secs(60)),
        max_bytes: None,
    };
    assert_eq!(store.prune(&retention, 100_000).unwrap(), 1);
    assert!(store.get("old").unwrap().is_none());
    assert!(store.get("new").unwrap().is_some());
}

pub fn prune_by_size_deletes_oldest(store: &dyn TraceStore) {
    fill_big_traces(store, 50);
    let retention = Retention {
        max_age: None,
        max_bytes: Some(200_000),
    };
    assert!(store.prune(&retention, 0).unwrap() > 0);
    assert!(store.get("t00").unwrap().is_none());
    assert!(store.get("t49").unwrap().is_some());
}

pub fn solved_traces_selected_once(store: &dyn TraceStore) {
    store
        .insert(&trace("agreed", 1, Some(json!({"agreement": 0.8}))))
        .unwrap();
    store
        .insert(&trace("split", 2, Some(json!({"agreement": 0.4}))))
        .unwrap();
    store
        .insert(&trace("converged", 3, Some(json!({"converged": true}))))
        .unwrap();
    store.insert(&trace("liked", 4, None)).unwrap();
    let liked = Feedback {
        score: Some(0.5),
        label: None,
        created_ms: 5,
    };
    store.set_feedback("liked", &liked).unwrap();
    let solved = store.solved_unextracted(0.6, 10).unwrap();
    let ids: Vec<&str> = solved.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["agreed", "converged", "liked"]);
    store.mark_extracted(&["agreed".into()]).unwrap();
    assert_eq!(store.solved_unextracted(0.6, 10).unwrap().len(), 2);
    assert_eq!(store.solved_unextracted(0.6, 1).unwrap().len(), 1);
}

pub fn behaviors_add_edit_delete(store: &dyn TraceStore) {
    let behavior = StoredBehavior {
        name: "check_units".into(),
        instruction: "Check the units of the answer.".into(),
        tags: vec!["units".into()],
        source_traces: vec!["a".into()],
        created_ms: 1,
        times_retrieved: 0,
        effect: None,
    };
    store.add_behavior(&behavior).unwrap();
    assert!(matches!(
        store.add_behavior(&behavior),
        Err(StoreError::DuplicateBehavior(_))
    ));
    store
        .add_behavior_sources("check_units", &["a".into(), "b".into()])
        .unwrap();
    store.count_retrievals(&["check_units".into()]).unwrap();
    let patch = BehaviorPatch {
        name: Some("unit_check".into()),
        effect: Some(Some(json!({"accuracy_delta": 0.1}))),
        ..BehaviorPatch::default()
    };
    let edited = store
        .update_behavior("check_units", &patch)
        .unwrap()
        .unwrap();
    assert_eq!(edited.name, "unit_check");
    assert_eq!(edited.source_traces, ["a", "b"]);
    assert_eq!(edited.times_retrieved, 1);
    assert_eq!(store.behavior("unit_check").unwrap(), Some(edited));
    assert!(store.behavior("check_units").unwrap().is_none());
    assert!(store
        .update_behavior("missing", &BehaviorPatch::default())
        .unwrap()
        .is_none());
    assert!(store.delete_behavior("unit_check").unwrap());
    assert!(store.behaviors().unwrap().is_empty());
}

pub fn deletes_report_existence(store: &dyn TraceStore) {
    store.insert(&trace("a", 1, None)).unwrap();
    assert!(store.delete("a").unwrap());
    assert!(!store.delete("a").unwrap());
    assert!(!store.delete_behavior("none").unwrap());
}
