//! A link's handle, what dispatchers and placement hold: start a generation, cancel or forget
//! one, hold a slot; the commands it sends the link's task, and the events it hears back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use switchyard_cluster::WorkerRecord;
use switchyard_proto::v1::{self, worker_frame};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::changes::ChangeFeed;
use crate::policy::WorkerState;
use crate::tokenizers::Tokenizers;

use super::state::{Charge, InTransit, StateCell, worker_state};
use super::task::LinkTask;
use super::{Links, SharedPrefixIndex};

/// What a request's dispatcher hears from its worker.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(worker_frame::Frame),
    /// The stream to the worker broke (or was down when the start reached the link); the
    /// generation's fate is unknown.
    Lost(String),
}

/// A generation's events from its link. Each travels boxed: the channel allocates its first
/// block of 32 slots when the generation starts, and a slot the size of a worker frame made
/// that ~3.6 KiB per open stream; a pointer makes it ~0.3 KiB.
#[derive(Debug)]
pub struct LinkEvents(mpsc::UnboundedReceiver<Box<LinkEvent>>);

impl LinkEvents {
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        self.0.recv().await.map(|event| *event)
    }

    pub fn try_recv(&mut self) -> Result<LinkEvent, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|event| *event)
    }
}

pub(super) type EventSender = mpsc::UnboundedSender<Box<LinkEvent>>;

/// Commands a link takes before it is overloaded: a start beyond them fails at once (and is
/// placed elsewhere) instead of queueing behind a worker that does not keep up.
pub(super) const COMMAND_CAPACITY: usize = 1024;

/// What a link's task is asked to do.
pub(super) enum Command {
    /// Send a generation's start; its frames go to `events`.
    Start {
        start: Box<v1::WorkerStart>,
        events: EventSender,
        charge: Charge,
    },
    Cancel {
        request_id: String,
        reason: v1::FinishReason,
    },
    Credit {
        request_id: String,
        tokens: u32,
    },
    /// Stop routing a request's frames.
    Forget(String),
}

/// What a link's handle and its task share.
pub(super) struct Shared {
    /// The worker's id (a link is keyed by it and never changes worker).
    pub(super) id: String,
    /// The worker's record, kept current by the membership follower.
    pub(super) record: watch::Sender<Arc<WorkerRecord>>,
    pub(super) state: StateCell,
    /// Fired when the link leaves the link set: its task ends.
    pub(super) closed: CancellationToken,
    /// Shared by every link: told when this worker's load or reachability changes, so
    /// placement patches its view (and may place a waiting request here).
    pub(super) changes: Arc<ChangeFeed>,
}

/// A slot of a worker held for a request placed there, from the placement decision until its
/// start is handed to the link (then the start itself counts, see [`InTransit`]): decisions
/// made meanwhile see the slot taken. Dropped unused (the request never started there), it
/// frees the slot and wakes requests waiting for one.
pub struct SlotHold {
    pub(super) link: Arc<Link>,
    pub(super) used: bool,
}

impl SlotHold {
    /// The start was sent (or failed to be): the hold is no longer needed.
    pub fn release_after_start(mut self) {
        self.used = true;
    }
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        let shared = &self.link.shared;
        shared.state.update(|s| s.held = s.held.saturating_sub(1));
        if !self.used {
            shared.changes.worker(&shared.id);
        }
    }
}

/// One worker's link: the handle dispatchers and placement use. Its task runs until the link
/// leaves the link set or every handle is gone.
pub struct Link {
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::Sender<Command>,
}

impl Link {
    /// A link and the task that serves it (not yet running: see [`LinkTask::run`]).
    pub(super) fn new(
        record: WorkerRecord,
        changes: Arc<ChangeFeed>,
        prefix: SharedPrefixIndex,
        links: Weak<Links>,
        tokenizers: Arc<Tokenizers>,
        connect_timeout: Duration,
    ) -> (Arc<Self>, LinkTask) {
        let (commands, inbox) = mpsc::channel(COMMAND_CAPACITY);
        let shared = Arc::new(Shared {
            id: record.id.clone(),
            record: watch::Sender::new(Arc::new(record)),
            state: StateCell::default(),
            closed: CancellationToken::new(),
            changes,
        });
        let task = LinkTask {
            shared: shared.clone(),
            commands: inbox,
            links,
            prefix,
            tokenizers,
            connect_timeout,
            jitter: fastrand::f64,
            requests: HashMap::new(),
            in_transit: InTransit::default(),
            stream: 0,
            warned_scheme: false,
            no_tokenizer: HashSet::new(),
        };
        (Arc::new(Self { shared, commands }), task)
    }

