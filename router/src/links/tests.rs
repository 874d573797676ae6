use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use switchyard_cluster::{Capacity, Pool, WorkerState as RecordState};
use switchyard_proto::v1::{self, router_frame, worker_frame};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::link::COMMAND_CAPACITY;
use super::state::{Charge, InTransit, LinkState, Starts};
use super::task::{LinkTask, OUTBOUND_CAPACITY, Outbound, RECONNECT};
use super::*;

/// Longest any step may take before a test fails (a debug build on a busy machine).
const PATIENCE: Duration = Duration::from_secs(30);
/// How often tests look at a link's state.
const POLL: Duration = Duration::from_millis(5);

#[test]
fn in_transit_counts_the_starts_no_report_has_seen() {
    let mut t = InTransit::default();
    for (prompt_tokens, latency_critical) in [(10, true), (20, false), (30, true)] {
        t.sent(Charge {
            prompt_tokens,
            latency_critical,
        });
    }
    assert_eq!((t.total().count, t.total().prompt_tokens), (3, 60));
    assert_eq!(t.total().latency_critical_prompt_tokens, 40);
    // The worker had taken the first start: the other two are still on their way.
    t.reported(Some(1));
    assert_eq!((t.total().count, t.total().prompt_tokens), (2, 50));
    assert_eq!(t.total().latency_critical_prompt_tokens, 30);
    // A report older than one already applied changes nothing.
    t.reported(Some(0));
    assert_eq!((t.total().count, t.total().prompt_tokens), (2, 50));
    t.reported(Some(3));
    assert_eq!(t.total(), Starts::default());
    // A worker that does not count starts: what was sent is assumed counted.
    t.sent(Charge {
        prompt_tokens: 5,
        latency_critical: true,
    });
    t.reported(None);
    assert_eq!(t.total(), Starts::default());
}

#[test]
fn reconnection_backs_off_exponentially_with_full_jitter_and_starts_over_after_a_healthy_stream() {
    let ms = Duration::from_millis;
    // At the top of the jitter range: the ceilings, doubling from 100 ms to the 10 s cap.
    let mut failures = 0;
    let mut delays = Vec::new();
    for _ in 0..10 {
        let (delay, counted) = RECONNECT.after_failure(failures, None, 1.0);
        delays.push(delay);
        failures = counted;
    }
    assert_eq!(
        delays,
        [
            100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000, 10_000
        ]
        .map(ms)
    );
    assert_eq!(failures, 10);
    // Streams that came up but did not last count as failures too.
    assert_eq!(
        RECONNECT.after_failure(failures, Some(ms(9_999)), 1.0),
        (ms(10_000), 11)
    );
    // One that stayed up long enough was healthy: the schedule starts over.
    assert_eq!(
        RECONNECT.after_failure(failures, Some(ms(10_000)), 1.0),
        (ms(100), 1)
    );
    // Full jitter: anywhere from nothing to the ceiling.
    assert_eq!(RECONNECT.after_failure(3, None, 0.0), (Duration::ZERO, 4));
    assert_eq!(RECONNECT.after_failure(3, None, 0.25), (ms(200), 4));
    // Nonsense samples stay within the ceiling; the count never overflows.
    assert_eq!(RECONNECT.after_failure(0, None, 7.0).0, ms(100));
    assert_eq!(RECONNECT.after_failure(0, None, f64::NAN).0, ms(100));
    assert_eq!(
        RECONNECT.after_failure(u32::MAX, None, 1.0),
        (ms(10_000), u32::MAX)
    );
}

fn record() -> WorkerRecord {
    WorkerRecord {
        id: "gpu-1".into(),
        pool: Pool::Gpu,
        address: "127.0.0.1:1".into(),
        models: vec!["m".into()],
        capacity: Capacity {
            max_concurrent: 8,
            tokens_per_s: 40.0,
            cost_per_mtok: 0.35,
        },
        hardware: String::new(),
        engine: "synthetic".into(),
        version: String::new(),
        state: RecordState::Ready,
        scores_prompts: false,
        embeds: false,
    }
}

