//! "One stream until the first authorised request", said the way APNs says it: in SETTINGS.
//!
//! The `h2` server announces its SETTINGS_MAX_CONCURRENT_STREAMS once, in its preface, and
//! has no way to change it later. [`LimitIo`] sits between `h2` and the TLS stream and edits
//! the bytes: it lowers the preface's limit to 1, and once the connection has authorised a
//! request it slips a SETTINGS frame raising the limit back into the outgoing frames (at a
//! frame boundary), and removes the client's ACK of that frame from the incoming ones, as
//! `h2` would take an ACK it did not ask for as a protocol error. `h2` itself keeps counting
//! against the full limit; the REFUSED_STREAM check in the server stays behind it for a
//! client that ignores SETTINGS.
//!
//! Once the raise has gone out and its ACK has been taken, the wrapper only forwards.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface, which comes before its first frame.
const CLIENT_PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// Set by the stream that authorised the connection's first request, before its answer is
/// handed to `h2`: the raise then goes out ahead of that answer.
#[derive(Default)]
pub(super) struct Raise(AtomicBool);

impl Raise {
    pub fn now(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn due(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Where a byte stream stands between frames.
#[derive(Default)]
struct Frames {
    head: [u8; FRAME_HEADER_LEN],
    head_len: usize,
    /// Payload bytes of the current frame not yet seen.
    left: usize,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.left == 0
    }

    /// Takes header bytes from `buf`; the complete header, once it is.
    fn take_head(&mut self, buf: &mut &[u8]) -> Option<[u8; FRAME_HEADER_LEN]> {
        let n = (FRAME_HEADER_LEN - self.head_len).min(buf.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&buf[..n]);
        self.head_len += n;
        *buf = &buf[n..];
        if self.head_len < FRAME_HEADER_LEN {
            return None;
        }
        self.head_len = 0;
        self.left = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
        Some(self.head)
    }
}

fn is_settings(head: &[u8; FRAME_HEADER_LEN]) -> bool {
    head[3] == SETTINGS
}

fn is_ack(head: &[u8; FRAME_HEADER_LEN]) -> bool {
    head[4] & ACK != 0
}

/// The editing state, dropped once there is nothing left to edit.
struct Editor {
    raise: Arc<Raise>,
    /// The limit the raise announces.
    max: u32,
    out: Frames,
    /// SETTINGS frames (not ACKs) written so far.
    settings_sent: u32,
    /// Inside the preface's SETTINGS payload: the offset in it, and the id of the entry.
    patching: Option<(usize, u16)>,
    raised: bool,
    /// Bytes going out, edited, not yet taken by the TLS stream.
    pending_out: Vec<u8>,
    pending_out_at: usize,
    preface_left: usize,
    inc: Frames,
    acks_seen: u32,
    /// The ACK (counted from 1) that answers the raise.
    swallow: Option<u32>,
    swallowed: bool,
    /// Bytes come in, edited, not yet read by `h2`.
    pending_in: Vec<u8>,
    pending_in_at: usize,
}

impl Editor {
    fn new(raise: Arc<Raise>, max: u32) -> Self {
        Editor {
            raise,
            max,
            out: Frames::default(),
            settings_sent: 0,
            patching: None,
            raised: false,
            pending_out: Vec::new(),
            pending_out_at: 0,
            preface_left: CLIENT_PREFACE_LEN,
            inc: Frames::default(),
            acks_seen: 0,
            swallow: None,
            swallowed: false,
            pending_in: Vec::new(),
            pending_in_at: 0,
        }
    }

    /// Edits `buf` into `pending_out`.
    fn write(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.out.at_boundary() && !self.raised && self.raise.due() {
                self.raised = true;
                self.swallow = Some(self.settings_sent + 1);
                self.pending_out
                    .extend_from_slice(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0]);
                self.pending_out
                    .extend_from_slice(&MAX_CONCURRENT_STREAMS.to_be_bytes());
                self.pending_out.extend_from_slice(&self.max.to_be_bytes());
            }
            if self.out.left == 0 {
                if let Some(head) = self.out.take_head(&mut buf) {
                    self.pending_out.extend_from_slice(&head);
                    if is_settings(&head) && !is_ack(&head) {
                        self.settings_sent += 1;
                        if self.settings_sent == 1 && self.out.left > 0 {
                            self.patching = Some((0, 0));
                        }
                    }
                }
                continue;
            }
            let n = self.out.left.min(buf.len());
            match &mut self.patching {
                None => self.pending_out.extend_from_slice(&buf[..n]),
                Some((at, id)) => {
                    for &b in &buf[..n] {
                        let o = *at % 6;
                        let b = match o {
                            0 => {
                                *id = u16::from(b) << 8;
                                b
                            }
                            1 => {
                                *id |= u16::from(b);
                                b
                            }
                            _ if *id == MAX_CONCURRENT_STREAMS => 1u32.to_be_bytes()[o - 2],
                            _ => b,
                        };
                        self.pending_out.push(b);
                        *at += 1;
                    }
                }
            }
            self.out.left -= n;
            buf = &buf[n..];
            if self.out.left == 0 {
                self.patching = None;
            }
        }
    }

