//! A property test of the HTTP command path: seeded random types, ids,
//! command names, bodies and headers. Whatever arrives, the host answers
//! with JSON and a known error code (or success), never crashes, and stores
//! events only for the requests it answered 200 — checked stream by stream.

use std::collections::HashMap;

use rehydra_e2e::Host;
use serde_json::Value;

/// A small deterministic generator (xorshift64*): the same seed gives the
/// same requests, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const CODES: &[&str] = &[
    "malformed_request",
    "unknown_aggregate_type",
    "unknown_command",
    "aggregate_not_found",
    "already_exists",
    "wrong_expected_version",
    "invalid_command",
    "rejected",
    // Fuzzed requests reuse a few idempotency keys with other commands
    // and payloads.
    "idempotency_key_reused",
    "payload_too_large",
    "not_found",
    "method_not_allowed",
];

fn random_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        0 => Vec::new(),
        1 => {
            let len = rng.below(64);
            rng.bytes(len)
        }
        2 => format!("{{\"amount\":{}}}", rng.next() as i64).into_bytes(),
        3 => format!("{{\"amount\":{}}}", rng.below(50)).into_bytes(),
        4 => format!(
            "{{\"owner\":\"{}\"}}",
            rng.pick(&["Ada", "", " ", "Bob\\u0000", "é"])
        )
        .into_bytes(),
        5 => format!(
            "{{\"email\":\"{}\",\"name\":\"{}\"}}",
            rng.pick(&["a@b", "x", ""]),
            rng.pick(&["Jane Doe", "J", ""])
        )
        .into_bytes(),
        6 => rng
            .pick(&[
                "[]",
                "null",
                "1",
                "\"s\"",
                "{",
                "{\"amount\":1.5}",
                "{\"amount\":\"1\"}",
                "{\"amount\":[]}",
            ])
            .as_bytes()
            .to_vec(),
        7 => vec![b'{'; rng.below(3000)],
        _ => format!(
            "{{\"amount\":1,\"pad\":\"{}\"}}",
            "x".repeat(rng.below(6000))
        )
        .into_bytes(),
    }
}

