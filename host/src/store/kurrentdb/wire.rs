//! How Rehydra's streams, versions, positions, metadata and errors map onto
//! KurrentDB's: revisions are versions minus one, positions are commit
//! positions plus one, the message id rides in the custom metadata, and the
//! client's errors are sorted into transient and fatal (see the parent
//! module's docs for the mapping as users see it).

use super::*;

/// A `$all` read was refused because the position is not a record start.
pub(super) struct InvalidPosition;

pub(super) fn at(position: u64) -> StreamPosition<Position> {
    StreamPosition::Position(Position {
        commit: position,
        prepare: position,
    })
}

/// KurrentDB's position as a Rehydra position (commit position + 1). Old
/// servers give no position on stream reads (all ones); that reads as 0.
pub(super) fn rehydra_position(p: Position) -> u64 {
    if p.commit == u64::MAX {
        0
    } else {
        p.commit + 1
    }
}

pub(super) fn is_invalid_position(e: &kurrentdb::Error) -> bool {
    match e {
        kurrentdb::Error::Grpc { code, message } => {
            !matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) && message.to_ascii_lowercase().contains("position")
        }
        _ => false,
    }
}

/// Sorts a client error into "retry" and "give up".
pub(super) fn classify(e: kurrentdb::Error) -> Failure {
    use kurrentdb::Error as E;
    let message = e.to_string();
    match e {
        E::NotLeaderException(_) | E::ServerError(_) | E::DeadlineExceeded => Failure::Transient {
            message,
            rebuild: false,
        },
        E::ConnectionClosed | E::GrpcConnectionError(_) => Failure::Transient {
            message,
            rebuild: true,
        },
        E::Grpc {
            code:
                tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::Aborted
                | tonic::Code::ResourceExhausted
                | tonic::Code::Unknown,
            ..
        } => Failure::Transient {
            message,
            rebuild: false,
        },
        E::Grpc { message: m, .. } if m.contains("Maximum Append Size") => {
            Failure::Fatal(StoreError::Unavailable(format!(
                "KurrentDB refused the append: {m} Make the command's events smaller, or raise the server's \
                 MaxAppendSize (KURRENTDB_MAX_APPEND_SIZE)"
            )))
        }
        E::AccessDenied => Failure::Fatal(StoreError::Unavailable(
            "KurrentDB denied access; check the user and password in the --store connection string \
             (kurrentdb://user:password@host:port)"
                .into(),
        )),
        E::ResourceDeleted => Failure::Fatal(StoreError::Corrupt(
            "the stream was deleted (tombstoned) in KurrentDB; its aggregate cannot be written again".into(),
        )),
        other => Failure::Fatal(StoreError::Unavailable(format!("KurrentDB failed: {other}"))),
    }
}

/// `ExpectedVersion` in KurrentDB's terms.
pub(super) fn stream_state(expected: ExpectedVersion) -> StreamState {
    match expected {
        ExpectedVersion::Any => StreamState::Any,
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => StreamState::NoStream,
        ExpectedVersion::StreamExists => StreamState::StreamExists,
        ExpectedVersion::Exact(v) => StreamState::StreamRevision(v - 1),
    }
}

/// The bytes as a JSON value, if they are JSON with nothing around it (so
/// that writing the value gives back the same bytes).
pub(super) fn verbatim_json(data: &[u8]) -> Option<Box<serde_json::value::RawValue>> {
    let text = std::str::from_utf8(data).ok()?;
    let raw = serde_json::value::RawValue::from_string(text.to_owned()).ok()?;
    (raw.get().len() == text.len()).then_some(raw)
}

/// What Rehydra sends to KurrentDB for one event.
pub(super) fn to_wire(e: &EventData) -> kurrentdb::EventData {
    let base = match verbatim_json(&e.data) {
        Some(raw) => kurrentdb::EventData::json(&e.event_type, &raw).ok(),
        None => None,
    };
    base.unwrap_or_else(|| kurrentdb::EventData::binary(&e.event_type, Bytes::from(e.data.clone())))
        .id(e.event_id)
        .metadata(Bytes::from(encode_metadata(&e.metadata, &e.message_id)))
}