    /// The worker's record as membership last listed it (shared: a request reads it a few
    /// times, and a record is a dozen strings).
    pub fn record(&self) -> Arc<WorkerRecord> {
        self.shared.record.borrow().clone()
    }

    pub fn id(&self) -> String {
        self.shared.id.clone()
    }

    /// Holds one of the worker's slots for a request just placed here (see [`SlotHold`]).
    pub fn hold_slot(self: &Arc<Self>) -> SlotHold {
        self.shared.state.update(|s| s.held += 1);
        SlotHold {
            link: self.clone(),
            used: false,
        }
    }

    /// Starts a generation on this worker; its frames arrive on the returned channel. Waits
    /// while the link's command channel is full — a burst of starts queues behind the ones
    /// the worker is taking instead of failing — and fails at once when the link is down (the
    /// caller places the request elsewhere). A link that goes down before its task sends the
    /// start says so as the channel's first event ([`LinkEvent::Lost`]).
    pub async fn start(&self, start: v1::WorkerStart) -> Result<LinkEvents, String> {
        let (command, charge, rx) = self.start_command(start)?;
        match self.commands.send(command).await {
            Ok(()) => Ok(rx),
            Err(_) => {
                self.shared.state.update(|s| s.queued.remove(charge));
                Err(format!("worker {} link just closed", self.shared.id))
            }
        }
    }

    /// [`Link::start`] without waiting: fails when the command channel is full.
    pub fn try_start(&self, start: v1::WorkerStart) -> Result<LinkEvents, String> {
        let (command, charge, rx) = self.start_command(start)?;
        match self.commands.try_send(command) {
            Ok(()) => Ok(rx),
            Err(error) => {
                self.shared.state.update(|s| s.queued.remove(charge));
                Err(match error {
                    TrySendError::Full(_) => format!(
                        "worker {} link is overloaded ({COMMAND_CAPACITY} commands waiting)",
                        self.shared.id
                    ),
                    TrySendError::Closed(_) => {
                        format!("worker {} link just closed", self.shared.id)
                    }
                })
            }
        }
    }

    /// The start command, counted in the link's state as queued before the task can see it,
    /// so a placement meanwhile sees it and a load report that has seen it can never arrive
    /// before it is counted.
    fn start_command(
        &self,
        start: v1::WorkerStart,
    ) -> Result<(Command, Charge, LinkEvents), String> {
        if !self.shared.state.get().connected {
            return Err(format!("worker {} is not connected", self.shared.id));
        }
        let charge = Charge::of(&start);
        // Unbounded per request: a slow client must not stall the link's task (and with it
        // every other request on this worker); credit bounds each request's backlog.
        let (events, rx) = mpsc::unbounded_channel();
        self.shared.state.update(|s| s.queued.add(charge));
        let command = Command::Start {
            start: Box::new(start),
            events,
            charge,
        };
        Ok((command, charge, LinkEvents(rx)))
    }

    /// Asks the worker to stop a generation (`Cancelled` or `Interrupted`).
    pub fn cancel(&self, request_id: &str, reason: v1::FinishReason) {
        self.control(Command::Cancel {
            request_id: request_id.to_string(),
            reason,
        });
    }

    /// Grants `request_id` more flow-control credit (its client read `tokens` more).
    pub fn grant(&self, request_id: &str, tokens: u32) {
        self.control(Command::Credit {
            request_id: request_id.to_string(),
            tokens,
        });
    }

    /// Stops routing frames of `request_id` to its dispatcher.
    pub fn forget(&self, request_id: &str) {
        self.control(Command::Forget(request_id.to_string()));
    }

    /// Hands the task a command about a running generation. Never dropped while the link
    /// lives: a lost cancel leaves a generation running for nobody, a lost credit stalls one.
    /// With the channel full, it waits its turn on a task of its own (it still follows its
    /// generation's start, already in the channel); with the link gone there is nothing to
    /// tell.
    fn control(&self, command: Command) {
        match self.commands.try_send(command) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(command)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let commands = self.commands.clone();
                    runtime.spawn(async move {
                        let _ = commands.send(command).await;
                    });
                }
            }
        }
    }

    /// Whether the worker is draining (its record or its load report says so) while its
    /// stream is still up: its generations may be handed to other workers.
    pub fn draining(&self) -> bool {
        let link = self.shared.state.get();
        link.connected
            && (link.load.is_some_and(|l| l.draining)
                || self.shared.record.borrow().state == switchyard_cluster::WorkerState::Draining)
    }

    /// The worker as the placement policy sees it.
    pub fn state(&self) -> WorkerState {
        let link = self.shared.state.get();
        worker_state(&self.shared.record.borrow(), &link)
    }
}
