//! HTTP CONNECT tunnelling through `[apns] proxy`, for hosts that reach the internet only
//! through a forward proxy.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest proxy answer head we read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;

/// Opens a TCP connection to the proxy and asks it for a tunnel to `host:port`;
/// `connected` is called once the proxy took the TCP connection, before CONNECT is asked, so
/// that a timeout can tell a proxy that cannot be reached from one that never answers.
pub(crate) async fn connect(
    proxy: &str,
    host: &str,
    port: u16,
    connected: impl FnOnce(),
) -> io::Result<TcpStream> {
    // Said as the proxy's refusal, not the host's: the pool's line names both.
    let mut stream = TcpStream::connect(proxy).await.map_err(|e| {
        io::Error::new(e.kind(), format!("the proxy itself cannot be reached: {e}"))
    })?;
    stream.set_nodelay(true)?;
    connected();
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Connection: keep-alive\r\nUser-Agent: pushdrop\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read byte by byte up to the end of the head: anything after it belongs to TLS.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("proxy {proxy} closed the connection during CONNECT"),
            ));
        }
        head.push(byte[0]);
        if head.len() > MAX_HEAD {
            return Err(io::Error::other(format!(
                "proxy {proxy} sent an over-long answer to CONNECT"
            )));
        }
    }
    let status_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(&[])).into_owned();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') {
        let hint = if code == "407" {
            " (pushdrop sends no proxy credentials: let the proxy admit this host by its address)"
        } else {
            ""
        };
        return Err(io::Error::other(format!(
            "proxy {proxy} refused CONNECT {target}: {status_line}{hint}"
        )));
    }
    Ok(stream)
}