#[tokio::test]
async fn random_requests_never_crash_the_host_or_store_refused_commands() {
    let host = Host::start_with(&["bank-account", "users"], &["--max-command-bytes", "4096"]);
    let client = reqwest::Client::new();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let ids = ["a1", "a2", "u1", "x:y@z", "A-b_c.d~e"];
    // (type, id) -> (events stored per the 200 answers, last version seen)
    let mut stored: HashMap<(String, String), (u64, u64)> = HashMap::new();
    // Existing aggregates, so that random deposits and updates often succeed.
    for id in ["a1", "a2", "x:y@z", "A-b_c.d~e"] {
        let (status, _) = host
            .command(
                "bank-account",
                id,
                "open",
                serde_json::json!({"owner": "Ada"}),
            )
            .await;
        assert_eq!(status, 200);
        stored.insert(("bank-account".into(), id.into()), (1, 1));
    }
    let (status, _) = host
        .command(
            "user",
            "u1",
            "new",
            serde_json::json!({"email": "a@b.c", "name": "Jane Doe"}),
        )
        .await;
    assert_eq!(status, 200);
    stored.insert(("user".into(), "u1".into()), (2, 2));

    let mut answers: HashMap<u16, usize> = HashMap::new();
    for i in 0..1500 {
        // Half the requests are plausible (a real type, id and command with
        // a near-valid body), half are noise.
        let (aggregate_type, id, command, body) = if rng.below(2) == 0 {
            if rng.below(3) == 0 {
                let command = rng.pick(&["update-profile", "new"]);
                (
                    "user",
                    rng.pick(&ids).to_string(),
                    command,
                    random_body(&mut rng),
                )
            } else {
                let command = rng.pick(&["deposit", "deposit", "withdraw", "open"]);
                let body = format!("{{\"amount\":{}}}", rng.below(40)).into_bytes();
                ("bank-account", rng.pick(&ids).to_string(), command, body)
            }
        } else {
            let aggregate_type = rng.pick(&[
                "bank-account",
                "user",
                "bank-account",
                "nope",
                "%00",
                "bank-account%2F..%2Fx",
            ]);
            let id = match rng.below(8) {
                0 => "bad%20id".to_string(),
                1 => "y".repeat(129 + rng.below(100)),
                2 => "..%2F..".to_string(),
                _ => rng.pick(&ids).to_string(),
            };
            let command = rng.pick(&[
                "open",
                "deposit",
                "withdraw",
                "close",
                "new",
                "update-profile",
                "OPEN",
                "x%00",
                "",
            ]);
            (aggregate_type, id, command, random_body(&mut rng))
        };
        let mut req = client
            .post(format!(
                "{}/v1/aggregates/{aggregate_type}/{id}/commands/{command}",
                host.base
            ))
            .body(body.clone());
        if rng.below(4) == 0 {
            req = req.header(
                "if-match",
                rng.pick(&[
                    "0",
                    "1",
                    "2",
                    "\"3\"",
                    "-1",
                    "abc",
                    "99999999999999999999999",
                    "",
                ]),
            );
        }
        if rng.below(4) == 0 {
            req = req.header(
                "idempotency-key",
                rng.pick(&["k1", "k2", "has space", "", "ü"]),
            );
        }
        if rng.below(6) == 0 {
            req = req.header(
                "content-type",
                rng.pick(&["text/plain", "application/json", "garbage/;;"]),
            );
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: the host must answer: {e}"));
        let status = resp.status().as_u16();
        *answers.entry(status).or_default() += 1;
        let text = resp.text().await.expect("a body");
        let body_json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("request {i}: not JSON ({e}): {text}"));
        if status == 200 {
            let key = (
                body_json["type"].as_str().unwrap().to_string(),
                body_json["id"].as_str().unwrap().to_string(),
            );
            let entry = stored.entry(key).or_insert((0, 0));
            if body_json["replayed"] != true {
                entry.0 += body_json["events"].as_array().unwrap().len() as u64;
            }
            entry.1 = entry.1.max(body_json["version"].as_u64().unwrap());
        } else {
            let code = body_json["error"]["code"]
                .as_str()
                .unwrap_or_else(|| panic!("request {i}: no code: {text}"));
            assert!(
                CODES.contains(&code),
                "request {i}: unexpected code {code} ({status}): {text}"
            );
            assert!(
                (400..500).contains(&status),
                "request {i}: a server error for client input: {text}"
            );
        }
    }

    // The host is healthy, and every stream holds exactly what the 200
    // answers reported: nothing from a refused request was stored.
    let (status, _) = host.get("/healthz").await;
    assert_eq!(status, 200);
    eprintln!("fuzz answers by status: {answers:?}");
    for status in [200, 400, 404, 409, 413, 422] {
        assert!(
            answers.get(&status).copied().unwrap_or(0) >= 10,
            "too few {status} answers to mean much: {answers:?}"
        );
    }
    for ((aggregate_type, id), (events, version)) in &stored {
        let prefix = if aggregate_type == "user" {
            "ex_users"
        } else {
            "bank_account"
        };
        let (_, stream) = host
            .get(&format!("/v1/streams/{prefix}-{id}?limit=1000"))
            .await;
        let n = stream["events"].as_array().unwrap().len() as u64;
        assert_eq!(
            n, *events,
            "{aggregate_type}/{id}: stored events vs acknowledged"
        );
        assert_eq!(n, *version, "{aggregate_type}/{id}: version");
    }
    for id in ids {
        for (aggregate_type, prefix) in [("bank-account", "bank_account"), ("user", "ex_users")] {
            if !stored.contains_key(&(aggregate_type.to_string(), id.to_string())) {
                let (_, stream) = host.get(&format!("/v1/streams/{prefix}-{id}")).await;
                assert_eq!(
                    stream["events"],
                    serde_json::json!([]),
                    "{aggregate_type}/{id} was never acknowledged"
                );
            }
        }
    }
}
