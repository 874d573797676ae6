//! The floor under any gRPC router, for `switchyard-bench router`'s `relay` path: a relay that
//! serves `Worker.Serve` and passes every frame on to one worker and back, decoded and
//! re-encoded (what any router that reads the request ids it routes on must do), with no
//! routing, accounting or failover at all. What it costs over `direct` is what terminating two
//! HTTP/2 connections and reading each message costs on this machine; what Switchyard costs
//! over the relay is its routing.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use switchyard_proto::v1;
use switchyard_proto::v1::worker_client::WorkerClient;
use switchyard_proto::v1::worker_server::{Worker, WorkerServer};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Relays `Worker.Serve` streams to one worker.
struct Relay {
    worker: WorkerClient<Channel>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Relay {
    type ServeStream = FrameStream;

    async fn serve(
        &self,
        request: Request<Streaming<v1::RouterFrame>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        // A client's broken stream ends the worker's request stream, as a router's would.
        let upstream = request
            .into_inner()
            .take_while(|frame| std::future::ready(frame.is_ok()))
            .filter_map(|frame| std::future::ready(frame.ok()));
        let frames = self.worker.clone().serve(upstream).await?.into_inner();
        Ok(Response::new(Box::pin(frames)))
    }

    async fn get_tokenizer(
        &self,
        _request: Request<v1::TokenizerRequest>,
    ) -> Result<Response<v1::TokenizerSpec>, Status> {
        Err(Status::unimplemented(
            "the benchmark relay only relays Serve",
        ))
    }
}

/// Starts a relay in front of the worker at `worker` on a free loopback port, with its own
/// connection to the worker; it stops with `shutdown`. Returns its address.
pub async fn spawn(worker: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let upstream = Channel::from_shared(format!("http://{worker}"))?
        .connect()
        .await?;
    let listener = switchyard_cluster::listen::bind("127.0.0.1:0".parse()?)?;
    let incoming = switchyard_cluster::listen::plaintext(listener, Default::default())?;
    let addr = incoming.local_addr();
    let server = tonic::transport::Server::builder().add_service(WorkerServer::new(Relay {
        worker: WorkerClient::new(upstream),
    }));
    tokio::spawn(server.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()));
    Ok(addr)
}
