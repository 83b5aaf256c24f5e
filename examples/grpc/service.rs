//! A tonic service and its calls, over HTTP/3: shared by `examples/grpc` and `tests/grpc.rs`.
//!
//! The service, as protobuf would describe it:
//!
//! ```proto
//! package tower_quiche.example;
//! service Greeter {
//!   rpc SayHello (HelloRequest) returns (HelloReply);        // unary; empty name -> INVALID_ARGUMENT
//!   rpc CountDown (Count) returns (stream Count);            // server streaming: n, n-1, ..., 1
//!   rpc Sum (stream Count) returns (Count);                  // client streaming
//! }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! message Count { int64 value = 1; }
//! ```

#![allow(dead_code)]

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Count {
    #[prost(int64, tag = "1")]
    pub value: i64,
}

/// tonic's generated client and server, whose message types are `super::...`.
mod generated {
    pub use super::{Count, HelloReply, HelloRequest};
    include!("generated.rs");
}

pub use generated::greeter_client::GreeterClient;
pub use generated::greeter_server::{Greeter, GreeterServer};

/// The service's implementation.
#[derive(Debug, Default)]
pub struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("hello, {name}, over HTTP/3"),
        }))
    }

    type CountDownStream = Pin<Box<dyn Stream<Item = Result<Count, Status>> + Send + 'static>>;

    async fn count_down(&self, request: Request<Count>) -> Result<Response<Self::CountDownStream>, Status> {
        let from = request.into_inner().value.clamp(0, 1000);
        let stream = futures_util::stream::iter((1..=from).rev().map(|value| Ok(Count { value })));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sum(&self, request: Request<Streaming<Count>>) -> Result<Response<Count>, Status> {
        let mut stream = request.into_inner();
        let mut total = 0;
        while let Some(count) = stream.next().await {
            total += count?.value;
        }
        Ok(Response::new(Count { value: total }))
    }
}

/// The four calls, each one's result as a line of text. The generated client runs on a
/// [`tower_quiche::client::OriginClient`], whose readiness tonic waits on.
pub async fn calls(client: tower_quiche::client::Client, origin: http::Uri) -> Result<Vec<String>, Status> {
    let service = client
        .origin(origin.to_string())
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut greeter = GreeterClient::with_origin(service, origin);
    let mut lines = Vec::new();
    let reply = greeter.say_hello(HelloRequest { name: "tonic".into() }).await?;
    lines.push(format!("unary SayHello: {}", reply.into_inner().message));
    let mut stream = greeter.count_down(Count { value: 5 }).await?.into_inner();
    let mut values = Vec::new();
    while let Some(count) = stream.next().await {
        values.push(count?.value);
    }
    lines.push(format!("server streaming CountDown(5): {values:?}"));
    let numbers = futures_util::stream::iter((1..=100).map(|value| Count { value }));
    let sum = greeter.sum(numbers).await?.into_inner().value;
    lines.push(format!("client streaming Sum(1..=100): {sum}"));
    let error = greeter
        .say_hello(HelloRequest { name: String::new() })
        .await
        .expect_err("an empty name is refused");
    lines.push(format!("error status: {:?} \"{}\"", error.code(), error.message()));
    Ok(lines)
}
