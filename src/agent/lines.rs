//! Splitting the bytes read from a log file into complete lines.
//!
//! Pure: this module does no I/O and knows nothing of records or databases. It keeps at most
//! `max_line_bytes` of a line in memory: the rest of an over-long line is counted and
//! discarded, and the line is handed out truncated with its original length. A last line
//! without its `'\n'` is held until the newline arrives.
//!
//! Blank lines (empty or whitespace only) are handed out like any other line, so that offsets
//! advance past them; the parser turns them into no record.

/// One complete line: its bytes without the trailing `'\n'` (and without a trailing `'\r'`),
/// possibly truncated to `max_line_bytes`, and the file offsets it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line's content, at most `max_line_bytes` long.
    pub bytes: Vec<u8>,
    /// The file offset of the line's first byte.
    pub start: u64,
    /// The file offset just after the line's `'\n'`.
    pub end: u64,
    /// The original length in bytes (without `"\r\n"`) when the line was truncated.
    pub truncated_from: Option<u64>,
}

/// A complete line as [`LineSplitter::each_line`] hands it out: a [`Line`], borrowed from the
/// bytes fed (or, for a line that spanned two reads, from the splitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRef<'a> {
    pub bytes: &'a [u8],
    pub start: u64,
    pub end: u64,
    pub truncated_from: Option<u64>,
}

impl LineRef<'_> {
    /// The line with its own copy of the bytes.
    pub fn to_line(self) -> Line {
        Line {
            bytes: self.bytes.to_vec(),
            start: self.start,
            end: self.end,
            truncated_from: self.truncated_from,
        }
    }
}

impl Line {
    /// The line, borrowed.
    pub fn as_line_ref(&self) -> LineRef<'_> {
        LineRef {
            bytes: &self.bytes,
            start: self.start,
            end: self.end,
            truncated_from: self.truncated_from,
        }
    }
}

/// The largest buffer for a line spanning reads that is kept for the next such line.
const KEEP_PENDING_BYTES: usize = 64 * 1024;

/// Splits a stream of chunks into [`Line`]s, holding an incomplete last line.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    /// The kept prefix of the incomplete current line (at most `max_line_bytes`).
    pending: Vec<u8>,
    /// How many bytes of the current line have been seen, kept or not.
    pending_total: u64,
    /// Whether the last byte seen of the current line was `'\r'`; needed because that byte
    /// may have been discarded when the line is over-long.
    last_was_cr: bool,
    /// The file offset of the current line's first byte, which is also the offset just after
    /// the last complete line handed out.
    line_start: u64,
    /// The longest content kept of one line.
    max_line_bytes: usize,
}

impl LineSplitter {
    /// A splitter reading a file from `start_offset` (which must be at a line boundary).
    /// A `max_line_bytes` of 0 is treated as 1.
    pub fn new(start_offset: u64, max_line_bytes: usize) -> Self {
        LineSplitter {
            pending: Vec::new(),
            pending_total: 0,
            last_was_cr: false,
            line_start: start_offset,
            max_line_bytes: max_line_bytes.max(1),
        }
    }

