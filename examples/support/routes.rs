//! The route contract every test server serves (`ROUTES.md` in the shared folder):
//! `/hello`, `/bytes/{n}`, `/echo`, `/sink`, `/trailers`, `/slow`, and 404 for the rest;
//! and `/ws`, a WebSocket echo over HTTP/3, HTTP/2 and HTTP/1.1.

#![allow(dead_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::{Frame, SizeHint};

/// The bytes `/bytes/{n}` repeats: one static 64 KiB chunk, sent without copying.
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

pub fn router() -> Router {
    Router::new()
        .route(
            "/hello",
            get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "hello world") }),
        )
        .route("/bytes/{n}", get(bytes))
        .route("/echo", post(|body: Body| async move { Response::new(body) }))
        .route("/sink", post(sink))
        .route("/trailers", get(trailers))
        .route("/slow", get(slow))
        .route("/ws", websocket_echo())
}

/// `/ws`: a WebSocket echo (text and binary messages come back as they went, pings are
/// answered, a close is answered with a close) over every protocol: HTTP/3 and HTTP/2 by
/// extended CONNECT (`:protocol websocket`), HTTP/1.1 by `Upgrade: websocket`. One
/// handler, through `tower_quiche::ws::WebSocketUpgrade`.
pub fn websocket_echo() -> axum::routing::MethodRouter {
    axum::routing::any(|ws: tower_quiche::ws::WebSocketUpgrade| async move { ws.on_upgrade(echo_messages) })
}

/// Echoes a WebSocket's text and binary messages until it ends.
pub async fn echo_messages(mut ws: tower_quiche::ws::WebSocket) {
    use futures_util::SinkExt;
    use tower_quiche::ws::Message;
    // tungstenite answers pings and the client's close itself, as it reads on: read until
    // the end, so that the answer to a close goes out. Messages are at most 1 MiB (the
    // extractor's default), which bounds what one WebSocket makes the server hold.
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Text(_) | Message::Binary(_)) && ws.send(message).await.is_err() {
            break;
        }
    }
}

/// `n` bytes in 64 KiB chunks, with an exact size hint (so a content-length).
struct Repeat {
    remaining: u64,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

async fn bytes(Path(n): Path<u64>) -> Response {
    if n > 1 << 30 {
        return (StatusCode::BAD_REQUEST, "n is at most 1 GiB").into_response();
    }
    Response::new(Body::new(Repeat { remaining: n }))
}

async fn sink(body: Body) -> Result<String, StatusCode> {
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    while let Some(chunk) = stream.next().await {
        total += chunk.map_err(|_| StatusCode::BAD_REQUEST)?.len() as u64;
    }
    Ok(total.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn trailers() -> Response {
    let body = Bytes::from_static(b"a short body, then trailers\n");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("yes"));
    trailers.insert(
        "x-body-sha256",
        HeaderValue::from_str(&hex(&boring::sha::sha256(&body))).expect("hex is ASCII"),
    );
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(body)), Ok(Frame::trailers(trailers))]);
    Response::new(Body::new(http_body_util::StreamBody::new(frames)))
}

async fn slow() -> Response {
    let ticks = futures_util::stream::unfold(0u8, |sent| async move {
        if sent == 20 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"0123456789"))),
            sent + 1,
        ))
    });
    Response::new(Body::new(http_body_util::StreamBody::new(ticks)))
}
