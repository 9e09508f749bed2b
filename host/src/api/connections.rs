//! A cap on the connections each API server holds open
//! (`--max-connections`).
//!
//! Every open connection costs the host its buffers and tasks (tens of KiB
//! over HTTP/1.1), whatever it sends: the in-flight limit bounds the
//! commands, not the sockets. So each server accepts a connection only
//! with a permit, and the permit lives as long as the connection. Past the
//! cap the server stops accepting; new connections wait in the kernel's
//! accept queue, which costs the host nothing, and are taken as others
//! close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A TCP listener that holds at most `max` connections open at once.
pub struct LimitedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl LimitedListener {
    /// Caps `listener` at `max` open connections (at least one).
    pub fn new(listener: TcpListener, max: usize) -> Self {
        LimitedListener {
            listener,
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// Waits for room, then for a connection. Accept errors (a full file
    /// table, a connection reset before it was taken) are logged and the
    /// accept retried after a pause, as a server must not stop over them.
    pub async fn accept_limited(&mut self) -> (LimitedStream, SocketAddr) {
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed; if it were, serve unlimited
            // rather than not at all.
            Err(_) => Arc::new(Semaphore::new(1))
                .acquire_owned()
                .await
                .unwrap_or_else(|_| unreachable!("a fresh semaphore has a permit")),
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The connections that may still be opened before the cap.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.accept_limited().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that gives its permit back when it closes.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for LimitedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener` as a stream, for tonic: a task accepts
/// them (within the cap) and hands them over one at a time; it ends when
/// the server drops the stream.
pub fn incoming(
    mut listener: LimitedListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<LimitedStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept_limited() => accepted,
                _ = tx.closed() => return,
            };
            if tx.send(Ok(stream)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the cap a connection is not accepted until another closes.
    #[tokio::test]
    async fn a_connection_past_the_cap_waits_for_one_to_close() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut listener = LimitedListener::new(tcp, 2);
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        let c3 = TcpStream::connect(addr)
            .await
            .expect("connect (kernel queue)");
        let (s1, _) = listener.accept_limited().await;
        let (_s2, _) = listener.accept_limited().await;
        assert_eq!(listener.available(), 0);
        let mut third = Box::pin(listener.accept_limited());
        let pending = std::future::poll_fn(|cx| {
            Poll::Ready(std::future::Future::poll(third.as_mut(), cx).is_pending())
        })
        .await;
        assert!(pending, "the third waits for room");
        drop(s1);
        let (_s3, from) = third.await;
        assert_eq!(from, c3.local_addr().expect("addr"));
    }
}