/// A link to `record` and its task, not running; and the feed it tells of changes.
fn link_to(record: WorkerRecord) -> (Arc<Link>, LinkTask, Arc<ChangeFeed>) {
    let changes = Arc::new(ChangeFeed::default());
    let (link, task) = Link::new(
        record,
        changes.clone(),
        Arc::default(),
        Weak::new(),
        Arc::default(),
        Duration::from_secs(5),
    );
    (link, task, changes)
}

fn link() -> (Arc<Link>, LinkTask) {
    let (link, task, _) = link_to(record());
    (link, task)
}

/// A link marked up, its task not running, and what it would send to the worker.
fn connected_link() -> (
    Arc<Link>,
    LinkTask,
    Outbound,
    mpsc::Receiver<v1::RouterFrame>,
) {
    let (link, task) = link();
    link.shared.state.update(|s| s.connected = true);
    let (frames, sent) = mpsc::channel(OUTBOUND_CAPACITY);
    let outbound = Outbound {
        frames,
        waiting: None,
    };
    (link, task, outbound, sent)
}

/// Lets the task act on every command handed to it so far.
fn catch_up(task: &mut LinkTask, outbound: &mut Outbound) {
    while let Ok(command) = task.commands.try_recv() {
        task.on_command(command, Some(outbound));
    }
}

#[test]
fn the_policy_sees_the_prefill_figures_a_worker_reports() {
    let (link, mut task) = link();
    // Nothing reported: 0 = unknown, the policy assumes its defaults.
    let state = link.state();
    assert_eq!(
        (state.queued_prompt_tokens, state.prefill_tokens_per_s),
        (0, 0.0)
    );
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        active: 2,
        max_concurrent: 8,
        queued_prompt_tokens: 3_000,
        prefill_tokens_per_s: 12_000.0,
        ..Default::default()
    }));
    let state = link.state();
    assert_eq!(state.queued_prompt_tokens, 3_000);
    assert_eq!(state.prefill_tokens_per_s, 12_000.0);
    assert_eq!(state.prefill_chunk_tokens, 0, "whole prompts unless told");
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        prefill_chunk_tokens: Some(256),
        ..Default::default()
    }));
    assert_eq!(link.state().prefill_chunk_tokens, 256);
    // A nonsense rate is treated as not reported.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        prefill_tokens_per_s: f64::NAN,
        ..Default::default()
    }));
    assert_eq!(link.state().prefill_tokens_per_s, 0.0);
}

#[test]
fn a_reported_first_token_delay_is_what_the_policy_predicts_on_an_idle_worker() {
    let (link, mut task) = link();
    // Not reported: no fixed overhead.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        max_concurrent: 8,
        prefill_tokens_per_s: 10_000.0,
        ..Default::default()
    }));
    assert_eq!(link.state().ttft_overhead_ms, 0.0);
    // A synthetic engine configured for 150 ms: an idle worker's 100-token prompt is
    // predicted at 150 ms plus its prefill (10 ms), not the 35 ms of prefill plus a step.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        max_concurrent: 8,
        prefill_tokens_per_s: 10_000.0,
        first_token_delay_ms: Some(150.0),
        ..Default::default()
    }));
    let state = link.state();
    let policy = crate::policy::document::PolicyDocument::default();
    let predicted = crate::policy::predicted_ttft_ms(
        &state,
        crate::policy::document::LaneName::LatencyCritical,
        100,
        false,
        &policy,
    );
    assert!((predicted - 160.0).abs() < 1e-6, "{predicted}");
    // The delay covers the decode step the policy adds; never negative.
    assert_eq!(first_token_overhead_ms(10.0, 40.0), 0.0);
    assert_eq!(first_token_overhead_ms(f64::NAN, 40.0), 0.0);
    assert_eq!(first_token_overhead_ms(100.0, 0.0), 100.0);
}

