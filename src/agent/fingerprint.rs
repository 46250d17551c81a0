//! File identity: a checksum of the file's first line (not its path or inode), so a file is
//! recognised after a rename and a reused inode is never mistaken for a known file; and a
//! checksum of the bytes just before a stored position, to check that position still fits.
//!
//! Reads at most a few KiB with positioned reads; never moves a file's cursor.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// At most this many leading bytes identify a file (a longer first line is cut here).
pub const FINGERPRINT_BYTES: usize = 4096;
/// How many bytes before a position [`tail_hash`] covers.
pub const TAIL_BYTES: u64 = 64;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a, 64 bit: stable across builds and platforms, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// [`fnv1a`] of every prefix of `bytes`: element `n` is the checksum of `bytes[..n]`.
pub fn fnv1a_prefixes(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(FNV_OFFSET);
    for b in bytes {
        let h = out[out.len() - 1];
        out.push((h ^ u64::from(*b)).wrapping_mul(FNV_PRIME));
    }
    out
}

/// The identity of a file: its first line (through the newline) or its first
/// [`FINGERPRINT_BYTES`] bytes. `None` while the file has neither a complete first line nor
/// that many bytes: such a file has nothing to ship yet.
pub fn fingerprint(file: &File) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; FINGERPRINT_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read_at(&mut buf[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled].contains(&b'\n') {
            break;
        }
    }
    let head = &buf[..filled];
    let end = match head.iter().position(|b| *b == b'\n') {
        Some(nl) => nl + 1,
        None if filled == FINGERPRINT_BYTES => filled,
        None => return Ok(None),
    };
    Ok(Some(format!("{:x}-{:016x}", end, fnv1a(&head[..end]))))
}

/// Checksum of the (up to) [`TAIL_BYTES`] bytes before `position`; `None` when they cannot all
/// be read (the file is shorter than `position`).
pub fn tail_hash(file: &File, position: u64) -> std::io::Result<Option<String>> {
    let start = position.saturating_sub(TAIL_BYTES);
    let len = (position - start) as usize;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = file.read_at(&mut buf[filled..], start + filled as u64)?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
    }
    Ok(Some(hash_tail_bytes(&buf)))
}

