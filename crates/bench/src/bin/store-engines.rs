//! Compares the two embedded databases considered for the management plane's store (issue 16,
//! docs/benchmarks.md "Choosing the embedded store"): SQLite (rusqlite, bundled, WAL,
//! `synchronous=FULL`) and redb (durability `Immediate`), both used the way the store uses them —
//! one writer thread that commits whatever is queued as one transaction (group commit) and
//! answers every writer only after the commit is durable, and point reads from many threads.
//!
//! Per engine and directory it measures, in one run, side by side:
//! - `serial`: one writer, one object per transaction — the fsync latency floor;
//! - `group`: `--concurrency` writers through the group-commit thread — objects/s, p50/p99;
//! - `read`: point reads from `--concurrency` threads;
//! - the database's size on disk afterwards.
//!
//! `cargo run --release -p meshca-bench --bin store-engines -- --dir /var/tmp --dir /dev/shm`
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use clap::Parser;
use meshca_bench::Latencies;

#[derive(Parser)]
struct Args {
    /// Parent directories to measure in (each gets a fresh temporary database); e.g. a disk
    /// directory and /dev/shm.
    #[arg(long = "dir", required = true)]
    dirs: Vec<PathBuf>,
    /// Objects written in the group-commit phase.
    #[arg(long, default_value_t = 30_000)]
    objects: usize,
    /// Objects written one transaction each in the serial phase.
    #[arg(long, default_value_t = 300)]
    serial: usize,
    /// Concurrent writers (and readers).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Bytes per object (a cluster record is ~0.3 KB, a `cacerts`-sized secret ~3 KB).
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Rounds (engines alternate within each round, so drift hits both alike).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// What the store needs from an engine: a durable batch commit and a point read.
trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    fn commit(&self, batch: &[(String, Vec<u8>)]) -> anyhow::Result<()>;
    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
}

struct Sqlite {
    path: PathBuf,
    writer: std::sync::Mutex<rusqlite::Connection>,
}

thread_local! {
    static SQLITE_READER: std::cell::RefCell<Option<(PathBuf, rusqlite::Connection)>> = const { std::cell::RefCell::new(None) };
}

impl Sqlite {
    fn open(path: &Path) -> anyhow::Result<Sqlite> {
        let c = rusqlite::Connection::open(path)?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        c.execute_batch("CREATE TABLE IF NOT EXISTS objects (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")?;
        Ok(Sqlite { path: path.to_path_buf(), writer: std::sync::Mutex::new(c) })
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite (WAL, synchronous=FULL)"
    }

    fn commit(&self, batch: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let mut c = self.writer.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached("INSERT OR REPLACE INTO objects (k, v) VALUES (?1, ?2)")?;
            for (k, v) in batch {
                st.execute(rusqlite::params![k, v])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        SQLITE_READER.with(|cell| {
            let mut slot = cell.borrow_mut();
            // A read-write connection, as the store's own readers are (WAL readers write the -shm).
            if slot.as_ref().is_none_or(|(p, _)| *p != self.path) {
                let c = rusqlite::Connection::open(&self.path)?;
                *slot = Some((self.path.clone(), c));
            }
            let (_, c) = slot.as_ref().ok_or_else(|| anyhow::anyhow!("no reader"))?;
            let mut st = c.prepare_cached("SELECT v FROM objects WHERE k = ?1")?;
            let mut rows = st.query([key])?;
            Ok(match rows.next()? {
                Some(r) => Some(r.get(0)?),
                None => None,
            })
        })
    }
}

const REDB_TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");

struct Redb(redb::Database);

impl Redb {
    fn open(path: &Path) -> anyhow::Result<Redb> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(REDB_TABLE)?;
        tx.commit()?;
        Ok(Redb(db))
    }
}

