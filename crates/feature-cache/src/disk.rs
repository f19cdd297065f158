//! The versioned disk tier: one file per entry, written atomically, checked
//! on read, swept of stale versions on open, bounded in bytes.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::hash::fnv1a;
use crate::{DiskConfig, Error};

/// The on-disk entry layout version this build reads and writes. Entries
/// with another version are deleted when a store is opened.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: [u8; 8] = *b"SNUGFCE\0";
/// magic, version, schema hash, created_at, build_nanos, key_len, payload_len, checksum.
const FIXED: usize = 8 + 4 + 8 + 8 + 8 + 4 + 8 + 4;
const ENTRY_EXT: &str = "entry";
const TEMP_EXT: &str = "tmp";

/// The header written before each payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHeader {
    /// Layout version ([`FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// The entry's key.
    pub key: String,
    /// Hash of [`DiskConfig::schema`] when written.
    pub schema_hash: u64,
    /// Unix time of writing, in milliseconds.
    pub created_at: u64,
    /// How long the value took to build, in nanoseconds (for time-saved stats).
    pub build_nanos: u64,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// CRC-32 of the key and the payload.
    pub checksum: u32,
}

/// Counters of a [`DiskStore`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStats {
    /// Reads that returned a whole, checked entry.
    pub hits: u64,
    /// Reads that found nothing usable.
    pub misses: u64,
    /// Entries written.
    pub writes: u64,
    /// Corrupt or truncated entries found and removed.
    pub corrupt_removed: u64,
    /// Entries of another format version or schema removed on open.
    pub stale_removed: u64,
    /// Half-written temporary files removed on open.
    pub temp_removed: u64,
    /// Entries removed to stay within `max_bytes`.
    pub evicted: u64,
    /// I/O errors met (each one degrades the tier for a while).
    pub errors: u64,
    /// Whether the tier is degraded to memory-only right now.
    pub degraded: bool,
    /// Entries on disk.
    pub entries: u64,
    /// Bytes of entry files on disk.
    pub bytes: u64,
}

#[derive(Debug)]
struct Degraded {
    until: Instant,
    /// The delays before the next retries: backon's exponential backoff from
    /// `retry_initial`, doubling up to `retry_max`, without end.
    delays: ExponentialBackoff,
}

#[derive(Debug)]
struct State {
    /// File name → (key, file size), least recently used first out.
    index: LruCache<String, (String, u64)>,
    bytes: u64,
    degraded: Option<Degraded>,
    stats: DiskStats,
}

/// A directory of entry files.
///
/// Each entry is written to a temporary file in the same directory, synced,
/// and renamed over its final name, so a reader (or a process restarted after
/// a crash) sees either the old file, the new one, or none: never half of one.
/// I/O errors degrade the store: reads miss and writes are skipped until a
/// retry after a backoff succeeds.
#[derive(Debug)]
pub struct DiskStore {
    config: DiskConfig,
    schema_hash: u64,
    state: Mutex<State>,
}

fn file_name(key: &str) -> String {
    format!("{:016x}.{ENTRY_EXT}", fnv1a(key.as_bytes()))
}

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(payload);
    h.finalize()
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Why a file is not a usable entry.
enum Bad {
    Corrupt(String),
    Io(io::Error),
}

/// Reads the fixed header and the key of an entry file; `None` payload
/// when `with_payload` is false.
fn read_entry(path: &Path, with_payload: bool) -> Result<(EntryHeader, Option<Vec<u8>>), Bad> {
    let mut f = File::open(path).map_err(Bad::Io)?;
    let file_len = f.metadata().map_err(Bad::Io)?.len();
    let mut fixed = [0u8; FIXED];
    if let Err(e) = f.read_exact(&mut fixed) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            Bad::Corrupt(format!("truncated header ({file_len} bytes)"))
        } else {
            Bad::Io(e)
        });
    }
    if fixed[..8] != MAGIC {
        return Err(Bad::Corrupt("bad magic".into()));
    }
    let format_version = read_u32(&fixed, 8);
    let schema_hash = read_u64(&fixed, 12);
    let created_at = read_u64(&fixed, 20);
    let build_nanos = read_u64(&fixed, 28);
    let key_len = u64::from(read_u32(&fixed, 36));
    let payload_len = read_u64(&fixed, 40);
    let stored_sum = read_u32(&fixed, 48);
    let expected = (FIXED as u64)
        .checked_add(key_len)
        .and_then(|n| n.checked_add(payload_len));
    if expected != Some(file_len) {
        return Err(Bad::Corrupt(format!(
            "length {file_len} does not match header ({FIXED} + {key_len} + {payload_len})"
        )));
    }
    let mut key = vec![0u8; key_len as usize];
    f.read_exact(&mut key).map_err(Bad::Io)?;
    let key = String::from_utf8(key).map_err(|_| Bad::Corrupt("key is not UTF-8".into()))?;
    let header = EntryHeader {
        format_version,
        key,
        schema_hash,
        created_at,
        build_nanos,
        payload_len,
        checksum: stored_sum,
    };
    if !with_payload {
        return Ok((header, None));
    }
    let mut payload = vec![0u8; payload_len as usize];
    f.read_exact(&mut payload).map_err(Bad::Io)?;
    if checksum(header.key.as_bytes(), &payload) != stored_sum {
        return Err(Bad::Corrupt("checksum mismatch".into()));
    }
    Ok((header, Some(payload)))
}

