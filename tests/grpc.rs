//! gRPC over HTTP/3: a tonic server served by tower-quiche, called by tonic's generated
//! client on top of tower-quiche's `Client`.

mod support;

#[path = "../examples/grpc/service.rs"]
mod service;

use futures_util::StreamExt;
use service::{Count, GreeterClient, GreeterServer, HelloRequest, MyGreeter};
use support::*;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_streaming_both_ways_and_an_error_status() {
    init_tracing();
    let certs = certs();
    let listener = support::h3::listener(&certs).await;
    let port = listener.local_addr().port();
    tokio::spawn(tower_quiche::server::serve(listener, GreeterServer::new(MyGreeter)).into_future());
    let client = support::h3::client(&certs);
    let origin: http::Uri = format!("https://localhost:{port}").parse().unwrap();
    let run = async {
        // The pooled Client serves tonic as is; service::calls below uses client.origin().
        let mut greeter = GreeterClient::with_origin(client.clone(), origin.clone());
        let reply = greeter
            .say_hello(HelloRequest { name: "test".into() })
            .await
            .expect("unary");
        assert_eq!(reply.into_inner().message, "hello, test, over HTTP/3");

        let mut stream = greeter
            .count_down(Count { value: 50 })
            .await
            .expect("server streaming")
            .into_inner();
        let mut values = Vec::new();
        while let Some(count) = stream.next().await {
            values.push(count.expect("stream item").value);
        }
        assert_eq!(values, (1..=50).rev().collect::<Vec<_>>());

        let numbers = futures_util::stream::iter((1..=1000).map(|value| Count { value }));
        assert_eq!(
            greeter.sum(numbers).await.expect("client streaming").into_inner().value,
            500_500
        );

        let status = greeter
            .say_hello(HelloRequest { name: String::new() })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "grpc-status from the trailers"
        );
        assert_eq!(status.message(), "name is empty");

        // The example's own sequence of calls.
        let lines = service::calls(client, origin).await.expect("calls");
        assert_eq!(lines.len(), 4);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}
