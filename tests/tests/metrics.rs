//! `GET /metrics` against the real binary: every metric is named
//! `rehydra_…`, commands are counted by outcome, and the latency,
//! rehydration, store and footprint figures move with what the host did.

use rehydra_e2e::{Host, metric as sample};
use serde_json::json;

#[tokio::test]
async fn metrics_count_commands_by_outcome_and_measure_the_command_path() {
    let host = Host::start(&["bank-account"]);
    host.command("bank-account", "m1", "open", json!({"owner": "Ada"}))
        .await;
    for _ in 0..3 {
        host.command("bank-account", "m1", "deposit", json!({"amount": 5}))
            .await;
    }
    let (status, _) = host
        .command("bank-account", "m1", "withdraw", json!({"amount": 1000}))
        .await;
    assert_eq!(status, 422);
    // A dry run counts toward nothing.
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/aggregates/bank-account/m1/commands/deposit?dry_run=true",
            host.base
        ))
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .expect("the host answers");
    assert_eq!(resp.status(), 200);
    // A command for a type no plugin serves.
    let (status, _) = host.command("nope", "x", "open", json!({})).await;
    assert_eq!(status, 404);

    let resp = reqwest::get(format!("{}/metrics", host.base))
        .await
        .expect("the host answers");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = resp.text().await.expect("a body");

    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("rehydra_"),
            "every metric is rehydra_…: {line}"
        );
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let counted = |command: &str, outcome: &str| {
        sample(
            &text,
            &format!(
                "rehydra_commands_total{{aggregate_type=\"bank-account\",command=\"{command}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(counted("open", "ok"), Some(1.0), "{text}");
    assert_eq!(
        counted("deposit", "ok"),
        Some(3.0),
        "the dry run is not counted: {text}"
    );
    assert_eq!(counted("withdraw", "rejected"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "rehydra_commands_total{aggregate_type=\"<unknown>\",command=\"<unknown>\",outcome=\"unknown_aggregate_type\"}"
        ),
        Some(1.0),
        "a type the client made up is not a label: {text}"
    );
    let bank = "{aggregate_type=\"bank-account\"}";
    assert_eq!(
        sample(
            &text,
            &format!("rehydra_command_duration_seconds_count{bank}")
        ),
        Some(5.0),
        "{text}"
    );
    // The guest ran for every command that reached it, the dry run excluded.
    assert_eq!(
        sample(&text, &format!("rehydra_command_guest_seconds_count{bank}")),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("rehydra_command_store_seconds_count{bank}")),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("rehydra_rehydrations_total{bank}")),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "rehydra_store_commit_seconds_count{backend=\"embedded\"}"
        )
        .is_some_and(|n| n >= 4.0),
        "{text}"
    );
    // A handful of events, not yet worth an index write (or just written).
    assert!(
        sample(&text, "rehydra_store_unindexed_events").is_some_and(|n| (0.0..100.0).contains(&n)),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rehydra_resident_aggregates"),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "rehydra_resident_state_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rehydra_plugin_quarantined{plugin=\"bank-account\"}"),
        Some(0.0),
        "{text}"
    );
    // The figures an operator watches for overload and abuse are there,
    // at rest.
    for (name, value) in [
        ("rehydra_guest_queue_depth{plugin=\"bank-account\"}", 0.0),
        ("rehydra_aggregates_poisoned", 0.0),
        ("rehydra_subscription_lag_seconds", 0.0),
        ("rehydra_subscriptions_open", 0.0),
    ] {
        assert_eq!(sample(&text, name), Some(value), "{name}: {text}");
    }
    assert!(
        sample(&text, "rehydra_compile_cache_lookups_total{result=\"hit\"}").is_some()
            || sample(
                &text,
                "rehydra_compile_cache_lookups_total{result=\"compiled\"}"
            )
            .is_some(),
        "{text}"
    );
}