/// The checksum [`tail_hash`] stores, of bytes already in hand.
pub fn hash_tail_bytes(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

/// The [`tail_hash`] of position `end`, computed from the bytes just read: `buf` starts at file
/// offset `buf_start` and `carry` holds the bytes just before it. `None` when `end` is outside
/// what is in hand. Reading the file again instead would race with truncation.
pub fn window_tail_hash(carry: &[u8], buf: &[u8], buf_start: u64, end: u64) -> Option<String> {
    window_tail_fnv(carry, buf, buf_start, end).map(|h| format!("{h:016x}"))
}

/// [`window_tail_hash`] as a number (no allocation when the bytes lie within `buf`).
pub fn window_tail_fnv(carry: &[u8], buf: &[u8], buf_start: u64, end: u64) -> Option<u64> {
    let buf_end = buf_start + buf.len() as u64;
    if end < buf_start || end > buf_end {
        return None;
    }
    let start = end.saturating_sub(TAIL_BYTES);
    let rel_end = (end - buf_start) as usize;
    if start >= buf_start {
        return Some(fnv1a(&buf[(start - buf_start) as usize..rel_end]));
    }
    let from_carry = (buf_start - start) as usize;
    if from_carry > carry.len() {
        return None;
    }
    let mut bytes = carry[carry.len() - from_carry..].to_vec();
    bytes.extend_from_slice(&buf[..rel_end]);
    Some(fnv1a(&bytes))
}

/// Whether a file's leading bytes say it is compressed (gzip, zstd, bzip2, xz, lz4, zip).
pub fn looks_compressed(file: &File) -> bool {
    let mut head = [0u8; 6];
    let n = file.read_at(&mut head, 0).unwrap_or(0);
    let h = &head[..n];
    h.starts_with(&[0x1f, 0x8b])
        || h.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || h.starts_with(b"BZh")
        || h.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
        || h.starts_with(&[0x04, 0x22, 0x4d, 0x18])
        || h.starts_with(b"PK\x03\x04")
}

/// Whether a path's extension says it is compressed.
pub fn compressed_name(path: &std::path::Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("gz" | "zst" | "bz2" | "xz" | "lz4" | "zip" | "Z" | "tgz")
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A temp file holding `bytes`, and a handle to read it.
    pub(crate) fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        t.flush().unwrap();
        let f = File::open(t.path()).unwrap();
        (t, f)
    }

    #[test]
    fn fingerprint_needs_a_complete_first_line() {
        let (_t, f) = file_with(b"{\"a\":1");
        assert_eq!(fingerprint(&f).unwrap(), None);
        let (_t, f) = file_with(b"{\"a\":1}\nmore");
        let (_t2, g) = file_with(b"{\"a\":1}\nother stuff\n");
        assert!(fingerprint(&f).unwrap().is_some());
        assert_eq!(fingerprint(&f).unwrap(), fingerprint(&g).unwrap());
        let (_t3, h) = file_with(b"{\"a\":2}\n");
        assert_ne!(fingerprint(&f).unwrap(), fingerprint(&h).unwrap());
    }

    #[test]
    fn long_first_line_uses_the_first_bytes() {
        let long = vec![b'x'; FINGERPRINT_BYTES + 10];
        let (_t, f) = file_with(&long);
        assert!(fingerprint(&f).unwrap().is_some());
    }

    #[test]
    fn prefix_checksums_equal_the_checksum_of_each_prefix() {
        let bytes = b"{\"a\":1}\nmore";
        let p = fnv1a_prefixes(bytes);
        assert_eq!(p.len(), bytes.len() + 1);
        for n in 0..=bytes.len() {
            assert_eq!(p[n], fnv1a(&bytes[..n]));
        }
    }

    #[test]
    fn tail_hash_checks_the_bytes_before_a_position() {
        let (_t, f) = file_with(b"line one\nline two\n");
        let (_t2, g) = file_with(b"line one\nline 2!!\n");
        assert_eq!(tail_hash(&f, 9).unwrap(), tail_hash(&g, 9).unwrap());
        assert_ne!(tail_hash(&f, 18).unwrap(), tail_hash(&g, 18).unwrap());
        assert_eq!(tail_hash(&f, 100).unwrap(), None);
    }

    #[test]
    fn window_hash_equals_the_file_hash() {
        let content: Vec<u8> = (0..300u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let (_t, f) = file_with(&content);
        for (buf_start, len) in [(0usize, 100usize), (40, 200), (150, 500), (1000, 300)] {
            let buf = &content[buf_start..(buf_start + len).min(content.len())];
            let carry = &content[buf_start.saturating_sub(64)..buf_start];
            for end in buf_start..=buf_start + buf.len() {
                assert_eq!(
                    window_tail_hash(carry, buf, buf_start as u64, end as u64),
                    tail_hash(&f, end as u64).unwrap(),
                    "buf_start {buf_start} end {end}"
                );
            }
            assert_eq!(
                window_tail_hash(
                    carry,
                    buf,
                    buf_start as u64,
                    (buf_start + buf.len() + 1) as u64
                ),
                None
            );
        }
    }

    #[test]
    fn compressed_files_are_recognised() {
        let (_t, f) = file_with(&[0x1f, 0x8b, 8, 0, 0, 0]);
        assert!(looks_compressed(&f));
        let (_t, f) = file_with(b"{\"x\":1}\n");
        assert!(!looks_compressed(&f));
        assert!(compressed_name(std::path::Path::new("/a/b.jsonl.1.gz")));
        assert!(!compressed_name(std::path::Path::new("/a/b.jsonl.1")));
    }
}
