//! The repository shape `bigrepo.rs` (labctl's format) and `resticrepo.rs`
//! (restic's) both write, so the `big-repo` workload compares tools on the
//! same blobs, packs and snapshot references: the command line both take,
//! and which chunks each snapshot references.

use std::ops::Range;
use std::path::PathBuf;

/// Blobs per data pack (labctl's 32 MiB pack target at 1 MiB a blob).
pub const BLOBS_PER_PACK: u64 = 32;

/// `<repo dir> <key file> <blobs> [sources] [snapshots per source]`.
pub struct Shape {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub blobs: u64,
    pub sources: u64,
    pub per_source: u64,
}

impl Shape {
    /// From the command line; `usage` is printed when it is short.
    pub fn from_args(usage: &str) -> Shape {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.len() < 3 {
            eprintln!("usage: {usage}");
            std::process::exit(2);
        }
        Shape {
            dir: PathBuf::from(&args[0]),
            key: PathBuf::from(&args[1]),
            blobs: args[2].parse().expect("blobs: a number"),
            sources: args.get(3).map_or(10, |s| s.parse().expect("sources")),
            per_source: args.get(4).map_or(12, |s| s.parse().expect("snapshots")),
        }
    }

    /// The blob numbers snapshot `j` of source `s` references: a quarter of
    /// the source's `blobs / sources` chunks, the window sliding so that
    /// consecutive snapshots share most chunks and together they cover the
    /// source (about three references per blob in all).
    pub fn window(&self, s: u64, j: u64) -> Range<u64> {
        let per = self.blobs / self.sources;
        let window = (per / 4).max(1);
        let step = if self.per_source > 1 {
            (per - window) / (self.per_source - 1)
        } else {
            0
        };
        let start = s * per + j * step;
        start..start + window
    }

    /// Calls `make` for every data pack (its number and its blobs' numbers)
    /// on two threads, each taking every second pack; returns what it made,
    /// the first thread's packs first.
    pub fn data_packs<T: Send>(&self, make: impl Fn(u64, Range<u64>) -> T + Sync) -> Vec<T> {
        const WORKERS: u64 = 2;
        let packs = self.blobs.div_ceil(BLOBS_PER_PACK);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..WORKERS)
                .map(|w| {
                    let make = &make;
                    s.spawn(move || {
                        (w..packs)
                            .step_by(WORKERS as usize)
                            .map(|p| {
                                let first = p * BLOBS_PER_PACK;
                                make(p, first..(first + BLOBS_PER_PACK).min(self.blobs))
                            })
                            .collect::<Vec<T>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }
}
