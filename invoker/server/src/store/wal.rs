//! The raft log's entries on disk: one append-only, preallocated file.
//!
//! Record: `len: u32 LE | crc32(index ‖ payload): u32 LE | index: u64 LE | payload (len bytes)`.
//! The file is grown in [`PREALLOCATE_BYTES`] steps filled with zeros, so an fdatasync after an
//! append flushes data only, not the file size (the same trick as etcd's WAL). A record with
//! `len == 0` marks the end. At open, records are read until the end marker, a torn record or
//! a checksum mismatch; the tail after the last good record is zeroed, so a crash in the
//! middle of a write loses only writes that were never acknowledged.
//!
//! Not thread-safe on its own: the log store's single writer thread owns it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const HEADER_BYTES: u64 = 16;
/// Growth step of the file. Large enough that growth is rare, small enough for a test machine.
pub const PREALLOCATE_BYTES: u64 = 16 * 1024 * 1024;
/// Largest accepted record payload (a raft entry is far smaller; a corrupt length is not).
const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

pub struct Wal {
    path: PathBuf,
    file: File,
    /// Offset where the next record goes.
    tail: u64,
    /// Allocated file length (zeros after `tail`).
    allocated: u64,
    /// (index, offset) of every live record, in order.
    offsets: Vec<(u64, u64)>,
}

/// What [`Wal::open`] found.
pub struct Recovered {
    pub wal: Wal,
    /// (index, payload) of every record, in file order.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Bytes after the last good record that were discarded (a torn write).
    pub discarded_tail: bool,
}

