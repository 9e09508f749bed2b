//! A process that appends to an embedded store through the store's own API,
//! with no host around it, for the in-process crash loop
//! (`tests/tests/store_crash_loop.rs`), which kills it with `kill -9`.
//!
//! `store-writer DIR WRITERS` opens `embedded://DIR`, prints `ready`, and
//! runs `WRITERS` tasks at once. Task `t` appends to the stream `s-t`, from
//! the version it finds there, one to three events per append with the
//! expected version set, and prints one line per acknowledged append:
//!
//! ```text
//! ack STREAM FIRST_VERSION ID[,ID...]
//! ```
//!
//! A line is printed only after the store answered, so every line names
//! events the store promised to keep. It runs until it is killed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rehydra::store::embedded::EmbeddedStore;
use rehydra::store::{EventData, EventStore, ExpectedVersion};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(writers)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: store-writer DIR WRITERS");
    };
    let writers: usize = writers.parse().context("WRITERS is a number")?;
    let store = Arc::new(EmbeddedStore::open(&PathBuf::from(dir)).await?);
    println!("ready");
    let mut tasks = Vec::new();
    for t in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { write(&*store, t).await }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Appends to `s-t` until the process dies; an error ends the task.
async fn write(store: &dyn EventStore, t: usize) -> anyhow::Result<()> {
    let stream = format!("s-{t}");
    let mut version = store.stream_version(&stream).await?;
    let mut n = 0u64;
    loop {
        n += 1;
        let count = 1 + (n % 3) as usize;
        let message_id = uuid::Uuid::new_v4().to_string();
        let events: Vec<EventData> = (0..count)
            .map(|i| EventData {
                event_id: uuid::Uuid::new_v4(),
                event_type: "Written".into(),
                data: format!(r#"{{"n":{n},"i":{i}}}"#).into_bytes(),
                metadata: b"{}".to_vec(),
                message_id: message_id.clone(),
            })
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let appended = store.append(&stream, expected, events).await?;
        let first = version + 1;
        version = appended.version;
        // One write per line, so that lines of different tasks never mix.
        let line = format!("ack {stream} {first} {}\n", ids.join(","));
        std::io::stdout().lock().write_all(line.as_bytes())?;
    }
}