impl DiskStore {
    /// Opens (creating if needed) the directory in `config.dir`: removes
    /// half-written temporary files and entries of another format version or
    /// schema, and indexes the rest, oldest first.
    pub fn open(config: DiskConfig) -> Result<Self, Error> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let schema_hash = fnv1a(config.schema.as_bytes());
        let mut stats = DiskStats::default();
        let mut found: Vec<(SystemTime, String, String, u64)> = Vec::new();
        for item in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let item = item.map_err(|e| Error::io(&dir, e))?;
            let path = item.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let ext = path.extension().and_then(|e| e.to_str());
            if ext == Some(TEMP_EXT) {
                if fs::remove_file(&path).is_ok() {
                    stats.temp_removed += 1;
                    tracing::info!(path = %path.display(), "removed half-written temporary file");
                }
                continue;
            }
            if ext != Some(ENTRY_EXT) {
                continue;
            }
            match read_entry(&path, false) {
                Ok((h, _))
                    if h.format_version != FORMAT_VERSION || h.schema_hash != schema_hash =>
                {
                    if fs::remove_file(&path).is_ok() {
                        stats.stale_removed += 1;
                    }
                    tracing::info!(
                        path = %path.display(),
                        format_version = h.format_version,
                        "removed stale entry (other format version or schema)"
                    );
                }
                Ok((h, _)) => {
                    let meta = item.metadata().map_err(|e| Error::io(&path, e))?;
                    let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                    found.push((mtime, name, h.key, meta.len()));
                }
                Err(Bad::Corrupt(why)) => {
                    tracing::warn!(path = %path.display(), %why, "removed corrupt entry");
                    if fs::remove_file(&path).is_ok() {
                        stats.corrupt_removed += 1;
                    }
                }
                Err(Bad::Io(e)) => return Err(Error::io(&path, e)),
            }
        }
        found.sort();
        let mut index = LruCache::unbounded();
        let mut bytes = 0;
        for (_, name, key, len) in found {
            bytes += len;
            index.push(name, (key, len));
        }
        let store = Self {
            config,
            schema_hash,
            state: Mutex::new(State {
                index,
                bytes,
                degraded: None,
                stats,
            }),
        };
        store.evict_over_budget(&mut store.state.lock());
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DiskStats {
        let st = self.state.lock();
        let mut s = st.stats.clone();
        s.degraded = st.degraded.is_some();
        s.entries = st.index.len() as u64;
        s.bytes = st.bytes;
        s
    }

    /// Whether the store is degraded to memory-only after an I/O error.
    pub fn is_degraded(&self) -> bool {
        self.state.lock().degraded.is_some()
    }

    /// Whether the store may touch the disk now: not degraded, or the
    /// backoff has run out (then this call is the retry).
    fn usable(&self, st: &State) -> bool {
        match &st.degraded {
            None => true,
            Some(d) => Instant::now() >= d.until,
        }
    }

    fn fail(&self, st: &mut State, path: &Path, e: &io::Error) {
        st.stats.errors += 1;
        let mut delays = match st.degraded.take() {
            Some(d) => d.delays,
            None => ExponentialBuilder::new()
                .with_min_delay(self.config.retry_initial)
                .with_max_delay(self.config.retry_max)
                .with_factor(2.0)
                .without_max_times()
                .build(),
        };
        let backoff = delays.next().unwrap_or(self.config.retry_max);
        tracing::warn!(
            path = %path.display(),
            error = %e,
            retry_in = ?backoff,
            "disk tier degraded to memory-only"
        );
        st.degraded = Some(Degraded {
            until: Instant::now() + backoff,
            delays,
        });
    }

    fn recovered(&self, st: &mut State) {
        if st.degraded.take().is_some() {
            tracing::info!(dir = %self.config.dir.display(), "disk tier recovered");
        }
    }

    /// The payload stored under `key` with its header, or `None` when absent,
    /// corrupt (the file is removed) or the store is degraded.
    pub fn get(&self, key: &str) -> Option<(EntryHeader, Vec<u8>)> {
        let name = file_name(key);
        let path = self.config.dir.join(&name);
        {
            let mut st = self.state.lock();
            if !self.usable(&st) || !st.index.contains(&name) {
                st.stats.misses += 1;
                return None;
            }
        }
        let result = read_entry(&path, true);
        let mut st = self.state.lock();
        match result {
            Ok((h, Some(payload))) if h.key == key && h.schema_hash == self.schema_hash => {
                st.index.promote(&name);
                st.stats.hits += 1;
                Some((h, payload))
            }
            Ok(_) => {
                st.stats.misses += 1;
                None
            }
            Err(Bad::Corrupt(why)) => {
                tracing::warn!(path = %path.display(), %why, "corrupt entry removed; it will be rebuilt");
                st.stats.corrupt_removed += 1;
                st.stats.misses += 1;
                self.forget(&mut st, &name);
                let _ = fs::remove_file(&path);
                None
            }
            Err(Bad::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                st.stats.misses += 1;
                self.forget(&mut st, &name);
                None
            }
            Err(Bad::Io(e)) => {
                st.stats.misses += 1;
                self.fail(&mut st, &path, &e);
                None
            }
        }
    }

    fn forget(&self, st: &mut State, name: &str) {
        if let Some((_, len)) = st.index.pop(name) {
            st.bytes -= len;
        }
    }

    /// Writes `payload` under `key` atomically. Skipped (Ok) while degraded;
    /// an I/O error degrades the store and is returned.
    pub fn put(&self, key: &str, payload: &[u8], build_time: Duration) -> Result<(), Error> {
        let name = file_name(key);
        let total = (FIXED + key.len() + payload.len()) as u64;
        {
            let st = self.state.lock();
            if !self.usable(&st) {
                return Ok(());
            }
        }
        if total > self.config.max_bytes || key.len() > u32::MAX as usize {
            tracing::debug!(
                key,
                total,
                max = self.config.max_bytes,
                "entry larger than the disk budget; not stored"
            );
            return Ok(());
        }
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut buf = Vec::with_capacity(total as usize);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&self.schema_hash.to_le_bytes());
        buf.extend_from_slice(&created_at.to_le_bytes());
        buf.extend_from_slice(
            &(build_time.as_nanos().min(u128::from(u64::MAX)) as u64).to_le_bytes(),
        );
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(&checksum(key.as_bytes(), payload).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(payload);

        let path = self.config.dir.join(&name);
        match self.write_atomic(&name, &path, &buf) {
            Ok(()) => {
                let mut st = self.state.lock();
                self.recovered(&mut st);
                self.forget(&mut st, &name);
                st.index.push(name, (key.to_owned(), total));
                st.bytes += total;
                st.stats.writes += 1;
                self.evict_over_budget(&mut st);
                Ok(())
            }
            Err((at, e)) => {
                let mut st = self.state.lock();
                self.fail(&mut st, &at, &e);
                Err(Error::io(&at, e))
            }
        }
    }

    /// Writes `buf` to a temporary file beside `path` (named after the entry,
    /// with the extension the sweep on open removes), syncs it and renames
    /// it over `path` with [`tempfile::NamedTempFile::persist`]. On any
    /// error the temporary file is deleted when it drops.
    fn write_atomic(
        &self,
        name: &str,
        path: &Path,
        buf: &[u8],
    ) -> Result<(), (PathBuf, io::Error)> {
        let dir = &self.config.dir;
        let builder = || {
            tempfile::Builder::new()
                .prefix(&format!("{name}."))
                .suffix(&format!(".{TEMP_EXT}"))
                .tempfile_in(dir)
        };
        let mut f = builder()
            .or_else(|e| {
                // The directory may have been removed under us: recreate it once.
                if e.kind() == io::ErrorKind::NotFound && fs::create_dir_all(dir).is_ok() {
                    builder()
                } else {
                    Err(e)
                }
            })
            .map_err(|e| (dir.join(name), e))?;
        let tmp = f.path().to_owned();
        f.write_all(buf).map_err(|e| (tmp.clone(), e))?;
        if self.config.fsync {
            f.as_file().sync_all().map_err(|e| (tmp.clone(), e))?;
        }
        f.persist(path).map_err(|e| (path.to_owned(), e.error))?;
        if self.config.fsync {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Removes the entry under `key`; true if one was indexed.
    pub fn remove(&self, key: &str) -> bool {
        let name = file_name(key);
        let mut st = self.state.lock();
        let had = st.index.contains(&name);
        self.forget(&mut st, &name);
        drop(st);
        if had {
            let _ = fs::remove_file(self.config.dir.join(&name));
        }
        had
    }

    fn evict_over_budget(&self, st: &mut State) {
        while st.bytes > self.config.max_bytes {
            let Some((name, (_, len))) = st.index.pop_lru() else {
                break;
            };
            st.bytes -= len;
            st.stats.evicted += 1;
            let _ = fs::remove_file(self.config.dir.join(name));
        }
    }
}
