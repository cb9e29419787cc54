//! `GET /metrics`: Prometheus metrics, open like `/healthz` even when the client API needs
//! a key; callback outcomes counted as they happen, refusals included.

use crate::support::{SOON, TestApp, remove_event, silent};

const KEY: &str = "metrics-key-0123456789abcdef";

/// The value of the sample line named exactly `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn callback_outcomes_are_counted_and_metrics_need_no_key() {
    let app = TestApp::spawn_with(|config| config.http.api_keys = KEY.to_owned().into())
        .await
        .authenticated(KEY);
    let started = app.remove("call-metrics", silent(), Some("ctx-m")).await;
    let id = started["id"].as_str().unwrap();
    let event = remove_event("ev-m", "call-metrics", "ctx-m", true);
    let first = app.callback(&event).await;
    assert_eq!(first["matched"], 1, "{first}");
    let second = app.callback(&event).await;
    assert_eq!(second["duplicates"], 1, "{second}");
    let operation = app.wait_operation(id, 5).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");

    // No token: refused, and counted.
    let anonymous = reqwest::Client::new();
    let refused = anonymous
        .post(app.url("/callbacks/acs"))
        .json(&remove_event("ev-m2", "call-metrics", "ctx-m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // The upstream's 202 is counted once dispatch has it (the callback may come first).
    let deadline = tokio::time::Instant::now() + SOON;
    while !scrape(&anonymous, &app.url("/metrics"))
        .await
        .lines()
        .any(|line| line == r#"callops_upstream_requests_total{upstream="acs",status="ok"} 1"#)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no upstream request counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // No API key either.
    let response = anonymous.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    for (series, value) in [
        (
            r#"callops_callbacks_total{source="acs",outcome="matched"}"#,
            "1",
        ),
        (
            r#"callops_callbacks_total{source="acs",outcome="duplicate"}"#,
            "1",
        ),
        (
            r#"callops_callbacks_total{source="acs",outcome="refused"}"#,
            "1",
        ),
        (
            r#"callops_callback_events_total{source="acs",type="Microsoft.Communication.RemoveParticipantSucceeded",outcome="matched"}"#,
            "1",
        ),
        (
            r#"callops_callback_events_total{source="acs",type="Microsoft.Communication.RemoveParticipantSucceeded",outcome="duplicate"}"#,
            "1",
        ),
        ("callops_operations_in_memory", "1"),
        ("callops_parked_callbacks", "0"),
        ("callops_long_poll_waiters", "0"),
        (
            r#"callops_operations_started_total{kind="removeParticipant"}"#,
            "1",
        ),
        (
            r#"callops_operations_started_total{kind="cancelMediaProcessing"}"#,
            "0",
        ),
        (
            r#"callops_operations_settled_total{kind="removeParticipant",status="succeeded"}"#,
            "1",
        ),
        (
            r#"callops_operations_settled_total{kind="removeParticipant",status="failed"}"#,
            "0",
        ),
        (
            r#"callops_upstream_requests_total{upstream="acs",status="ok"}"#,
            "1",
        ),
        (
            r#"callops_upstream_request_duration_seconds_count{upstream="acs"}"#,
            "1",
        ),
    ] {
        assert_eq!(
            sample(&text, series).as_deref(),
            Some(value),
            "{series} in\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            r#"callops_callbacks_total{source="graph",outcome="refused"}"#
        )
        .as_deref(),
        Some("0"),
        "{text}"
    );
    // Read from the key caches: the ACS keys were fetched at least once to verify.
    let fetches =
        sample(&text, r#"callops_callback_key_fetches_total{source="acs"}"#).expect("key fetches");
    assert!(fetches.parse::<u64>().unwrap() >= 1, "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn a_durable_store_reports_its_commits() {
    let data = tempfile::tempdir().unwrap();
    let location = data.path().join("callops.db").display().to_string();
    let app = TestApp::spawn_with(|config| config.store.location = location).await;
    let started = app.remove("call-durable", silent(), Some("ctx-d")).await;
    assert!(started["id"].is_string(), "{started}");
    let text = scrape(&app.http, &app.url("/metrics")).await;
    let value = |series: &str| -> f64 {
        sample(&text, series)
            .unwrap_or_else(|| panic!("{series} in\n{text}"))
            .parse()
            .unwrap()
    };
    // The new operation was committed before its 202.
    assert!(
        value("callops_store_commit_duration_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(value("callops_store_commit_records_count") >= 1.0, "{text}");
    assert!(value("callops_store_transactions_total") >= 1.0, "{text}");
    assert!(value("callops_store_records_total") >= 1.0, "{text}");
    assert!(value("callops_store_largest_batch") >= 1.0, "{text}");
}

#[tokio::test]
async fn a_parked_callback_that_expires_is_counted_as_unmatched_and_kept_on_its_call() {
    let app = TestApp::spawn_with(|config| {
        config.operations.park_ttl_ms = 100;
        config.operations.sweep_interval_ms = 20;
    })
    .await;
    let parked = app
        .callback(&remove_event("ev-lost", "call-lost", "ctx-nobody", true))
        .await;
    assert_eq!(parked["parked"], 1, "{parked}");
    let http = reqwest::Client::new();
    let series = r#"callops_callbacks_total{source="acs",outcome="unmatched"}"#;
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let text = scrape(&http, &app.url("/metrics")).await;
        if sample(&text, series).as_deref() == Some("1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired park was not counted as unmatched: {:?}",
            sample(&text, series)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let events = app
        .get_json("/v1/acs/callConnections/call-lost/events")
        .await;
    let kept = events["value"].as_array().expect("events");
    assert!(
        kept.iter()
            .any(|event| event["id"] == "ev-lost" && event["effect"] == "unmatched"),
        "the expired park is not on its call's events: {events}"
    );
}

#[tokio::test]
async fn every_series_exists_from_the_start_and_the_classic_format_is_served_on_request() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let text = scrape(&http, &app.url("/metrics")).await;
    for series in [
        r#"callops_upstream_retries_total{upstream="acs"}"#,
        r#"callops_upstream_retries_total{upstream="graph"}"#,
        r#"callops_upstream_requests_total{upstream="acs",status="ok"}"#,
        r#"callops_callbacks_total{source="graph",outcome="refused"}"#,
    ] {
        assert_eq!(sample(&text, series).as_deref(), Some("0"), "{series}");
    }
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics by default");

    let response = http
        .get(app.url("/metrics"))
        .header("accept", "text/plain; version=0.0.4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let classic = response.text().await.unwrap();
    assert!(!classic.contains("# EOF"), "{classic}");
    assert!(
        classic.contains("# TYPE callops_callbacks_total counter"),
        "{classic}"
    );
    assert_eq!(
        sample(
            &classic,
            r#"callops_upstream_retries_total{upstream="acs"}"#
        )
        .as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn each_request_writes_one_access_line_unless_turned_off() {
    let (captured, _guard) = crate::support::capture_logs();
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let url = app.url("/v1/operations/01a24905-bf34-749c-97b2-5ceae54455c2");
    let response = http
        .get(&url)
        .header("x-ms-client-request-id", "access-log-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let logs = captured.text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("access-log-1") && line.contains("request"))
        .filter(|line| line.contains(" INFO "))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    let line = lines[0];
    for part in [
        "route=/v1/operations/{id}",
        "status=404",
        "latency_us=",
        "method=GET",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }

    let (captured, _guard) = crate::support::capture_logs();
    let quiet = TestApp::spawn_with(|config| config.log.access = false).await;
    http.get(quiet.url("/healthz")).send().await.unwrap();
    assert!(
        !captured.text().contains("latency_us"),
        "{}",
        captured.text()
    );
}