#[test]
fn prompts_sent_since_the_last_report_count_as_queued() {
    let (link, mut task, mut outbound, _sent) = connected_link();
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        queued_prompt_tokens: 100,
        ..Default::default()
    }));
    let start = v1::WorkerStart {
        request_id: "g1".into(),
        prompt: "x".repeat(400),
        ..Default::default()
    };
    link.try_start(start).unwrap();
    // Counted from the moment it is handed over, before the task has seen it...
    assert_eq!(link.state().queued_prompt_tokens, 100 + 100);
    assert_eq!(link.state().outstanding, 1);
    // ... and exactly once after.
    catch_up(&mut task, &mut outbound);
    assert_eq!(link.state().queued_prompt_tokens, 100 + 100);
    assert_eq!(link.state().outstanding, 1);
    // The worker's next report includes it.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        queued_prompt_tokens: 200,
        ..Default::default()
    }));
    assert_eq!(link.state().queued_prompt_tokens, 200);
    assert_eq!(link.state().outstanding, 0);
}

#[test]
fn a_finished_generation_frees_its_slot_before_the_next_load_report() {
    let (link, mut task, mut outbound, _sent) = connected_link();
    let report = |active: u32, seen: u64| {
        worker_frame::Frame::Load(v1::Load {
            active,
            max_concurrent: 1,
            starts_seen: Some(seen),
            ..Default::default()
        })
    };
    let finished = |id: &str| {
        worker_frame::Frame::Finished(v1::Finished {
            request_id: id.into(),
            ..Default::default()
        })
    };
    // Seen by a report, then finished: its slot is free at once, not when the worker
    // next reports (a request placed meanwhile would think the worker full).
    let _g1 = link.try_start(start("g1")).unwrap();
    catch_up(&mut task, &mut outbound);
    task.on_frame(report(1, 1));
    assert_eq!(link.state().outstanding, 1);
    task.on_frame(finished("g1"));
    assert_eq!(link.state().outstanding, 0);
    // The next report counts what the worker runs; nothing is taken off twice.
    task.on_frame(report(0, 1));
    assert_eq!(link.state().outstanding, 0);
    // Finished before any report saw it: the start in transit and its end cancel out, and
    // the report that then sees the start does not count it again.
    let _g2 = link.try_start(start("g2")).unwrap();
    catch_up(&mut task, &mut outbound);
    assert_eq!(link.state().outstanding, 1);
    task.on_frame(finished("g2"));
    assert_eq!(link.state().outstanding, 0);
    task.on_frame(report(0, 2));
    assert_eq!(link.state().outstanding, 0);
    // An end nobody routed here (a stray frame) frees nothing.
    let _g3 = link.try_start(start("g3")).unwrap();
    catch_up(&mut task, &mut outbound);
    task.on_frame(report(1, 3));
    task.on_frame(finished("unknown"));
    assert_eq!(link.state().outstanding, 1);
}

#[test]
fn latency_critical_queued_tokens_reach_the_policy_with_the_starts_in_transit() {
    let (link, mut task, mut outbound, _sent) = connected_link();
    // A worker that does not report its lanes apart: the policy counts every token.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        queued_prompt_tokens: 500,
        ..Default::default()
    }));
    assert_eq!(link.state().queued_latency_critical_prompt_tokens, None);
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        queued_prompt_tokens: 500,
        queued_latency_critical_prompt_tokens: Some(100),
        starts_seen: Some(0),
        ..Default::default()
    }));
    // Sent since: 100 latency-critical and 200 cost-sensitive prompt tokens.
    for (id, lane, bytes) in [
        ("lc", v1::Lane::LatencyCritical, 400),
        ("cs", v1::Lane::CostSensitive, 800),
    ] {
        link.try_start(v1::WorkerStart {
            request_id: id.into(),
            prompt: "x".repeat(bytes),
            lane: lane as i32,
            ..Default::default()
        })
        .unwrap();
    }
    catch_up(&mut task, &mut outbound);
    let state = link.state();
    assert_eq!(state.queued_prompt_tokens, 500 + 300);
    assert_eq!(state.queued_latency_critical_prompt_tokens, Some(100 + 100));
    // The worker has seen both starts: its report counts them.
    task.on_frame(worker_frame::Frame::Load(v1::Load {
        queued_prompt_tokens: 800,
        queued_latency_critical_prompt_tokens: Some(200),
        starts_seen: Some(2),
        ..Default::default()
    }));
    let state = link.state();
    assert_eq!(
        (
            state.queued_prompt_tokens,
            state.queued_latency_critical_prompt_tokens
        ),
        (800, Some(200))
    );
}

