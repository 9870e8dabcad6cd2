//! A child's output pipe read as lines, a line longer than [`MAX_LINE`] in pieces, so that a
//! script printing without newlines cannot make us buffer without limit.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::MAX_LINE;

/// Reads a pipe in lines of at most [`MAX_LINE`] bytes.
pub(super) struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
}

/// One line, or one piece of a longer line.
pub(super) struct Chunk<'a> {
    pub(super) bytes: &'a [u8],
    /// A later piece of a split line.
    pub(super) continuation: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(super) fn new(pipe: R) -> Self {
        LineReader {
            reader: BufReader::with_capacity(MAX_LINE, pipe),
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at EOF.
    pub(super) async fn next(&mut self, continuation: &mut bool) -> io::Result<Option<Chunk<'_>>> {
        loop {
            self.buf.clear();
            let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let complete = self.buf.last() == Some(&b'\n');
            if complete {
                self.buf.pop();
            }
            let this_continues = *continuation;
            *continuation = !complete;
            // The newline right after a piece of exactly MAX_LINE bytes is not an extra empty line.
            if this_continues && complete && self.buf.is_empty() {
                continue;
            }
            return Ok(Some(Chunk {
                bytes: &self.buf,
                continuation: this_continues,
            }));
        }
    }
}