    /// Edits bytes read from the client into `pending_in`.
    fn read(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(buf.len());
                self.pending_in.extend_from_slice(&buf[..n]);
                self.preface_left -= n;
                buf = &buf[n..];
                continue;
            }
            if self.inc.left == 0 {
                if let Some(head) = self.inc.take_head(&mut buf) {
                    if is_settings(&head) && is_ack(&head) {
                        self.acks_seen += 1;
                        if self.swallow == Some(self.acks_seen) {
                            self.swallowed = true;
                            continue;
                        }
                    }
                    self.pending_in.extend_from_slice(&head);
                }
                continue;
            }
            let n = self.inc.left.min(buf.len());
            self.pending_in.extend_from_slice(&buf[..n]);
            self.inc.left -= n;
            buf = &buf[n..];
        }
    }

    fn writing_done(&self) -> bool {
        self.raised && self.out.at_boundary() && self.pending_out_at == self.pending_out.len()
    }

    fn reading_done(&self) -> bool {
        self.swallowed && self.inc.head_len == 0 && self.pending_in_at == self.pending_in.len()
    }
}

/// The simulator's TLS stream, with the stream limit edited in while `streams_one_until_authorized`
/// holds for the connection (see the module's comment), or as is.
pub(super) struct LimitIo<T> {
    inner: T,
    editor: Option<Box<Editor>>,
    /// Decided at the start and kept, as `h2` asks once.
    vectored: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> LimitIo<T> {
    /// `raise` is `None` when the connection's limit is announced as is.
    pub fn new(inner: T, raise: Option<Arc<Raise>>, max: u32) -> Self {
        let editor = raise.map(|raise| Box::new(Editor::new(raise, max)));
        let vectored = editor.is_none() && inner.is_write_vectored();
        LimitIo {
            inner,
            editor,
            vectored,
        }
    }

    /// Hands edited bytes waiting to go out to the TLS stream.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(ed) = self.editor.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while ed.pending_out_at < ed.pending_out.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &ed.pending_out[ed.pending_out_at..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            ed.pending_out_at += n;
        }
        ed.pending_out.clear();
        ed.pending_out_at = 0;
        if ed.writing_done() && ed.reading_done() {
            self.editor = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for LimitIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(ed) = this.editor.as_mut() else {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            if ed.pending_in_at < ed.pending_in.len() {
                let n = (ed.pending_in.len() - ed.pending_in_at).min(buf.remaining());
                buf.put_slice(&ed.pending_in[ed.pending_in_at..ed.pending_in_at + n]);
                ed.pending_in_at += n;
                if ed.pending_in_at == ed.pending_in.len() {
                    ed.pending_in.clear();
                    ed.pending_in_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if ed.swallowed && ed.inc.head_len == 0 {
                // Nothing left to edit coming in: from here on, `h2` reads directly. (Not
                // while part of a frame header read with the ACK waits here for its rest:
                // `h2` would never see those bytes.)
                if ed.writing_done() {
                    this.editor = None;
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8 * 1024];
            let mut raw = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            ed.read(raw.filled());
            // A chunk that was only the swallowed ACK gives nothing: read on.
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LimitIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        match this.editor.as_mut() {
            Some(ed) if !ed.writing_done() => {
                ed.write(buf);
                // Taken: what the TLS stream does not take now goes at the next write or
                // flush, which `h2` always asks for.
                let _ = this.drain(cx)?;
                Poll::Ready(Ok(buf.len()))
            }
            _ => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.editor.is_none() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => Pin::new(this).poll_write(cx, b),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)], flags: u8) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![0, 0, len as u8, SETTINGS, flags, 0, 0, 0, 0];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    fn frame(kind: u8, stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0, payload.len() as u8, kind, 0, 0, 0, 0, stream];
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in pieces of `step`, as TLS records may cut them anywhere.
    fn write_in(ed: &mut Editor, bytes: &[u8], step: usize) -> Vec<u8> {
        for piece in bytes.chunks(step) {
            ed.write(piece);
        }
        std::mem::take(&mut ed.pending_out)
    }

    fn read_in(ed: &mut Editor, bytes: &[u8], step: usize) -> Vec<u8> {
        for piece in bytes.chunks(step) {
            ed.read(piece);
        }
        std::mem::take(&mut ed.pending_in)
    }

    const HEADERS: u8 = 0x1;
    const PING: u8 = 0x6;

    #[test]
    fn the_prefaces_limit_goes_out_as_one_and_the_raise_before_the_next_frame() {
        for step in [1, 5, 1000] {
            let raise = Arc::new(Raise::default());
            let mut ed = Editor::new(raise.clone(), 1000);
            let preface = settings(
                &[(1, 4096), (MAX_CONCURRENT_STREAMS, 1000), (4, 1 << 20)],
                0,
            );
            let want = settings(&[(1, 4096), (MAX_CONCURRENT_STREAMS, 1), (4, 1 << 20)], 0);
            assert_eq!(write_in(&mut ed, &preface, step), want, "step {step}");
            // An ACK of the client's SETTINGS is no SETTINGS of ours, and is not edited.
            let ack = settings(&[], ACK);
            assert_eq!(write_in(&mut ed, &ack, step), ack);
            // Raised in the middle of a frame: the raise waits for its end.
            let answer = frame(HEADERS, 1, b"0123456789");
            ed.write(&answer[..12]);
            raise.now();
            let mut want = answer.clone();
            want.extend(settings(&[(MAX_CONCURRENT_STREAMS, 1000)], 0));
            let second = frame(HEADERS, 3, b"abc");
            want.extend(&second);
            let mut rest = answer[12..].to_vec();
            rest.extend(&second);
            ed.write(&[]);
            let mut got = std::mem::take(&mut ed.pending_out);
            got.extend(write_in(&mut ed, &rest, step));
            assert_eq!(got, want, "step {step}");
            // Once only.
            assert_eq!(write_in(&mut ed, &second, step), second);
        }
    }

    /// A TLS record may end inside the frame header after the swallowed ACK: those bytes,
    /// held until the header is whole, still reach `h2` when the wrapper stops editing.
    /// (Lost, they made the next frame's header garbage: `h2` answered FRAME_SIZE_ERROR.)
    #[tokio::test]
    async fn a_frame_header_cut_after_the_swallowed_ack_reaches_h2_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut client) = tokio::io::duplex(1 << 16);
        let raise = Arc::new(Raise::default());
        let mut io = LimitIo::new(ours, Some(raise.clone()), 1000);
        io.write_all(&settings(&[(MAX_CONCURRENT_STREAMS, 1000)], 0))
            .await
            .unwrap();
        raise.now();
        io.write_all(&frame(HEADERS, 1, b"x")).await.unwrap();
        io.flush().await.unwrap();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let client_settings = settings(&[(2, 0)], 0);
        let ack = settings(&[], ACK);
        let headers = frame(HEADERS, 3, b"abc");
        let first = [&preface[..], &client_settings, &ack, &ack, &headers[..4]].concat();
        let before_cut = [&preface[..], &client_settings, &ack].concat();
        client.write_all(&first).await.unwrap();
        let mut got: Vec<u8> = Vec::new();
        while got.len() < before_cut.len() {
            let mut b = [0u8; 64];
            let n = io.read(&mut b).await.unwrap();
            got.extend(&b[..n]);
        }
        assert_eq!(got, before_cut);
        client.write_all(&headers[4..]).await.unwrap();
        let mut rest = vec![0u8; headers.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut rest))
            .await
            .expect("the whole frame arrives")
            .unwrap();
        assert_eq!(rest, headers);
    }

    #[test]
    fn the_clients_ack_of_the_raise_is_taken_out_and_nothing_else() {
        for step in [1, 7, 1000] {
            let raise = Arc::new(Raise::default());
            let mut ed = Editor::new(raise.clone(), 1000);
            write_in(
                &mut ed,
                &settings(&[(MAX_CONCURRENT_STREAMS, 1000)], 0),
                1000,
            );
            raise.now();
            write_in(&mut ed, &frame(HEADERS, 1, b"x"), 1000);
            assert_eq!(ed.swallow, Some(2));
            let mut incoming = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let client_settings = settings(&[(2, 0)], 0);
            let ack = settings(&[], ACK);
            // A PING whose payload looks like an ACK header is a payload, not a frame.
            let ping = frame(PING, 0, &[0, 0, 0, SETTINGS, ACK, 0, 0, 0]);
            for part in [&client_settings, &ack, &ping, &ack, &ping] {
                incoming.extend(part.iter());
            }
            let mut want = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            for part in [&client_settings, &ack, &ping, &ping] {
                want.extend(part.iter());
            }
            assert_eq!(read_in(&mut ed, &incoming, step), want, "step {step}");
            assert!(ed.swallowed);
        }
    }
}