/// The custom metadata stored for an event: `metadata` itself when it is a
/// JSON object with this `messageId`; otherwise a JSON object with the
/// message id and the original bytes.
pub(super) fn encode_metadata(metadata: &[u8], message_id: &str) -> Vec<u8> {
    if let Ok(serde_json::Value::Object(map)) =
        serde_json::from_slice::<serde_json::Value>(metadata)
        && map.get("messageId").and_then(|v| v.as_str()) == Some(message_id)
        && !map.contains_key(WRAPPED_UTF8)
        && !map.contains_key(WRAPPED_HEX)
    {
        return metadata.to_vec();
    }
    let mut wrapper = serde_json::Map::new();
    wrapper.insert("messageId".into(), message_id.into());
    match std::str::from_utf8(metadata) {
        Ok(text) => wrapper.insert(WRAPPED_UTF8.into(), text.into()),
        Err(_) => wrapper.insert(WRAPPED_HEX.into(), hex::encode(metadata).into()),
    };
    serde_json::Value::Object(wrapper).to_string().into_bytes()
}

/// The event's metadata bytes and message id, from its custom metadata.
pub(super) fn decode_metadata(stored: &[u8]) -> Result<(Vec<u8>, String), StoreError> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(stored)
    else {
        // Not written by Rehydra: no message id.
        return Ok((stored.to_vec(), String::new()));
    };
    let message_id = map
        .get("messageId")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    if let Some(text) = map.get(WRAPPED_UTF8).and_then(|v| v.as_str()) {
        return Ok((text.as_bytes().to_vec(), message_id));
    }
    if let Some(hex_text) = map.get(WRAPPED_HEX).and_then(|v| v.as_str()) {
        let bytes = hex::decode(hex_text)
            .map_err(|e| StoreError::Corrupt(format!("unreadable wrapped event metadata: {e}")))?;
        return Ok((bytes, message_id));
    }
    Ok((stored.to_vec(), message_id))
}

/// A KurrentDB event as Rehydra's.
pub(super) fn convert(e: &kurrentdb::RecordedEvent) -> Result<RecordedEvent, Failure> {
    let (metadata, message_id) = decode_metadata(&e.custom_metadata).map_err(Failure::Fatal)?;
    Ok(RecordedEvent {
        stream: e.stream_id().to_owned(),
        version: e.revision + 1,
        position: rehydra_position(e.position),
        event_id: e.id,
        event_type: e.event_type.clone(),
        data: e.data.to_vec(),
        metadata,
        message_id,
    })
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Fatal(e) => e,
            Failure::Transient { message, .. } => StoreError::Unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_map_to_revisions() {
        assert!(matches!(
            stream_state(ExpectedVersion::Exact(0)),
            StreamState::NoStream
        ));
        assert!(matches!(
            stream_state(ExpectedVersion::Exact(5)),
            StreamState::StreamRevision(4)
        ));
        assert!(matches!(
            stream_state(ExpectedVersion::Any),
            StreamState::Any
        ));
        assert!(matches!(
            stream_state(ExpectedVersion::StreamExists),
            StreamState::StreamExists
        ));
    }

    #[test]
    fn metadata_round_trips_with_its_message_id() {
        let plain = br#"{"$correlationId":"c","messageId":"m-1"}"#;
        assert_eq!(encode_metadata(plain, "m-1"), plain.to_vec());
        assert_eq!(
            decode_metadata(plain).expect("decode"),
            (plain.to_vec(), "m-1".into())
        );
        for (bytes, id) in [
            (&b""[..], "m-2"),
            (&br#"{"messageId":"other"}"#[..], "m-3"),
            (&b"\xff\x00 not utf8"[..], "m-4"),
            (&b"[1,2]"[..], "m-5"),
        ] {
            let stored = encode_metadata(bytes, id);
            assert_eq!(
                decode_metadata(&stored).expect("decode"),
                (bytes.to_vec(), id.into())
            );
        }
        assert_eq!(
            decode_metadata(b"not json").expect("decode"),
            (b"not json".to_vec(), String::new())
        );
    }

    #[test]
    fn only_verbatim_json_is_marked_json() {
        assert!(verbatim_json(br#"{"a":1}"#).is_some());
        assert!(verbatim_json(b"{ \"a\" : 1 }").is_some());
        assert!(verbatim_json(b"{\"a\":1}\n").is_none());
        assert!(verbatim_json(b"").is_none());
        assert!(verbatim_json(b"\xff").is_none());
    }

    #[test]
    fn positions_are_one_based() {
        assert_eq!(
            rehydra_position(Position {
                commit: 0,
                prepare: 0
            }),
            1
        );
        assert_eq!(
            rehydra_position(Position {
                commit: 41,
                prepare: 41
            }),
            42
        );
        assert_eq!(rehydra_position(Position::end()), 0);
    }
}