#[test]
fn a_held_slot_counts_until_its_start_is_handed_over_and_an_unused_one_wakes_placement() {
    let (link, mut task, changes) = link_to(record());
    link.shared.state.update(|s| s.connected = true);
    let (frames, _sent) = mpsc::channel(OUTBOUND_CAPACITY);
    let mut outbound = Outbound {
        frames,
        waiting: None,
    };
    let used = link.hold_slot();
    let unused = link.hold_slot();
    assert_eq!(link.state().outstanding, 2);
    link.try_start(v1::WorkerStart {
        request_id: "g1".into(),
        ..Default::default()
    })
    .unwrap();
    used.release_after_start();
    assert_eq!(link.state().outstanding, 2);
    catch_up(&mut task, &mut outbound);
    assert_eq!(link.state().outstanding, 2);
    assert!(changes.take().workers.is_empty());
    drop(unused);
    assert_eq!(link.state().outstanding, 1);
    assert!(changes.take().workers.contains("gpu-1"));
}

#[test]
fn starts_reaching_a_link_that_went_down_are_lost_at_once() {
    let (link, mut task) = link();
    // Down: refused at the door.
    assert!(link.try_start(v1::WorkerStart::default()).is_err());
    // Handed over while up, but the stream broke before the task sent it.
    link.shared.state.update(|s| s.connected = true);
    let mut events = link
        .try_start(v1::WorkerStart {
            request_id: "g1".into(),
            prompt: "x".repeat(40),
            ..Default::default()
        })
        .unwrap();
    let command = task.commands.try_recv().unwrap();
    task.on_command(command, None);
    assert!(matches!(events.try_recv(), Ok(LinkEvent::Lost(_))));
    assert_eq!(link.state().outstanding, 0);
    assert_eq!(link.state().queued_prompt_tokens, 0);
}