fn crc_of(index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

impl Wal {
    pub fn open(path: &Path) -> std::io::Result<Recovered> {
        let io =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let allocated = file.metadata().map_err(io)?.len();
        let mut bytes = Vec::with_capacity(allocated as usize);
        file.read_to_end(&mut bytes).map_err(io)?;

        let mut records = Vec::new();
        let mut offsets = Vec::new();
        let mut pos = 0usize;
        let mut discarded_tail = false;
        while pos + HEADER_BYTES as usize <= bytes.len() {
            let len =
                u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
            if len == 0 {
                break;
            }
            let start = pos + HEADER_BYTES as usize;
            let end = start + len as usize;
            if len > MAX_RECORD_BYTES || end > bytes.len() {
                discarded_tail = true;
                break;
            }
            let crc = u32::from_le_bytes([
                bytes[pos + 4],
                bytes[pos + 5],
                bytes[pos + 6],
                bytes[pos + 7],
            ]);
            let mut index_bytes = [0u8; 8];
            index_bytes.copy_from_slice(&bytes[pos + 8..pos + 16]);
            let index = u64::from_le_bytes(index_bytes);
            let payload = &bytes[start..end];
            if crc_of(index, payload) != crc {
                discarded_tail = true;
                break;
            }
            if offsets.last().is_some_and(|(last, _)| *last >= index) {
                // Indexes only grow; anything else is stale data, not a record.
                discarded_tail = true;
                break;
            }
            offsets.push((index, pos as u64));
            records.push((index, payload.to_vec()));
            pos = end;
        }
        let tail = pos as u64;
        let mut wal = Wal {
            path: path.to_path_buf(),
            file,
            tail,
            allocated,
            offsets,
        };
        if discarded_tail {
            // Zero what follows the last good record so a later scan stops there too.
            wal.zero_from(tail)?;
            wal.sync()?;
        }
        Ok(Recovered {
            wal,
            records,
            discarded_tail,
        })
    }

    /// Adds the file's path to an I/O error.
    fn io(&self, e: std::io::Error) -> std::io::Error {
        std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
    }

    /// Writes zeros over `[from, allocated)`, or at least over the next header.
    fn zero_from(&mut self, from: u64) -> std::io::Result<()> {
        let end = self.allocated.max(from + HEADER_BYTES);
        let zeros = vec![0u8; (end - from).min(1024 * 1024) as usize];
        let mut at = from;
        while at < end {
            let n = zeros.len().min((end - at) as usize);
            self.file
                .seek(SeekFrom::Start(at))
                .map_err(|e| self.io(e))?;
            self.file.write_all(&zeros[..n]).map_err(|e| self.io(e))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes room for `needed` more bytes (plus an end marker) by growing the file with zeros.
    fn reserve(&mut self, needed: u64) -> std::io::Result<()> {
        let want = self.tail + needed + HEADER_BYTES;
        if want <= self.allocated {
            return Ok(());
        }
        let mut new_len = self.allocated.max(PREALLOCATE_BYTES);
        while new_len < want {
            new_len += PREALLOCATE_BYTES;
        }
        // set_len fills with zeros; the size change is flushed by the next sync.
        self.file.set_len(new_len).map_err(|e| self.io(e))?;
        self.allocated = new_len;
        Ok(())
    }

    /// Appends records (not yet durable: call [`Wal::sync`]).
    pub fn append(&mut self, records: &[(u64, &[u8])]) -> std::io::Result<()> {
        let total: u64 = records
            .iter()
            .map(|(_, p)| HEADER_BYTES + p.len() as u64)
            .sum();
        self.reserve(total)?;
        let mut buf = Vec::with_capacity(total as usize);
        let mut offset = self.tail;
        for (index, payload) in records {
            let len = u32::try_from(payload.len())
                .ok()
                .filter(|l| *l > 0 && *l <= MAX_RECORD_BYTES)
                .ok_or_else(|| {
                    std::io::Error::other(format!("record of {} bytes is too large", payload.len()))
                })?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc_of(*index, payload).to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(payload);
            self.offsets.push((*index, offset));
            offset += HEADER_BYTES + payload.len() as u64;
        }
        // An end marker after the last record: bytes left behind by a truncate must never read
        // as records that follow this one.
        buf.extend_from_slice(&[0u8; HEADER_BYTES as usize]);
        self.file
            .seek(SeekFrom::Start(self.tail))
            .map_err(|e| self.io(e))?;
        self.file.write_all(&buf).map_err(|e| self.io(e))?;
        self.tail = offset;
        Ok(())
    }

    /// Drops every record with index >= `from` (not yet durable: call [`Wal::sync`]).
    pub fn truncate(&mut self, from: u64) -> std::io::Result<()> {
        let Some(pos) = self.offsets.iter().position(|(i, _)| *i >= from) else {
            return Ok(()); // nothing at or after `from`
        };
        let offset = self.offsets[pos].1;
        self.offsets.truncate(pos);
        // An end marker where the first dropped record was; the stale bytes after it are
        // never read again (scans stop at the marker) and are overwritten by later appends.
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.io(e))?;
        self.file
            .write_all(&[0u8; HEADER_BYTES as usize])
            .map_err(|e| self.io(e))?;
        self.tail = offset;
        Ok(())
    }

    /// Bytes in use, and how many of them belong to records with index <= `purged`.
    pub fn dead_bytes(&self, purged: u64) -> (u64, u64) {
        let dead = self
            .offsets
            .iter()
            .find(|(i, _)| *i > purged)
            .map(|(_, off)| *off)
            .unwrap_or(self.tail);
        (self.tail, dead)
    }

    /// Rewrites the file without the records with index <= `purged`, durably, and swaps it in.
    /// Copies the file's own bytes, so it keeps exactly what the file holds. Returns the bytes
    /// dropped.
    pub fn compact(&mut self, purged: u64) -> std::io::Result<u64> {
        let (used, dead) = self.dead_bytes(purged);
        if dead == 0 {
            return Ok(0);
        }
        let mut live = vec![0u8; (used - dead) as usize];
        self.file
            .seek(SeekFrom::Start(dead))
            .map_err(|e| self.io(e))?;
        self.file.read_exact(&mut live).map_err(|e| self.io(e))?;
        let tmp = self.path.with_extension("compact");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        let allocated =
            (live.len() as u64 + HEADER_BYTES).div_ceil(PREALLOCATE_BYTES) * PREALLOCATE_BYTES;
        file.set_len(allocated).map_err(|e| self.io(e))?;
        file.write_all(&live).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))?;
        }
        self.file = file;
        self.allocated = allocated;
        self.tail = used - dead;
        self.offsets = self
            .offsets
            .iter()
            .filter(|(_, off)| *off >= dead)
            .map(|(i, off)| (*i, off - dead))
            .collect();
        Ok(dead)
    }

    /// fdatasync: everything written so far is durable when this returns.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data().map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry-{i}").into_bytes()
    }

    fn write(wal: &mut Wal, range: std::ops::Range<u64>) {
        let data: Vec<(u64, Vec<u8>)> = range.map(|i| (i, payload(i))).collect();
        let refs: Vec<(u64, &[u8])> = data.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        wal.append(&refs).unwrap();
        wal.sync().unwrap();
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let mut wal = Wal::open(&path).unwrap().wal;
        write(&mut wal, 1..100);
        drop(wal);
        let r = Wal::open(&path).unwrap();
        assert!(!r.discarded_tail);
        assert_eq!(r.records.len(), 99);
        assert_eq!(r.records[41], (42, payload(42)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATE_BYTES);
    }

    #[test]
    fn truncate_then_append_replaces_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let mut wal = Wal::open(&path).unwrap().wal;
        write(&mut wal, 1..50);
        wal.truncate(30).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let r = Wal::open(&path).unwrap();
        assert_eq!(r.records.last().unwrap().0, 29);
        let mut wal = r.wal;
        let other = b"other".to_vec();
        wal.append(&[(30, other.as_slice())]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let r = Wal::open(&path).unwrap();
        assert_eq!(r.records.len(), 30);
        assert_eq!(r.records[29], (30, other));
    }

    #[test]
    fn truncated_records_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let mut wal = Wal::open(&path).unwrap().wal;
        write(&mut wal, 1..50);
        wal.truncate(30).unwrap();
        // Same length as the old record 30: old 31.. lie right behind it.
        let same_len = payload(30);
        wal.append(&[(30, same_len.as_slice())]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let r = Wal::open(&path).unwrap();
        assert_eq!(r.records.last().unwrap().0, 30);
        assert_eq!(r.records.len(), 30);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_dropped_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let mut wal = Wal::open(&path).unwrap().wal;
        write(&mut wal, 1..11);
        let (tail, _) = wal.dead_bytes(0);
        drop(wal);
        // Flip a byte inside the last record's payload.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[tail as usize - 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = Wal::open(&path).unwrap();
        assert!(r.discarded_tail);
        assert_eq!(r.records.len(), 9);
        // The next open sees a clean end where the bad record was.
        drop(r);
        let r = Wal::open(&path).unwrap();
        assert!(!r.discarded_tail);
        assert_eq!(r.records.len(), 9);
    }

    #[test]
    fn compact_keeps_only_records_after_the_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let mut wal = Wal::open(&path).unwrap().wal;
        write(&mut wal, 1..1000);
        let (used, dead) = wal.dead_bytes(900);
        assert!(dead > used / 2);
        assert_eq!(wal.compact(900).unwrap(), dead);
        write(&mut wal, 1000..1001);
        wal.truncate(1000).unwrap();
        write(&mut wal, 1000..1002);
        drop(wal);
        let r = Wal::open(&path).unwrap();
        assert_eq!(r.records.first().unwrap().0, 901);
        assert_eq!(r.records.last().unwrap().0, 1001);
        assert_eq!(r.records.len(), 101);
        assert!(!path.with_extension("compact").exists());
    }
}
