//! An I/O adapter that reports how many bytes went through it, so a
//! download or an upload can show progress without the code that moves the
//! bytes knowing who listens.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Wraps a reader or writer and calls `report` with the running total of
/// bytes read or written after every successful read or write.
pub struct Counting<T, F> {
    inner: T,
    total: u64,
    report: F,
}

impl<T, F: FnMut(u64)> Counting<T, F> {
    /// `inner`, reporting to `report`.
    pub fn new(inner: T, report: F) -> Self {
        Counting {
            inner,
            total: 0,
            report,
        }
    }

    fn count(&mut self, n: usize) {
        if n > 0 {
            self.total += n as u64;
            (self.report)(self.total);
        }
    }
}

impl<T: std::fmt::Debug, F> std::fmt::Debug for Counting<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counting")
            .field("inner", &self.inner)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl<T: AsyncRead + Unpin, F: FnMut(u64) + Unpin> AsyncRead for Counting<T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let n = buf.filled().len() - before;
            self.count(n);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin, F: FnMut(u64) + Unpin> AsyncWrite for Counting<T, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.count(n);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_report_the_running_total() {
        let data = vec![7u8; 10_000];
        let mut seen = Vec::new();
        let mut reader = Counting::new(&data[..], |n| seen.push(n));
        let mut chunk = [0u8; 4096];
        let mut got = Vec::new();
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(seen, [4096, 8192, 10_000], "end of file reports nothing");
    }

    #[tokio::test]
    async fn writes_report_the_running_total() {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        {
            let mut writer = Counting::new(&mut out, |n| seen.push(n));
            writer.write_all(b"abc").await.unwrap();
            writer.write_all(b"defgh").await.unwrap();
            writer.flush().await.unwrap();
        }
        assert_eq!(out, b"abcdefgh");
        assert_eq!(seen, [3, 8]);
    }
}