    /// Feeds the next bytes read from the file; pushes each complete line to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Line>) {
        self.each_line(chunk, |line| out.push(line.to_line()));
    }

    /// Feeds the next bytes read from the file; calls `f` with each complete line, borrowed:
    /// a line wholly inside `chunk` is not copied at all.
    pub fn each_line(&mut self, chunk: &[u8], mut f: impl FnMut(LineRef<'_>)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    if self.pending_total == 0 {
                        self.whole_line(&rest[..i], &mut f);
                    } else {
                        self.absorb(&rest[..i]);
                        self.finish_line(&mut f);
                    }
                    rest = &rest[i + 1..];
                }
                None => {
                    self.absorb(rest);
                    rest = &[];
                }
            }
        }
    }

    /// The offset just after the last complete line handed out (what may be committed).
    pub fn committed_offset(&self) -> u64 {
        self.line_start
    }

    /// Bytes held for an incomplete last line (0 when at a line boundary), counting the
    /// bytes of an over-long line that were seen but discarded.
    pub fn pending_len(&self) -> u64 {
        self.pending_total
    }

    /// Adds part of the current line (no `'\n'` in `part`).
    fn absorb(&mut self, part: &[u8]) {
        if part.is_empty() {
            return;
        }
        let room = self.max_line_bytes.saturating_sub(self.pending.len());
        let keep = room.min(part.len());
        if self.pending.capacity() == 0 {
            // A line wholly in one read (the usual case) costs one exact allocation instead
            // of a chain of doublings.
            self.pending.reserve_exact(keep);
        }
        self.pending.extend_from_slice(&part[..keep]);
        self.pending_total += part.len() as u64;
        self.last_was_cr = part.last() == Some(&b'\r');
    }

    /// Hands out a line that lies wholly in the bytes fed (`part`, without its `'\n'`), as
    /// [`LineSplitter::finish_line`] would after absorbing it.
    fn whole_line(&mut self, part: &[u8], f: &mut impl FnMut(LineRef<'_>)) {
        let content_len = part.len() - usize::from(part.last() == Some(&b'\r'));
        let truncated_from = (content_len > self.max_line_bytes).then_some(content_len as u64);
        let start = self.line_start;
        let end = start + part.len() as u64 + 1;
        f(LineRef {
            bytes: &part[..content_len.min(self.max_line_bytes)],
            start,
            end,
            truncated_from,
        });
        self.line_start = end;
    }

    /// Hands out the current line, its `'\n'` having just been seen.
    fn finish_line(&mut self, f: &mut impl FnMut(LineRef<'_>)) {
        let content_len = self.pending_total - u64::from(self.last_was_cr);
        let truncated_from = (content_len > self.max_line_bytes as u64).then_some(content_len);
        let mut len = self.pending.len();
        if (len as u64) > content_len {
            // Only the trailing '\r' can make the kept bytes longer than the content.
            len -= 1;
        }
        let start = self.line_start;
        let end = start + self.pending_total + 1;
        f(LineRef {
            bytes: &self.pending[..len],
            start,
            end,
            truncated_from,
        });
        self.line_start = end;
        self.pending_total = 0;
        self.last_was_cr = false;
        self.pending.clear();
        if self.pending.capacity() > KEEP_PENDING_BYTES {
            self.pending = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` to a splitter with `max` and compares (content, start, end, truncated)
    /// of each line, then the committed offset and pending length.
    fn check(
        max: usize,
        chunks: &[&[u8]],
        expected: &[(&[u8], u64, u64, Option<u64>)],
        committed: u64,
        pending: u64,
    ) {
        let mut s = LineSplitter::new(0, max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        let got: Vec<(&[u8], u64, u64, Option<u64>)> = out
            .iter()
            .map(|l| (l.bytes.as_slice(), l.start, l.end, l.truncated_from))
            .collect();
        assert_eq!(got, expected, "chunks {chunks:?}");
        assert_eq!(s.committed_offset(), committed, "committed");
        assert_eq!(s.pending_len(), pending, "pending");
    }

    #[test]
    fn table() {
        check(100, &[b""], &[], 0, 0);
        check(100, &[b"abc"], &[], 0, 3);
        check(100, &[b"abc\n"], &[(b"abc", 0, 4, None)], 4, 0);
        check(100, &[b"ab", b"c\nde"], &[(b"abc", 0, 4, None)], 4, 2);
        check(
            100,
            &[b"a\r\n\nb\n"],
            &[(b"a", 0, 3, None), (b"", 3, 4, None), (b"b", 4, 6, None)],
            6,
            0,
        );
        check(100, &[b"a\r", b"\n"], &[(b"a", 0, 3, None)], 3, 0);
        // A '\r' not at the end stays.
        check(100, &[b"a\rb\n"], &[(b"a\rb", 0, 4, None)], 4, 0);
        // Truncation keeps the first max bytes and reports the original length.
        check(3, &[b"abcdef\n"], &[(b"abc", 0, 7, Some(6))], 7, 0);
        check(
            3,
            &[b"ab", b"cd", b"ef\nxy\n"],
            &[(b"abc", 0, 7, Some(6)), (b"xy", 7, 10, None)],
            10,
            0,
        );
        // Exactly max bytes plus "\r\n" is not truncated.
        check(3, &[b"abc\r\n"], &[(b"abc", 0, 5, None)], 5, 0);
        check(3, &[b"abcd\r\n"], &[(b"abc", 0, 6, Some(4))], 6, 0);
        check(3, &[b"abcd\r", b"\n"], &[(b"abc", 0, 6, Some(4))], 6, 0);
        // A held over-long partial line counts every byte seen.
        check(3, &[b"abcdefgh"], &[], 0, 8);
        check(0, &[b"ab\n"], &[(b"a", 0, 3, Some(2))], 3, 0);
    }

    #[test]
    fn start_offset_is_respected() {
        let mut s = LineSplitter::new(1000, 10);
        let mut out = Vec::new();
        s.push(b"x\ny", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start, out[0].end), (1000, 1002));
        assert_eq!(s.committed_offset(), 1002);
        assert_eq!(s.pending_len(), 1);
    }

    #[test]
    fn five_mib_line_is_truncated_without_holding_it() {
        let mut s = LineSplitter::new(0, 1024 * 1024);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..80 {
            s.push(&chunk, &mut out);
            assert!(s.pending.capacity() <= 2 * 1024 * 1024);
        }
        s.push(b"\n", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes.len(), 1024 * 1024);
        assert_eq!(out[0].truncated_from, Some(5 * 1024 * 1024));
        assert_eq!(out[0].end, 5 * 1024 * 1024 + 1);
    }

    proptest! {
        /// Any bytes, cut into any chunks: every complete line comes out exactly once, in
        /// order, with contiguous offsets, and the rest is pending.
        #[test]
        fn every_complete_line_once(
            data in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..10),
            max in 1usize..20,
        ) {
            let mut s = LineSplitter::new(0, max);
            let mut out = Vec::new();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut prev = 0;
            for c in cuts.into_iter().chain(std::iter::once(data.len())) {
                s.push(&data[prev..c], &mut out);
                prev = c;
            }
            let complete: Vec<&[u8]> = {
                let mut v: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
                v.pop();
                v
            };
            prop_assert_eq!(out.len(), complete.len());
            let mut offset = 0u64;
            for (line, raw) in out.iter().zip(complete) {
                let content = raw.strip_suffix(b"\r").unwrap_or(raw);
                prop_assert_eq!(line.start, offset);
                prop_assert_eq!(line.end, offset + raw.len() as u64 + 1);
                offset = line.end;
                if content.len() > max {
                    prop_assert_eq!(line.truncated_from, Some(content.len() as u64));
                    prop_assert_eq!(&line.bytes[..], &content[..max]);
                } else {
                    prop_assert_eq!(line.truncated_from, None);
                    prop_assert_eq!(&line.bytes[..], content);
                }
            }
            prop_assert_eq!(s.committed_offset(), offset);
            prop_assert_eq!(s.pending_len(), data.len() as u64 - offset);
        }
    }
}
