//! Line numbers for error messages, counted on the raw bytes.
//!
//! The `csv` reader accepts `\n`, `\r\n` and a lone `\r` as record terminators and skips
//! blank lines, but the line numbers it reports drift in those cases (a CRLF file is off
//! by one, a CR-only file is all "line 1"). Its byte offsets are exact, but a record's
//! offset is where the reader stood after the previous record's first terminator byte,
//! before the blank lines it skips. [`LineReader`] wraps the input and notes, for every
//! line that is not blank, the byte offset of its first byte and its 1-based number (lines
//! end at `\n`, `\r\n` or a lone `\r`); [`LineIndex::line_of`] gives the line of the first
//! non-blank line starting at or after a record's offset. Offsets are asked in increasing
//! order, so lines already passed are dropped: memory stays bounded by the look-ahead.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::rc::Rc;

#[derive(Debug)]
struct State {
    /// (byte offset of its first byte, line number) of the non-blank lines not yet passed.
    starts: VecDeque<(u64, u64)>,
    /// Number of the line being read.
    line: u64,
    /// Bytes read so far.
    offset: u64,
    /// The next byte starts a line.
    at_start: bool,
    /// The previous byte was `\r` (a following `\n` belongs to the same terminator).
    prev_cr: bool,
}

/// Shared view of the line starts seen by a [`LineReader`].
#[derive(Clone, Debug)]
pub struct LineIndex(Rc<RefCell<State>>);

/// A reader that records where lines start; see the module documentation.
pub struct LineReader<R> {
    inner: R,
    index: LineIndex,
}

impl<R: Read> LineReader<R> {
    /// Wraps `inner`; the returned index answers for the bytes read through the wrapper.
    pub fn new(inner: R) -> (Self, LineIndex) {
        let index = LineIndex(Rc::new(RefCell::new(State {
            starts: VecDeque::new(),
            line: 1,
            offset: 0,
            at_start: true,
            prev_cr: false,
        })));
        (
            Self {
                inner,
                index: index.clone(),
            },
            index,
        )
    }
}

impl<R: Read> Read for LineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self.index.0.borrow_mut();
        for &b in &buf[..n] {
            match b {
                // The `\n` of `\r\n` ends no further line.
                b'\n' if st.prev_cr => {}
                b'\n' | b'\r' => {
                    st.line += 1;
                    st.at_start = true;
                }
                _ if st.at_start => {
                    let (off, line) = (st.offset, st.line);
                    st.starts.push_back((off, line));
                    st.at_start = false;
                }
                _ => {}
            }
            st.prev_cr = b == b'\r';
            st.offset += 1;
        }
        Ok(n)
    }
}

impl LineIndex {
    /// The 1-based line of the first non-blank line that starts at or after byte
    /// `offset` (the line being read if none is left). Offsets must be asked in
    /// non-decreasing order (earlier lines are forgotten).
    pub fn line_of(&self, offset: u64) -> u64 {
        let mut st = self.0.borrow_mut();
        while st.starts.front().is_some_and(|&(o, _)| o < offset) {
            st.starts.pop_front();
        }
        st.starts.front().map_or(st.line, |&(_, l)| l)
    }
}

/// A headerless-or-not CSV reader over `reader` with exact line numbers.
pub(crate) fn csv_reader<R: Read>(
    reader: R,
    has_headers: bool,
) -> (csv::Reader<LineReader<R>>, LineIndex) {
    let (r, index) = LineReader::new(reader);
    let rdr = csv::ReaderBuilder::new()
        .has_headers(has_headers)
        .flexible(true)
        .buffer_capacity(1 << 16)
        .from_reader(r);
    (rdr, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(text: &str) -> Vec<(String, u64)> {
        let (mut rdr, idx) = csv_reader(text.as_bytes(), false);
        let mut out = Vec::new();
        let mut rec = csv::StringRecord::new();
        while rdr.read_record(&mut rec).unwrap() {
            let byte = rec.position().unwrap().byte();
            out.push((rec[0].to_string(), idx.line_of(byte)));
        }
        out
    }

    #[test]
    fn every_terminator_and_blank_lines() {
        let want = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(s, l)| (s.to_string(), *l))
                .collect::<Vec<_>>()
        };
        assert_eq!(lines_of("a\nb\nc\n"), want(&[("a", 1), ("b", 2), ("c", 3)]));
        assert_eq!(
            lines_of("a\r\nb\r\nc\r\n"),
            want(&[("a", 1), ("b", 2), ("c", 3)])
        );
        assert_eq!(lines_of("a\rb\rc"), want(&[("a", 1), ("b", 2), ("c", 3)]));
        assert_eq!(
            lines_of("a\n\nb\n\n\nc\n"),
            want(&[("a", 1), ("b", 3), ("c", 6)])
        );
        assert_eq!(
            lines_of("a\r\n\r\nb\r\r\nc"),
            want(&[("a", 1), ("b", 3), ("c", 5)])
        );
        // A quoted field spanning lines: the next record is on the line after it.
        assert_eq!(lines_of("\"a\nx\"\nb\n"), want(&[("a\nx", 1), ("b", 3)]));
    }

    #[test]
    fn long_input_in_small_reads() {
        let text: String = (0..20_000).map(|i| format!("r{i}\r\n")).collect();
        let got = lines_of(&text);
        assert_eq!(got.len(), 20_000);
        assert!(got.iter().enumerate().all(|(i, (_, l))| *l == i as u64 + 1));
    }
}