#[tokio::test]
async fn a_full_command_channel_refuses_a_try_start_and_makes_a_start_wait_and_controls_still_arrive()
 {
    let (link, mut task, mut outbound, mut sent) = connected_link();
    let start = |i: usize| v1::WorkerStart {
        request_id: format!("g{i}"),
        ..Default::default()
    };
    let mut events = Vec::new();
    for i in 0..COMMAND_CAPACITY {
        events.push(link.try_start(start(i)).expect("room for the start"));
    }
    let refused = link.try_start(start(COMMAND_CAPACITY)).unwrap_err();
    assert!(refused.contains("overloaded"), "{refused}");
    // The refused start holds nothing.
    assert_eq!(link.state().outstanding, COMMAND_CAPACITY as u32);
    // A start that may wait, waits for room (a burst queues, it does not fail).
    let mut waiting = Box::pin(link.start(start(COMMAND_CAPACITY + 1)));
    assert!(futures::poll!(&mut waiting).is_pending());
    // A cancel finding the channel full is not lost: it goes once there is room, after
    // its start.
    link.cancel("g0", v1::FinishReason::Cancelled);
    let mut starts = 0;
    let cancelled = tokio::time::timeout(PATIENCE, async {
        loop {
            let command = task.commands.recv().await.expect("the link lives");
            task.on_command(command, Some(&mut outbound));
            while let Ok(frame) = sent.try_recv() {
                match frame.frame {
                    Some(router_frame::Frame::Start(_)) => starts += 1,
                    Some(router_frame::Frame::Cancel(cancel)) => return cancel,
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            // The outbound channel holds fewer frames than the command channel: play
            // tonic's part.
            if let Some(frame) = outbound.waiting.take() {
                outbound.frames.try_send(frame).expect("just drained");
            }
        }
    })
    .await
    .expect("the cancel arrives");
    assert_eq!(cancelled.request_id, "g0");
    // The waiting start got its room as the task took commands.
    assert!(waiting.await.is_ok());
}

/// A worker that reports a load as each stream opens and answers each start with three
/// tokens naming the request, then `Finished` — except starts of `hold`, which it keeps
/// running until the stream closes. Closes its streams when `closing` fires.
#[derive(Clone, Default)]
struct FakeWorker {
    closing: CancellationToken,
    streams: Arc<AtomicU64>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl v1::worker_server::Worker for FakeWorker {
    type ServeStream = FrameStream;

    async fn serve(
        &self,
        request: Request<Streaming<v1::RouterFrame>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let closing = self.closing.clone();
        self.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let load = v1::Load {
                max_concurrent: 3,
                starts_seen: Some(0),
                ..Default::default()
            };
            let frame = |frame| Ok(v1::WorkerFrame { frame: Some(frame) });
            if tx
                .send(frame(worker_frame::Frame::Load(load)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let start = tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(v1::RouterFrame { frame: Some(router_frame::Frame::Start(start)) })) => start,
                        Ok(Some(_)) => continue,
                        _ => return,
                    },
                    _ = closing.cancelled() => return,
                };
                if start.request_id == "hold" {
                    continue;
                }
                for seq in 0..3 {
                    let tokens = v1::Tokens {
                        request_id: start.request_id.clone(),
                        seq,
                        text: format!("{}-{seq}", start.request_id),
                        token_ids: vec![seq as u32],
                        logprobs: vec![],
                        ..Default::default()
                    };
                    if tx
                        .send(frame(worker_frame::Frame::Tokens(tokens)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let finished = v1::Finished {
                    request_id: start.request_id,
                    ..Default::default()
                };
                if tx
                    .send(frame(worker_frame::Frame::Finished(finished)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_tokenizer(
        &self,
        _: Request<v1::TokenizerRequest>,
    ) -> Result<Response<v1::TokenizerSpec>, Status> {
        Err(Status::not_found("this worker works on text"))
    }
}

/// Serves `worker` on `listener` until its `closing` fires.
fn serve(listener: TcpListener, worker: FakeWorker) -> JoinHandle<()> {
    let closing = worker.closing.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(v1::worker_server::WorkerServer::new(worker))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                closing.cancelled_owned(),
            )
            .await
            .expect("the fake worker serves");
    })
}

fn record_at(address: SocketAddr) -> WorkerRecord {
    WorkerRecord {
        address: address.to_string(),
        ..record()
    }
}

/// A running link to `address`, with its task's jitter drawn from `jitter`.
fn spawn_link(address: SocketAddr, jitter: fn() -> f64) -> Arc<Link> {
    let (link, mut task, _) = link_to(record_at(address));
    task.jitter = jitter;
    tokio::spawn(task.run());
    link
}

/// Polls the link's state (nothing announces its changes) until `ready` holds.
async fn until(link: &Link, what: &str, mut ready: impl FnMut(&LinkState) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready(&link.shared.state.get()) {
        assert!(
            Instant::now() < deadline,
            "waited {PATIENCE:?} for the link to be {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The text a generation streamed until it finished, or why it was lost.
async fn text_of(events: &mut LinkEvents) -> Result<String, String> {
    let mut text = String::new();
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("a frame in time");
        match event {
            Some(LinkEvent::Frame(worker_frame::Frame::Tokens(tokens))) => {
                text.push_str(&tokens.text);
                text.push(' ');
            }
            Some(LinkEvent::Frame(worker_frame::Frame::Finished(_))) => return Ok(text),
            Some(LinkEvent::Frame(other)) => panic!("unexpected frame {other:?}"),
            Some(LinkEvent::Lost(why)) => return Err(why),
            None => return Err("the link dropped the request".into()),
        }
    }
}

fn start(request_id: &str) -> v1::WorkerStart {
    v1::WorkerStart {
        request_id: request_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn frames_are_demultiplexed_to_each_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let worker = FakeWorker::default();
    let _server = serve(listener, worker.clone());
    let link = spawn_link(address, fastrand::f64);
    until(&link, "up", |s| s.connected && s.load.is_some()).await;
    assert!(link.state().available);
    assert_eq!(link.state().max_concurrent, 3);

    let mut streams: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|id| link.try_start(start(id)).unwrap())
        .collect();
    for (id, events) in ["a", "b", "c"].into_iter().zip(&mut streams) {
        assert_eq!(
            text_of(events).await.unwrap(),
            format!("{id}-0 {id}-1 {id}-2 ")
        );
    }
    worker.closing.cancel();
}

#[tokio::test]
async fn a_link_dials_its_worker_again_after_the_worker_restarts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let first = FakeWorker::default();
    let server = serve(listener, first.clone());
    let link = spawn_link(address, fastrand::f64);
    until(&link, "up", |s| s.connected).await;
    let mut held = link.try_start(start("hold")).unwrap();

    // The worker goes away: its request learns it, and the link is down.
    first.closing.cancel();
    server.await.unwrap();
    assert!(text_of(&mut held).await.is_err());
    until(&link, "down", |s| !s.connected).await;
    assert!(!link.state().available);
    assert!(link.try_start(start("while-down")).is_err());

    // The same address serves again: the link finds it.
    let listener = TcpListener::bind(address).await.unwrap();
    let second = FakeWorker::default();
    let _server = serve(listener, second.clone());
    until(&link, "up again", |s| s.connected).await;
    assert_eq!(second.streams.load(Ordering::Relaxed), 1);
    let mut events = link.try_start(start("after")).unwrap();
    assert_eq!(
        text_of(&mut events).await.unwrap(),
        "after-0 after-1 after-2 "
    );
    second.closing.cancel();
}

#[tokio::test]
async fn redials_of_a_worker_that_stays_down_back_off_exponentially() {
    // Nothing listens there: every dial is refused at once.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // At the top of the jitter range, the pauses are the ceilings: 100, 200, 400, 800 ms.
    let link = spawn_link(address, || 1.0);
    let mut failed_at = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while failed_at.len() < 5 {
            tokio::time::sleep(POLL).await;
            let failures = link.shared.state.get().failures;
            if failures as usize > failed_at.len() {
                failed_at.push(Instant::now());
            }
        }
    })
    .await
    .expect("five failed dials");
    // Between the second failure and the fifth the link paused 200 + 400 + 800 ms (a fixed
    // 200 ms schedule would take 600). A little slack for when this task saw the second.
    let paused = failed_at[4] - failed_at[1];
    assert!(paused >= Duration::from_millis(1_300), "{paused:?}");
    link.shared.closed.cancel();
}

/// A real worker (the synthetic engine, 200 tokens/s) serving in this process.
async fn real_worker() -> (SocketAddr, CancellationToken) {
    let shutdown = CancellationToken::new();
    let config = switchyard_worker::WorkerConfig::loopback("gpu-1", Pool::Gpu);
    let engine = switchyard_worker::SyntheticEngine::checked(switchyard_worker::SyntheticConfig {
        ttft: Duration::from_millis(10),
        tokens_per_s: 200.0,
        ..Default::default()
    })
    .unwrap();
    let (ready, serving) = tokio::sync::oneshot::channel();
    tokio::spawn(switchyard_worker::run_worker(
        config,
        Arc::new(engine),
        Arc::new(switchyard_cluster::MemoryRegistry::new()),
        shutdown.clone(),
        |address| {
            let _ = ready.send(address);
        },
    ));
    (serving.await.expect("the worker serves"), shutdown)
}

/// Token ids `events` carries until `count` have come.
async fn tokens(events: &mut LinkEvents, count: usize) {
    let mut got = 0;
    while got < count {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Some(LinkEvent::Frame(worker_frame::Frame::Tokens(t)))) => got += t.token_ids.len(),
            other => panic!("expected tokens, got {other:?}"),
        }
    }
    assert_eq!(got, count, "more tokens than the credit allowed");
}

#[tokio::test]
async fn credit_and_cancel_reach_a_real_worker_and_its_reports_settle_the_starts() {
    let (address, shutdown) = real_worker().await;
    let link = spawn_link(address, fastrand::f64);
    until(&link, "up", |s| s.connected).await;
    let mut events = link
        .try_start(v1::WorkerStart {
            request_id: "g1".into(),
            model: "synthetic".into(),
            prompt: "hello".into(),
            sampling: Some(v1::SamplingParams {
                max_tokens: 10_000,
                ..Default::default()
            }),
            credit_tokens: 4,
            ..Default::default()
        })
        .unwrap();
    tokens(&mut events, 4).await;
    link.grant("g1", 4);
    tokens(&mut events, 4).await;
    link.cancel("g1", v1::FinishReason::Cancelled);
    let finished = loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Some(LinkEvent::Frame(worker_frame::Frame::Finished(f)))) => break f,
            // Credit granted before the cancel may still be spent.
            Ok(Some(LinkEvent::Frame(worker_frame::Frame::Tokens(_)))) => {}
            other => panic!("expected the generation to finish, got {other:?}"),
        }
    };
    assert_eq!(finished.reason, v1::FinishReason::Cancelled as i32);
    // The worker's reports have counted the start: nothing is in transit any more.
    until(&link, "settled", |s| {
        s.in_transit == Starts::default() && s.load.is_some_and(|l| l.active == 0)
    })
    .await;
    assert_eq!(link.state().outstanding, 0);
    shutdown.cancel();
}

