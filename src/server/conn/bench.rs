//! One HTTP/3 request at a time over two in-memory quiche connections, for the benches
//! (`benches/`, through `crate::__bench`): a [`ServerApp`] serving a small service on one
//! end, a quiche HTTP/3 client on the other, packets handed across in memory. What it times
//! is this crate's server path and quiche's, without sockets, timers or other tasks.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use quiche::h3;
use tokio::sync::mpsc;

use super::ServerApp;
use crate::h3::body::RecvBody;
use crate::quic::Application;
use crate::server::{Builder, ConnectionInfo};
use crate::testing::{self, Pipe};

/// Answers every request with the number of body bytes it read, as text.
#[derive(Clone)]
struct CountBody;

impl tower_service::Service<Request<RecvBody>> for CountBody {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RecvBody>) -> Self::Future {
        Box::pin(async move {
            let mut body = request.into_body();
            let mut read = 0;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
            }
            Ok(Response::new(Full::new(Bytes::from(read.to_string()))))
        })
    }
}

/// A server connection and a client connection over an in-memory pipe, ready for requests.
pub(crate) struct InMemory {
    pipe: Pipe,
    app: ServerApp<CountBody>,
    client: h3::Connection,
    _alive: mpsc::Receiver<()>,
}

impl InMemory {
    /// Must be called inside a tokio runtime: the server's timers are tokio's.
    pub(crate) fn new() -> InMemory {
        let settings = Builder::new().settings().expect("default settings");
        let mut pipe = Pipe::handshaken(
            &testing::server_config("h3", |t| t),
            &testing::client_config("h3", |t| t),
        );
        let (alive, alive_rx) = mpsc::channel(1);
        let info = ConnectionInfo {
            remote_addr: testing::CLIENT_ADDR.parse().expect("literal address"),
            local_addr: testing::SERVER_ADDR.parse().expect("literal address"),
            version: http::Version::HTTP_3,
        };
        let mut app = ServerApp::new(CountBody, settings, info, Box::pin(std::future::pending()), alive);
        app.on_established(&mut pipe.server).expect("HTTP/3 starts");
        let client = h3::Connection::with_transport(&mut pipe.client, &h3::Config::new().expect("h3 config"))
            .expect("the client's HTTP/3");
        InMemory {
            pipe,
            app,
            client,
            _alive: alive_rx,
        }
    }

    /// Sends a request (a GET without `body`, a POST with it), turns both ends until its
    /// response has arrived whole, and returns the response body's length.
    pub(crate) fn request(&mut self, body: &[u8]) -> usize {
        let method: &[u8] = if body.is_empty() { b"GET" } else { b"POST" };
        let head = [
            h3::Header::new(b":method", method),
            h3::Header::new(b":scheme", b"https"),
            h3::Header::new(b":authority", b"localhost"),
            h3::Header::new(b":path", b"/count"),
        ];
        let id = self
            .client
            .send_request(&mut self.pipe.client, &head, body.is_empty())
            .expect("a request stream");
        let mut sent = 0;
        let mut received = 0;
        let mut buf = vec![0; 64 * 1024];
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..1_000_000 {
            if sent < body.len() {
                match self.client.send_body(&mut self.pipe.client, id, &body[sent..], true) {
                    Ok(n) => sent += n,
                    Err(h3::Error::Done) => {}
                    Err(e) => panic!("the request body was refused: {e}"),
                }
            }
            self.app
                .process(&mut cx, &mut self.pipe.server)
                .expect("the server goes on");
            self.pipe.flush();
            loop {
                match self.client.poll(&mut self.pipe.client) {
                    Ok((stream, h3::Event::Data)) => {
                        while let Ok(n) = self.client.recv_body(&mut self.pipe.client, stream, &mut buf) {
                            received += n;
                        }
                    }
                    Ok((stream, h3::Event::Finished)) if stream == id => return received,
                    Ok(_) => {}
                    Err(h3::Error::Done) => break,
                    Err(e) => panic!("the client failed: {e}"),
                }
            }
        }
        panic!("the response did not arrive");
    }
}
