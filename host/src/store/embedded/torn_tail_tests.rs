//! A torn or truncated tail: the crash image of a store whose last writes
//! reached the disk only in part. The WAL of such an image, cut at any
//! byte, opens to a consistent prefix of what was appended — positions
//! without gaps, each stream's versions without gaps, each append whole
//! or absent — and the store takes appends again.

use std::collections::BTreeMap;
use std::path::Path;

use super::{DB_FILE, EmbeddedStore};
use crate::store::conformance::events;
use crate::store::{EventStore, ExpectedVersion};

/// Copies the database and its WAL from `from` to `to`, the WAL cut to
/// `cut` bytes; SQLite rebuilds its index of the WAL (`-shm`) at open.
fn crash_image(from: &Path, to: &Path, cut: u64) {
    std::fs::create_dir_all(to).expect("the image's directory");
    std::fs::copy(from.join(DB_FILE), to.join(DB_FILE)).expect("the database");
    let wal = format!("{DB_FILE}-wal");
    std::fs::copy(from.join(&wal), to.join(&wal)).expect("the WAL");
    std::fs::OpenOptions::new()
        .write(true)
        .open(to.join(&wal))
        .and_then(|f| f.set_len(cut))
        .expect("cutting the WAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_wal_tail_opens_to_a_consistent_prefix() {
    let live = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(live.path()).await.expect("open");
    // 300 appends of 1-3 events over 10 streams, each acknowledged.
    let streams: Vec<String> = (0..10).map(|s| format!("torn-{s}")).collect();
    let mut appended: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for i in 0..300u32 {
        let stream = &streams[(i % 10) as usize];
        let n = 1 + i % 3;
        store
            .append(stream, ExpectedVersion::Any, events(n))
            .await
            .expect("an append");
        appended.entry(stream.clone()).or_default().push(n);
    }
    // Everything is acknowledged and nothing is checkpointed yet (the
    // threshold is ~40 MB): the WAL holds every append.
    let images = tempfile::tempdir().expect("tempdir");
    let wal_len = std::fs::metadata(live.path().join(format!("{DB_FILE}-wal")))
        .expect("the WAL")
        .len();
    assert!(
        wal_len > 100_000,
        "the WAL holds the appends: {wal_len} bytes"
    );
    let full = images.path().join("full");
    crash_image(live.path(), &full, wal_len);
    store.close().await;

    let cuts = [
        0,
        31,
        32,
        4096,
        wal_len / 7,
        wal_len / 3,
        wal_len / 2 + 13,
        wal_len - 4097,
        wal_len - 1,
        wal_len,
    ];
    let mut seen = Vec::new();
    for cut in cuts {
        let image = images.path().join(format!("cut-{cut}"));
        crash_image(&full, &image, cut);
        let opened = EmbeddedStore::open(&image)
            .await
            .unwrap_or_else(|e| panic!("the image cut at {cut} opens: {e:#}"));
        let all = opened.read_all(1, 100_000).await.expect("read_all");
        let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
        assert_eq!(
            positions,
            (1..=all.len() as u64).collect::<Vec<_>>(),
            "cut at {cut}: positions have gaps"
        );
        for stream in &streams {
            let stored = opened.read_stream(stream, 1, 10_000).await.expect("read");
            let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
            assert_eq!(
                versions,
                (1..=stored.len() as u64).collect::<Vec<_>>(),
                "cut at {cut}: {stream}'s versions have gaps"
            );
            // Whole appends only: the stored count is a sum of a prefix of
            // the append sizes.
            let sizes = &appended[stream];
            let prefix_sums: Vec<usize> = (0..=sizes.len())
                .map(|k| sizes[..k].iter().map(|n| *n as usize).sum())
                .collect();
            assert!(
                prefix_sums.contains(&stored.len()),
                "cut at {cut}: {stream} holds {} events, part of an append",
                stored.len()
            );
        }
        let next = opened
            .append(&streams[0], ExpectedVersion::Any, events(1))
            .await
            .unwrap_or_else(|e| panic!("cut at {cut}: the store takes appends: {e}"));
        assert_eq!(next.position, all.len() as u64 + 1, "cut at {cut}");
        opened.close().await;
        seen.push(all.len());
    }
    // The cuts reach from nothing of the WAL to all of it.
    let total: usize = appended.values().flatten().map(|n| *n as usize).sum();
    assert_eq!(seen.first(), Some(&0), "{seen:?}");
    assert_eq!(seen.last(), Some(&total), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}