/// Waits, on the change feed, until `done` holds.
async fn until_links(links: &Links, what: &str, done: impl Fn(&Links) -> bool) {
    tokio::time::timeout(PATIENCE, async {
        while !done(links) {
            links.changes().next().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}"));
}

#[tokio::test]
async fn a_worker_whose_record_leaves_keeps_its_link_until_its_stream_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let worker = FakeWorker::default();
    let _server = serve(listener, worker.clone());
    let links = Links::new(Duration::from_secs(5));
    let listed = MembershipView::from_records([record_at(address)]);
    links.sync(&listed);
    let link = links.get("gpu-1").expect("a link to the listed worker");
    until(&link, "up", |s| s.connected).await;

    // etcd lost the record (a lease lapsed during an outage): the healthy link stays, and
    // with it the worker's place in routing and what runs on it.
    let mut held = link.try_start(start("hold")).unwrap();
    links.sync(&MembershipView::default());
    let kept = links.get("gpu-1").expect("the link is kept");
    assert!(Arc::ptr_eq(&kept, &link));
    assert!(link.state().available);
    assert!(links.has_served("m"));

    // The record came back and left again: still the same link.
    links.sync(&listed);
    links.sync(&MembershipView::default());
    assert!(Arc::ptr_eq(&links.get("gpu-1").unwrap(), &link));

    // Then its stream fails: unlisted, it leaves the view instead of being redialled.
    worker.closing.cancel();
    assert!(text_of(&mut held).await.is_err());
    until_links(&links, "the unlisted worker to leave", |l| {
        l.get("gpu-1").is_none()
    })
    .await;
    assert!(links.view().workers().is_empty());
}

#[tokio::test]
async fn a_worker_whose_record_leaves_while_its_link_is_down_is_dropped_at_once() {
    // Nothing listens there: the link never comes up.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let links = Links::new(Duration::from_secs(5));
    links.sync(&MembershipView::from_records([record_at(address)]));
    let link = links.get("gpu-1").expect("a link to the listed worker");
    assert!(!link.state().available);
    links.sync(&MembershipView::default());
    assert!(links.get("gpu-1").is_none());
    assert!(link.shared.closed.is_cancelled());
}