impl Engine for Redb {
    fn name(&self) -> &'static str {
        "redb (Durability::Immediate)"
    }

    fn commit(&self, batch: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let tx = self.0.begin_write()?;
        {
            let mut t = tx.open_table(REDB_TABLE)?;
            for (k, v) in batch {
                t.insert(k.as_str(), v.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.0.begin_read()?;
        let t = tx.open_table(REDB_TABLE)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }
}

type Job = ((String, Vec<u8>), mpsc::Sender<anyhow::Result<()>>);

/// The group-commit loop: takes one queued write, then everything else already queued, commits
/// them as one transaction and answers each writer.
fn committer(engine: Arc<dyn Engine>, rx: mpsc::Receiver<Job>, batches: Arc<std::sync::atomic::AtomicUsize>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let (batch, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        let result = engine.commit(&batch);
        batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for r in replies {
            let _ = r.send(result.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e}")));
        }
    }
}

fn value(i: usize, bytes: usize) -> Vec<u8> {
    let mut v = format!("{i:016}").into_bytes();
    v.resize(bytes, b'x');
    v
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn measure(engine: Arc<dyn Engine>, dir: &Path, a: &Args) -> anyhow::Result<()> {
    // Serial: one object per transaction.
    let mut serial = Latencies::default();
    let t0 = Instant::now();
    for i in 0..a.serial {
        let t = Instant::now();
        engine.commit(&[(format!("serial-{i}"), value(i, a.value_bytes))])?;
        serial.push(t.elapsed());
    }
    let serial_rate = a.serial as f64 / t0.elapsed().as_secs_f64();

    // Group commit from `concurrency` writers.
    let (tx, rx) = mpsc::channel::<Job>();
    let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = {
        let (engine, batches) = (engine.clone(), batches.clone());
        std::thread::spawn(move || committer(engine, rx, batches))
    };
    let per = a.objects / a.concurrency;
    let t0 = Instant::now();
    let cpu0 = meshca_bench::cpu_times("self");
    let writers: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let (tx, bytes) = (tx.clone(), a.value_bytes);
            std::thread::spawn(move || -> anyhow::Result<Latencies> {
                let mut lat = Latencies::default();
                let (reply_tx, reply_rx) = mpsc::channel();
                for i in 0..per {
                    let t = Instant::now();
                    let n = w * per + i;
                    tx.send(((format!("object-{n}"), value(n, bytes)), reply_tx.clone()))?;
                    reply_rx.recv()??;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    drop(tx);
    let mut group = Latencies::default();
    for w in writers {
        group.extend(w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
    }
    let elapsed = t0.elapsed();
    let cpu = meshca_bench::cpu_times("self").zip(cpu0).map(|(b, a)| b.since(&a).total()).unwrap_or_default();
    c.join().map_err(|_| anyhow::anyhow!("committer panicked"))?;
    let written = per * a.concurrency;
    let group_rate = written as f64 / elapsed.as_secs_f64();
    let n_batches = batches.load(std::sync::atomic::Ordering::Relaxed);

    // Point reads.
    let t0 = Instant::now();
    let readers: Vec<_> = (0..a.concurrency)
        .map(|r| {
            let engine = engine.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for i in 0..per {
                    let n = (r * 7919 + i * 104_729) % written;
                    anyhow::ensure!(engine.get(&format!("object-{n}"))?.is_some(), "object-{n} missing");
                }
                Ok(())
            })
        })
        .collect();
    for r in readers {
        r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    let read_rate = written as f64 / t0.elapsed().as_secs_f64();

    println!(
        "{:<32} serial {:>7.0} commits/s (p50 {} ms, p99 {} ms) | group {:>7.0} objects/s in {} commits (avg {:.1}/commit), write p50 {} ms p99 {} ms, {:.1} µs CPU/object | reads {:>8.0}/s | {:.1} MB on disk",
        engine.name(),
        serial_rate,
        meshca_bench::ms(serial.percentile(50.0)),
        meshca_bench::ms(serial.percentile(99.0)),
        group_rate,
        n_batches,
        written as f64 / n_batches.max(1) as f64,
        meshca_bench::ms(group.percentile(50.0)),
        meshca_bench::ms(group.percentile(99.0)),
        cpu.as_secs_f64() * 1e6 / written as f64,
        read_rate,
        dir_size(dir) as f64 / 1e6,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    println!(
        "{} objects of {} B from {} writers; {} serial commits; {} round(s)",
        a.objects, a.value_bytes, a.concurrency, a.serial, a.rounds
    );
    for round in 1..=a.rounds {
        for parent in &a.dirs {
            println!("-- round {round}, {}", parent.display());
            for which in ["sqlite", "redb"] {
                let tmp = tempfile::Builder::new().prefix("store-engines-").tempdir_in(parent)?;
                let engine: Arc<dyn Engine> = match which {
                    "sqlite" => Arc::new(Sqlite::open(&tmp.path().join("store.sqlite"))?),
                    _ => Arc::new(Redb::open(&tmp.path().join("store.redb"))?),
                };
                measure(engine, tmp.path(), &a)?;
            }
        }
    }
    Ok(())
}
