//! Splitting bytes into lines. (Interim version; replaced by the parse work.)

pub struct Line {
    pub bytes: Vec<u8>,
    pub start: u64,
    pub end: u64,
    pub truncated_from: Option<u64>,
}

pub struct LineSplitter {
    offset: u64,
    pending: Vec<u8>,
    pending_len: u64,
    max: usize,
}

impl LineSplitter {
    pub fn new(start_offset: u64, max_line_bytes: usize) -> Self {
        LineSplitter {
            offset: start_offset,
            pending: Vec::new(),
            pending_len: 0,
            max: max_line_bytes,
        }
    }
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Line>) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let part = &rest[..i];
            let room = self.max.saturating_sub(self.pending.len());
            self.pending
                .extend_from_slice(&part[..part.len().min(room)]);
            let total = self.pending_len + part.len() as u64;
            let start = self.offset;
            let end = start + total + 1;
            let mut bytes = std::mem::take(&mut self.pending);
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            out.push(Line {
                bytes,
                start,
                end,
                truncated_from: (total as usize > self.max).then_some(total),
            });
            self.offset = end;
            self.pending_len = 0;
            rest = &rest[i + 1..];
        }
        let room = self.max.saturating_sub(self.pending.len());
        self.pending
            .extend_from_slice(&rest[..rest.len().min(room)]);
        self.pending_len += rest.len() as u64;
    }
    pub fn committed_offset(&self) -> u64 {
        self.offset
    }
    pub fn pending_len(&self) -> u64 {
        self.pending_len
    }
}
