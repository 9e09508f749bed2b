//! The users example (the User aggregate of Extreme.System's README) end to
//! end over HTTP: validation errors, the no-op, expected versions, not
//! found, already exists.

use rehydra_e2e::{Host, code};
use serde_json::json;

#[tokio::test]
async fn users_flow() {
    let host = Host::start(&["users"]);

    let (status, body) = host
        .command(
            "user",
            "u1",
            "new",
            json!({"email": "jane@example.com", "name": "Jane Doe"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    let types: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Created", "ProfileSet"]);
    assert_eq!(
        body["events"][0]["data"],
        json!({"id": "u1", "email": "jane@example.com"})
    );
    assert_eq!(
        body["events"][1]["data"],
        json!({"id": "u1", "name": "Jane Doe"})
    );
    assert_eq!(body["events"][1]["version"], 2);

    // Creating it again.
    let (status, body) = host
        .command(
            "user",
            "u1",
            "new",
            json!({"email": "x@example.com", "name": "Someone Else"}),
        )
        .await;
    assert_eq!((status, code(&body)), (409, "already_exists"), "{body}");

    // A name that is too short is a field error on `name`.
    let (status, body) = host
        .command("user", "u1", "update-profile", json!({"name": "Jane"}))
        .await;
    assert_eq!((status, code(&body)), (422, "invalid_command"), "{body}");
    assert_eq!(body["error"]["details"]["fields"][0]["field"], "name");
    let (status, body) = host
        .command("user", "u1", "update-profile", json!({}))
        .await;
    assert_eq!((status, code(&body)), (422, "invalid_command"), "{body}");

    // The same name again: no events, the current version as the reply.
    let (status, body) = host
        .command("user", "u1", "update-profile", json!({"name": "Jane Doe"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]));
    assert_eq!(body["version"], 2);
    assert_eq!(body["reply"], 2);

    // A stale expected version is refused with the actual one.
    let (status, body) = host
        .command_raw(
            "user",
            "u1",
            "update-profile",
            r#"{"name":"Jane Smith"}"#,
            &[("if-match", "1")],
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (409, "wrong_expected_version"),
        "{body}"
    );
    assert_eq!(
        body["error"]["details"],
        json!({"expected": 1, "actual": 2})
    );

    // The right one passes.
    let (status, body) = host
        .command_raw(
            "user",
            "u1",
            "update-profile",
            r#"{"name":"Jane Smith"}"#,
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    assert_eq!(body["events"][0]["type"], "ProfileSet");

    // Updating a user that does not exist.
    let (status, body) = host
        .command(
            "user",
            "nobody",
            "update-profile",
            json!({"name": "Nobody Here"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (404, "aggregate_not_found"),
        "{body}"
    );
    let (status, body) = host.get("/v1/aggregates/user/nobody").await;
    assert_eq!(
        (status, code(&body)),
        (404, "aggregate_not_found"),
        "{body}"
    );

    // State and stream.
    let (status, body) = host.get("/v1/aggregates/user/u1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"type": "user", "id": "u1", "version": 3, "state": {"id": "u1", "email": "jane@example.com", "name": "Jane Smith"}})
    );

    let (status, body) = host.get("/v1/streams/ex_users-u1").await;
    assert_eq!(status, 200, "{body}");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["version"], i as u64 + 1);
        let md = &e["metadata"];
        for key in [
            "$correlationId",
            "$causationId",
            "messageId",
            "plugin",
            "pluginHash",
            "timestamp",
        ] {
            assert!(md.get(key).is_some(), "metadata lacks {key}: {md}");
        }
        assert_eq!(md["plugin"], "users");
    }
    // The two events of one command share its message id.
    assert_eq!(
        events[0]["metadata"]["messageId"],
        events[1]["metadata"]["messageId"]
    );
    assert_ne!(
        events[1]["metadata"]["messageId"],
        events[2]["metadata"]["messageId"]
    );
    // Paging.
    let (_, body) = host.get("/v1/streams/ex_users-u1?from=2&limit=1").await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    assert_eq!(body["events"][0]["version"], 2);
    assert_eq!(body["next"], 3);
}
