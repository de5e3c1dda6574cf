//! A byte stream (tokio `AsyncRead + AsyncWrite`) over a message stream: WebSocket binary messages, or the
//! frames of a gRPC stream. HTTP/2 then runs over it as over a socket.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

type BoxStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
type BoxSink = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

/// Reads are the concatenated incoming messages; each write becomes one outgoing message.
pub struct MessageIo {
    incoming: BoxStream,
    outgoing: BoxSink,
    pending: Bytes,
}

impl MessageIo {
    pub fn new(
        incoming: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        outgoing: impl Sink<Bytes, Error = io::Error> + Send + 'static,
    ) -> Self {
        Self {
            incoming: Box::pin(incoming),
            outgoing: Box::pin(outgoing),
            pending: Bytes::new(),
        }
    }

    /// Binary WebSocket messages both ways. Pings are answered by tungstenite; a close ends the stream.
    pub fn websocket<S>(ws: WebSocketStream<S>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let incoming = stream
            .take_while(|msg| std::future::ready(!matches!(msg, Ok(Message::Close(_)))))
            .filter_map(|msg| {
                std::future::ready(match msg {
                    Ok(Message::Binary(data)) => Some(Ok(data)),
                    Ok(Message::Text(_)) => Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message on a binary tunnel",
                    ))),
                    Ok(_) => None,
                    Err(e) => Some(Err(io::Error::other(e))),
                })
            });
        let outgoing = sink
            .sink_map_err(io::Error::other)
            .with(|data: Bytes| std::future::ready(Ok(Message::Binary(data))));
        Self::new(incoming, outgoing)
    }
}

impl AsyncRead for MessageIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.incoming.as_mut().poll_next(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MessageIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.outgoing.as_mut().poll_ready(cx))?;
        self.outgoing
            .as_mut()
            .start_send(Bytes::copy_from_slice(buf))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outgoing.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outgoing.as_mut().poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_cross_in_order_across_message_boundaries() {
        let (to_b, from_a) = mpsc::channel::<Bytes>(4);
        let (to_a, from_b) = mpsc::channel::<Bytes>(4);
        let mut a = MessageIo::new(from_b.map(Ok), to_b.sink_map_err(io::Error::other));
        let mut b = MessageIo::new(from_a.map(Ok), to_a.sink_map_err(io::Error::other));
        a.write_all(b"hello ").await.unwrap();
        a.write_all(b"world").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = String::new();
        b.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }
}
