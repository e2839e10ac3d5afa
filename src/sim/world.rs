//! The simulated world: processes (proxy, replicas, clients) running the real state machines,
//! connections with ordered streams, a clock, faults, and the checks. See the module above.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;

use super::disk::{self, Disk, DiskId, Held, Rec};
use super::rng::Rng;
use crate::ha::Millis;
use crate::ha::replica::{self, BackupId, Timing};
use crate::ha::router::{self, Outcome};
use crate::ha::witness::{self, Durable, LinkId, Witness};
use crate::nemesis::checker::{self, Op as HistOp, OpKind, Outcome as HistOutcome};
use crate::wire::node::{ReplicaInfo, Role};

/// Timing and size of one simulated run (defaults: the shipped ratios, scaled down so that a
/// run is short).
#[derive(Clone, Debug)]
pub struct SimParams {
    pub heartbeat_interval: Millis,
    pub heartbeat_timeout: Millis,
    /// QUIC idle timeout on every link: a connection held this long dies at both ends.
    pub idle_timeout: Millis,
    pub connect_timeout: Millis,
    pub request_timeout: Millis,
    pub proxy_loss_timeout: Millis,
    pub backup_sync_timeout: Millis,
    /// A backup that receives updates may leave them unacknowledged this long (a slow log).
    pub backup_ack_timeout: Millis,
    pub backup_retry_backoff: Millis,
    pub clients: u32,
    pub keys: u32,
    /// Faults are injected in this window of the run.
    pub fault_window: (Millis, Millis),
    /// After the last fault heals, the run goes on this long (the liveness window).
    pub settle: Millis,
    /// Record a trace of every event (for `--verbose` replays).
    pub trace: bool,
    /// Each replica keeps a log (`src/durable`): a primary releases only what its log holds, a
    /// backup acknowledges only what its log holds, and replicas restart from the logs. False:
    /// the model before logs (memory only; no power cuts, restarts or operator).
    pub logs: bool,
    /// A sync (fdatasync of one group) takes this long (uniform) ...
    pub disk_delay: (Millis, Millis),
    /// ... or, with this probability, up to this long (a slow disk).
    pub slow_disk: (f64, Millis),
    /// The proxy's state file: a write (with its fsync and the directory's) takes this long
    /// (uniform) ...
    pub proxy_disk_delay: (Millis, Millis),
    /// ... or, with this probability, up to this long (a stalled disk; longer than the heartbeat
    /// timeout). Every action behind a `Persist` waits for it, as in `src/proxy.rs`.
    pub proxy_slow_disk: (f64, Millis),
    /// A broken executor for tests: a record counts as held once handed to the OS, before its
    /// sync (as with `fsync = "never"`); a power cut still loses what was not synced.
    pub ack_before_sync: bool,
    /// `kill -9` leaves what the log writer had handed to the OS in the page cache: it survives
    /// the process (recovery reads it) but not a later power cut of the host. False: a killed
    /// process loses every unsynced record, like a power cut of its own.
    pub kill_keeps_page_cache: bool,
    /// A proxy without durable state learns the replicas' epochs this long
    /// (`proxy_fresh_wait_ms`).
    pub proxy_fresh_wait: Millis,
    /// Once the faults are over, an operator restarts a primary from the logs (as `up` does) if
    /// none is running; the liveness check then applies to every run.
    pub operator: bool,
    /// When the proxy refuses a primary the operator started: 0: only the server is started
    /// again; 1: the proxy is restarted first (`up` again); 2: then once more without the proxy's
    /// state file.
    pub operator_escalation: u8,
    /// The operator starts a primary on the host whose copy is the most advanced (OPERATIONS.md);
    /// false: on the host of the replica that died (or any host with a copy).
    pub careful_operator: bool,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            heartbeat_interval: 50,
            heartbeat_timeout: 300,
            idle_timeout: 1000,
            connect_timeout: 500,
            request_timeout: 3000,
            proxy_loss_timeout: 4000,
            backup_sync_timeout: 10_000,
            backup_ack_timeout: 1000,
            backup_retry_backoff: 100,
            clients: 3,
            keys: 3,
            fault_window: (500, 5000),
            settle: 6000,
            trace: false,
            logs: true,
            disk_delay: (1, 4),
            slow_disk: (0.03, 40),
            proxy_disk_delay: (1, 6),
            proxy_slow_disk: (0.02, 800),
            ack_before_sync: false,
            kill_keeps_page_cache: false,
            proxy_fresh_wait: 2000,
            operator: true,
            operator_escalation: 2,
            careful_operator: true,
        }
    }
}

/// A process, named by its role at the moment a fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Proxy,
    Primary,
    Backup,
}

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9`.
    Kill(Target),
    /// `kill -9` of the proxy, restarted with the same command `after` ms later, with its
    /// state file (`with_state`) or without it.
    ProxyRestart { after: Millis, with_state: bool },
    /// SIGSTOP for `ms`, then SIGCONT.
    Pause(Target, Millis),
    /// Packets from `a` to `b` (and back unless `one_way`) are held for `ms`.
    Cut {
        a: Target,
        b: Target,
        one_way: bool,
        ms: Millis,
    },
    /// The next `n` control messages are delivered twice.
    Duplicate(u32),
    /// Power cut of the host the target replica runs on: every replica there dies at once and
    /// the host's log directories lose what was not synced (a group being synced may survive in
    /// part: a torn tail, cut at recovery).
    PowerCut(Target),
    /// Power cut of every host, the proxy's included. The proxy restarts `proxy_after` ms later
    /// with its state file (always synced); an operator restarts a primary from the logs
    /// `restart_after` ms later (as `up` does: the most advanced copy on the host), and on
    /// another host if the proxy refuses it.
    PowerCutAll {
        proxy_after: Millis,
        restart_after: Millis,
    },
    /// An operator restarts a dead replica as a primary on its host (`tuplespace server ...
    /// null`): it recovers the most advanced complete copy there and claims its epoch.
    Restart,
}

/// What faults a run gets.
#[derive(Clone, Debug)]
pub enum Plan {
    /// Chosen by the seed.
    Random,
    /// These faults at these times; `remote`: the backup was started by a launch command (the
    /// old primary is fenced by a terminate message, not killed by pid).
    Scripted {
        faults: Vec<(Millis, Fault)>,
        remote: bool,
    },
}

/// The result of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub ops: usize,
    pub acknowledged_writes: usize,
    pub faults: Vec<String>,
    pub failovers: u64,
    pub end_epoch: u64,
    pub trace: Vec<String>,
    pub liveness_checked: bool,
    /// Primaries started from the logs (operator restarts).
    pub restarts: u64,
    /// Power cuts (of a host or of everything).
    pub power_cuts: u64,
    /// Every start of a primary from the logs.
    pub recoveries: Vec<Recovery>,
    /// Proxy restarts by the operator because the proxy refused a primary it started, and how
    /// many of them without the proxy's state file.
    pub operator_proxy_restarts: u64,
    pub operator_state_discarded: u64,
}

/// A primary started from the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub pid: u32,
    /// The process that created the directory it recovered.
    pub from: u32,
    /// The copy's epoch and update (None: no complete copy on the host, an empty start).
    pub copy: Option<(u64, u64)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// A readable account of the run (faults, violations, and the trace if recorded).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "seed {}: {} ops ({} acknowledged writes), faults: [{}], final epoch {}, {} restarts from the logs, liveness {}",
            self.seed,
            self.ops,
            self.acknowledged_writes,
            self.faults.join("; "),
            self.end_epoch,
            self.restarts,
            if self.liveness_checked {
                "checked"
            } else {
                "exempt (without logs: the only full copy was killed, a double fault, or servers stopped after losing the proxy)"
            }
        );
        for v in &self.violations {
            let _ = writeln!(s, "VIOLATION: {v}");
        }
        for t in &self.trace {
            let _ = writeln!(s, "  {t}");
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// the store model (a per-key model of server/store.rs)

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum KvOp {
    Get(u32),
    Put(u32, u64),
    Post(u32, u64),
    Delete(u32),
}

impl KvOp {
    fn is_write(&self) -> bool {
        !matches!(self, KvOp::Get(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum KvReply {
    Read(Option<u64>),
    Applied,
    Rejected,
    Deleted(Option<u64>),
}

pub(super) type Change = Option<(u32, Option<u64>)>;

#[derive(Clone, Debug, Default)]
pub(super) struct Kv {
    pub map: BTreeMap<u32, u64>,
    pub seq: u64,
    pub dedupe: BTreeMap<u64, KvReply>,
}

enum StoreOut {
    Read {
        after_seq: u64,
        rid: u64,
        reply: KvReply,
    },
    Write {
        seq: u64,
        rid: u64,
        change: Change,
        reply: KvReply,
    },
}

impl Kv {
    fn request(&mut self, rid: u64, op: &KvOp) -> StoreOut {
        if let Some(r) = self.dedupe.get(&rid) {
            return StoreOut::Read {
                after_seq: self.seq,
                rid,
                reply: r.clone(),
            };
        }
        let (change, reply) = match *op {
            KvOp::Get(k) => {
                return StoreOut::Read {
                    after_seq: self.seq,
                    rid,
                    reply: KvReply::Read(self.map.get(&k).copied()),
                };
            }
            KvOp::Put(k, v) => match self.map.get(&k) {
                Some(_) => (None, KvReply::Rejected),
                None => (Some((k, Some(v))), KvReply::Applied),
            },
            KvOp::Post(k, v) => match self.map.get(&k) {
                Some(_) => (Some((k, Some(v))), KvReply::Applied),
                None => (None, KvReply::Rejected),
            },
            KvOp::Delete(k) => match self.map.get(&k) {
                Some(v) => (Some((k, None)), KvReply::Deleted(Some(*v))),
                None => (None, KvReply::Deleted(None)),
            },
        };
        self.apply(&change);
        self.seq += 1;
        self.dedupe.insert(rid, reply.clone());
        StoreOut::Write {
            seq: self.seq,
            rid,
            change,
            reply,
        }
    }

    pub(super) fn apply(&mut self, change: &Change) {
        match change {
            Some((k, Some(v))) => {
                self.map.insert(*k, *v);
            }
            Some((k, None)) => {
                self.map.remove(k);
            }
            None => {}
        }
    }

    fn watermark(&mut self, w: u64) {
        self.dedupe = self.dedupe.split_off(&w);
    }
}

// ---------------------------------------------------------------------------------------------
// messages, connections, events

type Pid = u32;
type ConnId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Proxy,
    Rep(Pid),
    Client(u32),
}

/// Streams of a connection (each delivers in order, independently of the others).
const CONTROL: usize = 0;
const RELAY: usize = 1;
const STREAMS: usize = 2;

#[derive(Clone, Debug)]
enum Msg {
    Hello {
        role: Role,
        epoch: u64,
        pid: Pid,
        primary: Option<Pid>,
    },
    Heartbeat {
        epoch: u64,
        synced_backup: Option<String>,
        echo: u64,
    },
    PeerLost {
        epoch: u64,
    },
    Welcome {
        epoch: u64,
    },
    HbAck {
        epoch: u64,
        n: u64,
    },
    Grant {
        epoch: u64,
    },
    Fence {
        epoch: u64,
    },
    RelayReady,
    Request {
        rid: u64,
        op: KvOp,
    },
    Watermark(u64),
    Reply {
        rid: u64,
        reply: KvReply,
    },
    ReplHello {
        epoch: u64,
    },
    Snapshot(Box<Kv>),
    Update {
        seq: u64,
        rid: u64,
        change: Change,
        reply: KvReply,
    },
    ReplWatermark(u64),
    Synced {
        seq: u64,
        pid: Pid,
    },
    Ack {
        seq: u64,
    },
    /// With the last update the backup applied.
    Ping {
        received: u64,
    },
    Pong,
    Terminate {
        epoch: u64,
    },
    ClientReq {
        op: usize,
        kv: KvOp,
    },
    ClientResp {
        op: usize,
        outcome: Outcome<KvReply>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnKind {
    /// replica -> proxy (control + relay streams)
    Proxy,
    /// primary -> backup replication, for backup `id`
    Repl(BackupId),
    /// backup -> primary heartbeats (and terminate)
    Beat,
    Client,
}

#[derive(Clone, Debug)]
struct Conn {
    a: Addr,
    b: Addr,
    kind: ConnKind,
    open: bool,
    /// The link id the proxy gave it (proxy connections).
    link: Option<LinkId>,
    /// Last delivery time per direction (0: a->b, 1: b->a) and stream, to keep streams in order.
    last: [[Millis; STREAMS]; 2],
    /// The proxy incarnation at the time the connection was made (news of a previous
    /// incarnation's connections never reaches a restarted proxy).
    proxy_gen: u64,
    /// Messages sent and delivered per direction and stream.
    sent: [[u64; STREAMS]; 2],
    delivered: [[u64; STREAMS]; 2],
    blocked_since: Option<Millis>,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        conn: ConnId,
        to: Addr,
        stream: usize,
        /// Position in its stream (streams deliver in order).
        no: u64,
        msg: Msg,
    },
    /// The other end of `conn` learns it is gone.
    Down {
        conn: ConnId,
        to: Addr,
    },
    Tick(Addr),
    /// The proxy's tick, for its incarnation `n` (a restarted proxy has ticks of its own).
    ProxyTick(u64),
    ClientNext(u32),
    ConnCheck(ConnId),
    Fault(usize),
    Heal(usize),
    ProxyStart {
        with_state: bool,
    },
    /// The proxy's state file write for incarnation `n` (see `ProxyTick`) is done.
    ProxyPersisted {
        n: u64,
        state: Durable,
    },
    Resume(Addr),
    ConnectTimeout {
        pid: Pid,
        conn: ConnId,
    },
    BackupReach {
        pid: Pid,
        id: BackupId,
        deadline: Millis,
    },
    BindBackupSap {
        pid: Pid,
        deadline: Millis,
    },
    TakePrimarySaps {
        pid: Pid,
    },
    CloseConn(ConnId),
    /// The log writer of `disk` takes what was appended as its next group.
    DiskGroup {
        disk: DiskId,
        life: u64,
    },
    /// The sync of the group ending at record `upto` completed.
    DiskSynced {
        disk: DiskId,
        life: u64,
        upto: usize,
    },
    /// An operator restarts a primary from the logs if none runs (`attempt`: how many the proxy
    /// refused before); after a refusal, first the proxy (see [`World::operator`]).
    Operator {
        attempt: u32,
        proxy: bool,
    },
}

struct Queued {
    at: Millis,
    n: u64,
    ev: Ev,
}
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.n) == (o.at, o.n)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.n).cmp(&(o.at, o.n))
    }
}

// ---------------------------------------------------------------------------------------------
// processes

/// A client request as the simulated proxy keeps it: (client, history index).
type Pending = (u32, usize);

/// A reply as the replica machine holds it: request id, reply, the update it is (a write) or
/// observed (a read or dedupe answer), and whether it is a newly applied write.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Rel {
    rid: u64,
    reply: KvReply,
    seq: u64,
    write: bool,
}

/// How a process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// It exits: the store's last flush syncs its log; peers hear at once.
    Exit,
    /// `kill -9`.
    Kill,
    /// Its host loses power.
    Power,
}

/// Backup side: what is owed the primary on the replication connection (`links::acknowledge`):
/// the initial copy (up to an update, the n-th copy this process received), updates.
#[derive(Clone, Debug)]
struct Acker {
    conn: ConnId,
    synced: Option<(u64, u64)>,
    want: u64,
    acked: u64,
}

struct ProxyProc {
    router: router::Router<Pending, KvReply>,
    links: BTreeMap<LinkId, ConnId>,
    next_link: LinkId,
    incarnation: u64,
    with_state: bool,
    actions: Vec<router::Action<Pending, KvReply>>,
    /// A state file write is under way: every action after it waits in `held` (`src/proxy.rs`).
    persisting: bool,
    held: std::collections::VecDeque<router::Action<Pending, KvReply>>,
}

struct Rep {
    pid: Pid,
    machine: replica::Replica<Rel>,
    kv: Kv,
    /// The proxy connection being made or in use, and whether it was welcomed.
    proxy_conn: Option<ConnId>,
    welcomed: bool,
    /// Requests relayed to a backup wait for its promotion (as the relay reader does).
    held: Vec<(u64, KvOp)>,
    /// Primary side: the attached backup's replication connection.
    backup: Option<(BackupId, ConnId)>,
    /// Backups started here: id -> pid.
    children: BTreeMap<BackupId, Pid>,
    /// Backup side.
    primary_handle: Option<Pid>,
    inbound: Option<ConnId>,
    beat: Option<ConnId>,
    alive: bool,
    paused: bool,
    actions: Vec<replica::Action<Rel>>,
    /// The host it runs on, and its log directory there.
    host: u8,
    disk: Option<DiskId>,
    /// The highest epoch handed to the store (and so to the log).
    logged_epoch: u64,
    /// Started from a copy at this (epoch, update).
    recovered: Option<(u64, u64)>,
    /// An operator's restart (attempt number; 0: not one), and whether it was ever welcomed.
    operator: u32,
    ever_welcomed: bool,
    acker: Option<Acker>,
    /// Initial copies received (`serve_replication`'s `bases_sent`).
    bases_sent: u64,
}

struct ClientProc {
    conn: Option<ConnId>,
    inflight: Option<usize>,
}

struct Hist {
    client: u32,
    kv: KvOp,
    invoke: u64,
    complete: Option<u64>,
    outcome: HistOutcome,
}

struct World {
    p: SimParams,
    rng: Rng,
    now: Millis,
    n: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    conns: Vec<Conn>,
    proxy: Option<ProxyProc>,
    proxy_paused: bool,
    proxy_starts: u64,
    proxy_start_pending: bool,
    /// The proxy's state file.
    disk: Option<(u64, Durable)>,
    reps: BTreeMap<Pid, Rep>,
    next_pid: Pid,
    clients: Vec<ClientProc>,
    hist: Vec<Hist>,
    backup_sap: Option<Pid>,
    primary_saps: Option<Pid>,
    /// Directed cuts between processes.
    cuts: Vec<(Addr, Addr)>,
    duplicate: u32,
    remote: bool,
    faults: Vec<(Millis, Fault)>,
    /// Pids a fault resolved to, for its heal.
    resolved: Vec<Vec<Addr>>,
    replica_kills: u32,
    only_copy_killed: bool,
    stateless_restarts: u32,
    proxy_loss_exits: u32,
    /// Per epoch, the replica that released write replies in it and the highest update it
    /// released.
    write_epochs: BTreeMap<u64, (Pid, u64)>,
    /// Log directories (`logs`), their random disk delays, and how many hosts the replicas run
    /// on (one; two in launch-command mode).
    disks: Vec<Disk>,
    drng: Rng,
    /// The proxy's disk delays (apart, so that the replicas' disks draw as before).
    prng: Rng,
    hosts: u8,
    restarts: u64,
    power_cuts: u64,
    /// Operator restarts of a run: the order in which it tries hosts; how often it restarted
    /// the proxy because a primary it started was refused.
    operator_hosts: Vec<u8>,
    operator_proxy_restarts: u64,
    operator_state_discarded: u64,
    recoveries: Vec<Recovery>,
    violations: Vec<String>,
    trace: Vec<String>,
    end: Millis,
    failovers: u64,
}

fn timing(p: &SimParams) -> Timing {
    Timing {
        heartbeat_timeout: p.heartbeat_timeout,
        proxy_loss_timeout: p.proxy_loss_timeout,
        backup_sync_timeout: p.backup_sync_timeout,
        backup_ack_timeout: p.backup_ack_timeout,
        backup_retry_backoff: p.backup_retry_backoff,
        backup_retry_doublings: 3,
        reconnect_pause: p.heartbeat_interval * 2,
    }
}

fn info(pid: Pid) -> ReplicaInfo {
    ReplicaInfo {
        handle: pid.to_string(),
        sap: format!("sap-of-{pid}"),
        pid,
    }
}

/// Runs one seed.
pub fn run(seed: u64, p: &SimParams, plan: &Plan) -> Report {
    let mut rng = Rng::new(seed);
    let (faults, remote) = match plan {
        Plan::Random => random_faults(&mut rng, p),
        Plan::Scripted { faults, remote } => (faults.clone(), *remote),
    };
    let last_heal = faults
        .iter()
        .map(|(at, f)| {
            at + match f {
                Fault::ProxyRestart { after, .. } => *after,
                Fault::Pause(_, ms) | Fault::Cut { ms, .. } => *ms,
                Fault::PowerCutAll {
                    proxy_after,
                    restart_after,
                } => (*proxy_after).max(*restart_after),
                _ => 0,
            }
        })
        .max()
        .unwrap_or(0);
    let end = last_heal.max(p.fault_window.1) + p.settle;
    let mut drng = Rng::new(seed ^ 0xD15C_D15C_D15C_D15C);
    let hosts: u8 = if remote { 2 } else { 1 };
    let operator_hosts = if hosts == 2 && drng.chance(0.5) {
        vec![1, 0]
    } else {
        (0..hosts).collect()
    };
    let mut w = World {
        p: p.clone(),
        rng,
        now: 0,
        n: 0,
        queue: BinaryHeap::new(),
        conns: Vec::new(),
        proxy: None,
        proxy_paused: false,
        proxy_starts: 0,
        proxy_start_pending: false,
        disk: None,
        reps: BTreeMap::new(),
        next_pid: 1,
        clients: Vec::new(),
        hist: Vec::new(),
        backup_sap: None,
        primary_saps: None,
        cuts: Vec::new(),
        duplicate: 0,
        remote,
        resolved: vec![Vec::new(); faults.len()],
        faults,
        replica_kills: 0,
        only_copy_killed: false,
        stateless_restarts: 0,
        proxy_loss_exits: 0,
        write_epochs: BTreeMap::new(),
        disks: Vec::new(),
        drng,
        prng: Rng::new(seed ^ 0x57A7_E57A_7E57_A7E5),
        hosts,
        restarts: 0,
        power_cuts: 0,
        operator_hosts,
        operator_proxy_restarts: 0,
        operator_state_discarded: 0,
        recoveries: Vec::new(),
        violations: Vec::new(),
        trace: Vec::new(),
        end,
        failovers: 0,
    };
    w.start_proxy(true);
    let pid = w.spawn_replica(Role::Primary, None, 0);
    w.primary_saps = Some(pid);
    if p.logs && p.operator {
        w.at(
            last_heal.max(p.fault_window.1) + p.settle / 6,
            Ev::Operator {
                attempt: 0,
                proxy: false,
            },
        );
    }
    for c in 0..p.clients {
        w.clients.push(ClientProc {
            conn: None,
            inflight: None,
        });
        w.at(10 + c as Millis, Ev::ClientNext(c));
    }
    for i in 0..w.faults.len() {
        let at = w.faults[i].0;
        w.at(at, Ev::Fault(i));
    }
    while let Some(Reverse(q)) = w.queue.pop() {
        if q.at > w.end {
            break;
        }
        w.now = q.at;
        w.handle(q.ev);
    }
    w.finish(seed, last_heal)
}

/// How many of `n` unsynced records that reached the OS survive a power cut (a prefix; the
/// last one may be torn, which is the same as lost).
fn torn(rng: &mut Rng, n: usize) -> usize {
    if n == 0 || rng.chance(0.5) {
        0
    } else {
        rng.range(0, n as u64) as usize
    }
}

fn random_faults(rng: &mut Rng, p: &SimParams) -> (Vec<(Millis, Fault)>, bool) {
    let remote = rng.chance(0.3);
    let n = rng.range(0, 4);
    let mut kills = 0;
    let mut out = Vec::new();
    let targets = [Target::Proxy, Target::Primary, Target::Backup];
    let replica = |rng: &mut Rng| {
        if rng.chance(0.5) {
            Target::Primary
        } else {
            Target::Backup
        }
    };
    // With logs: power cuts (of a host, of everything) and restarts from the logs too.
    let kinds = if p.logs { 13 } else { 9 };
    for _ in 0..n {
        let at = rng.range(p.fault_window.0, p.fault_window.1);
        let k = rng.range(0, kinds);
        // (Without logs, the old distribution: 8 and 9 duplicate.)
        let k = if !p.logs && k == 9 { 8 } else { k };
        let f = match k {
            0 if kills == 0 || rng.chance(0.2) => {
                kills += 1;
                Fault::Kill(if rng.chance(0.5) {
                    Target::Primary
                } else {
                    Target::Backup
                })
            }
            // Always with its state file: a proxy that lost it cannot tell a deposed primary
            // (see docs/FAULTS.md); that case has a scripted test of its own.
            0 | 1 => Fault::ProxyRestart {
                after: rng.range(50, 1500),
                with_state: true,
            },
            2 | 3 => Fault::Pause(*rng.pick(&targets), rng.range(50, 3500)),
            4..=7 => {
                let a = *rng.pick(&targets);
                let mut b = *rng.pick(&targets);
                while b == a {
                    b = *rng.pick(&targets);
                }
                Fault::Cut {
                    a,
                    b,
                    one_way: rng.chance(0.4),
                    ms: rng.range(50, 3500),
                }
            }
            8 => Fault::Duplicate(rng.range(1, 20) as u32),
            9 | 10 => Fault::PowerCut(replica(rng)),
            11 => Fault::PowerCutAll {
                proxy_after: rng.range(50, 1500),
                restart_after: rng.range(50, 2000),
            },
            _ => Fault::Restart,
        };
        out.push((at, f));
    }
    out.sort_by_key(|(at, _)| *at);
    (out, remote)
}

impl World {
    fn at(&mut self, at: Millis, ev: Ev) {
        self.n += 1;
        self.queue.push(Reverse(Queued { at, n: self.n, ev }));
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if self.p.trace {
            let line = format!("{:>6} {}", self.now, f());
            self.trace.push(line);
        }
    }

    fn ns(&self) -> u64 {
        self.now * 1_000_000 + self.n % 1_000_000
    }

    // ---- processes ----

    fn start_proxy(&mut self, with_state: bool) {
        let (incarnation, durable) = match (&self.disk, with_state) {
            (Some((inc, d)), true) => (inc + 1, d.clone()),
            _ => (
                self.rng.next_u64() & router::INCARNATION_MASK,
                Durable::default(),
            ),
        };
        if with_state {
            self.disk = Some((incarnation, durable.clone()));
        }
        let grace = self.p.idle_timeout + self.p.heartbeat_timeout;
        let witness = Witness::restore(self.p.heartbeat_timeout, grace, durable)
            .learning(self.p.proxy_fresh_wait);
        self.proxy = Some(ProxyProc {
            router: router::Router::new(witness, incarnation, self.p.request_timeout),
            links: BTreeMap::new(),
            next_link: 1,
            incarnation,
            with_state,
            actions: Vec::new(),
            persisting: false,
            held: std::collections::VecDeque::new(),
        });
        self.proxy_paused = false;
        self.log(|| format!("proxy starts (incarnation {incarnation}, state file: {with_state})"));
        let period = (self.p.heartbeat_interval / 2).max(5);
        self.proxy_starts += 1;
        self.proxy_start_pending = false;
        self.at(self.now + period, Ev::ProxyTick(self.proxy_starts));
    }

    fn spawn_replica(&mut self, role: Role, primary: Option<Pid>, host: u8) -> Pid {
        let pid = self.next_pid;
        self.next_pid += 1;
        let mut machine = replica::Replica::new(role, timing(&self.p), self.now);
        let mut disk = None;
        if self.p.logs {
            // A new directory: a backup's stays empty until its primary sends the space; a new
            // primary logs its (empty) space as a base copy first (`StoreInit::log_base`).
            machine = machine.with_log(0, 0);
            self.disks.push(Disk::new(host, pid));
            disk = Some(self.disks.len() - 1);
        }
        self.insert_rep(pid, machine, Kv::default(), primary, host, disk);
        if role == Role::Primary {
            self.log_rec(pid, Rec::Reset);
            self.log_rec(
                pid,
                Rec::Base {
                    epoch: 0,
                    kv: Box::default(),
                },
            );
        }
        self.log(|| format!("replica {pid} starts as {role:?} on host {host}"));
        match role {
            Role::Primary => {
                let at = self.now + 1;
                self.at(at, Ev::Tick(Addr::Rep(pid)));
            }
            Role::Backup => {
                let deadline = self.now + self.p.connect_timeout;
                self.at(self.now + 1, Ev::BindBackupSap { pid, deadline });
            }
        }
        pid
    }

    fn insert_rep(
        &mut self,
        pid: Pid,
        machine: replica::Replica<Rel>,
        kv: Kv,
        primary: Option<Pid>,
        host: u8,
        disk: Option<DiskId>,
    ) {
        self.reps.insert(
            pid,
            Rep {
                pid,
                logged_epoch: machine.epoch(),
                machine,
                kv,
                proxy_conn: None,
                welcomed: false,
                held: Vec::new(),
                backup: None,
                children: BTreeMap::new(),
                primary_handle: primary,
                inbound: None,
                beat: None,
                alive: true,
                paused: false,
                actions: Vec::new(),
                host,
                disk,
                recovered: None,
                operator: 0,
                ever_welcomed: false,
                acker: None,
                bases_sent: 0,
            },
        );
    }

    /// An operator starts a primary on `host` from the logs there (`server ... null` with the
    /// host's data root): the most advanced complete copy, its space, update number, dedupe
    /// table and epoch, which it claims in its hello. None if it could not start.
    fn restart_primary(&mut self, host: u8, operator: u32) -> Option<Pid> {
        if let Some(o) = self.primary_saps.filter(|o| self.exists(Addr::Rep(*o))) {
            self.log(|| format!("restart on host {host}: the primary SAPs are held by {o}"));
            return None;
        }
        let pid = self.next_pid;
        let (disk, kv, pos) = match disk::recover(&self.disks, host) {
            Err(d) => {
                self.log(|| {
                    format!("restart on host {host}: the most advanced copy ({d}) is in use")
                });
                return None;
            }
            Ok(Some((d, copy))) => {
                let pos = copy.held.pos;
                self.disks[d].take_over(pid, &copy);
                (d, copy.kv, Some(pos))
            }
            Ok(None) => {
                self.disks.push(Disk::new(host, pid));
                (self.disks.len() - 1, Kv::default(), None)
            }
        };
        self.next_pid += 1;
        self.restarts += 1;
        self.recoveries.push(Recovery {
            pid,
            from: self.disks[disk].creator,
            copy: pos.map(|p| (p.epoch, p.seq)),
        });
        let (e, s) = pos.map_or((0, 0), |p| (p.epoch, p.seq));
        let machine =
            replica::Replica::new(Role::Primary, timing(&self.p), self.now).with_log(e, s);
        self.insert_rep(pid, machine, kv, None, host, Some(disk));
        if let Some(r) = self.reps.get_mut(&pid) {
            r.recovered = pos.map(|p| (p.epoch, p.seq));
            r.operator = operator;
        }
        if pos.is_none() {
            self.log_rec(pid, Rec::Reset);
            self.log_rec(
                pid,
                Rec::Base {
                    epoch: 0,
                    kv: Box::default(),
                },
            );
        }
        self.log(|| {
            format!("replica {pid} restarts as Primary on host {host} from the logs: copy {disk} at {pos:?}")
        });
        self.primary_saps = Some(pid);
        // What the directory holds is published at once (`on_durable` at start): copies it
        // supersedes are removed.
        if let Some(p) = pos {
            let held = Held {
                pos: p,
                base: true,
                bases: 0,
            };
            self.tidy(disk, held);
        }
        self.at(self.now + 1, Ev::Tick(Addr::Rep(pid)));
        Some(pid)
    }

    fn running(&self, a: Addr) -> bool {
        match a {
            Addr::Proxy => self.proxy.is_some() && !self.proxy_paused,
            Addr::Rep(p) => self.reps.get(&p).is_some_and(|r| r.alive && !r.paused),
            Addr::Client(_) => true,
        }
    }

    fn exists(&self, a: Addr) -> bool {
        match a {
            Addr::Proxy => self.proxy.is_some(),
            Addr::Rep(p) => self.reps.get(&p).is_some_and(|r| r.alive),
            Addr::Client(_) => true,
        }
    }

    fn paused(&self, a: Addr) -> bool {
        match a {
            Addr::Proxy => self.proxy_paused,
            Addr::Rep(p) => self.reps.get(&p).is_some_and(|r| r.paused),
            Addr::Client(_) => false,
        }
    }

    /// Kills a process at once (kill -9 or exit). Peers learn of it by the idle timeout
    /// (`graceful`: at once, as a CONNECTION_CLOSE would tell them).
    fn kill(&mut self, a: Addr, how: Death) {
        let graceful = how == Death::Exit;
        self.log(|| {
            format!(
                "{a:?} {}",
                match how {
                    Death::Exit => "exits",
                    Death::Kill => "killed",
                    Death::Power => "loses power",
                }
            )
        });
        match a {
            Addr::Proxy => self.proxy = None,
            Addr::Rep(p) => {
                let mut disk = None;
                if let Some(r) = self.reps.get_mut(&p) {
                    r.alive = false;
                    disk = r.disk;
                }
                if let Some(d) = disk {
                    self.disk_dies(d, how);
                }
                if self.backup_sap == Some(p) {
                    self.backup_sap = None;
                }
                if self.primary_saps == Some(p) {
                    self.primary_saps = None;
                }
            }
            Addr::Client(_) => {}
        }
        for c in 0..self.conns.len() {
            let conn = &self.conns[c];
            if !conn.open || (conn.a != a && conn.b != a) {
                continue;
            }
            let other = if conn.a == a { conn.b } else { conn.a };
            self.conns[c].open = false;
            let when = if graceful {
                self.now + 1
            } else {
                self.now + self.p.idle_timeout
            };
            self.at(
                when,
                Ev::Down {
                    conn: c as ConnId,
                    to: other,
                },
            );
        }
    }

    // ---- the replicas' logs (mirrors durable/wal.rs and the executor's `on_durable`) ----

    /// The store hands a record to its log writer.
    fn log_rec(&mut self, pid: Pid, rec: Rec) {
        let Some(d) = self.reps.get(&pid).and_then(|r| r.disk) else {
            return;
        };
        let disk = &mut self.disks[d];
        if disk.owner != Some(pid) {
            return;
        }
        disk.append(rec);
        self.queue_group(d);
    }

    /// The writer takes the next group once the current event is over (it drains its queue).
    fn queue_group(&mut self, d: DiskId) {
        let disk = &mut self.disks[d];
        if disk.owner.is_some() && !disk.start_queued && !disk.syncing && disk.pending() {
            disk.start_queued = true;
            let life = disk.life;
            self.at(self.now, Ev::DiskGroup { disk: d, life });
        }
    }

    fn disk_group(&mut self, d: DiskId, life: u64) {
        let disk = &self.disks[d];
        let Some(owner) = disk.owner.filter(|_| disk.life == life) else {
            return;
        };
        if self.paused(Addr::Rep(owner)) {
            // A stopped process's writer thread is stopped too.
            self.at(self.now + 20, Ev::DiskGroup { disk: d, life });
            return;
        }
        self.disks[d].start_queued = false;
        let Some(upto) = self.disks[d].start_group() else {
            return;
        };
        let (lo, hi) = self.p.disk_delay;
        let (slow, slowest) = self.p.slow_disk;
        let delay = if self.drng.chance(slow) {
            self.drng.range(hi, slowest)
        } else {
            self.drng.range(lo, hi)
        };
        self.at(
            self.now + delay,
            Ev::DiskSynced {
                disk: d,
                life,
                upto,
            },
        );
        if self.p.ack_before_sync {
            let h = self.disks[d].held_upto(upto);
            self.publish(d, h);
        }
    }

    fn disk_synced(&mut self, d: DiskId, life: u64, upto: usize) {
        let disk = &self.disks[d];
        let Some(owner) = disk.owner.filter(|_| disk.life == life) else {
            return;
        };
        if self.paused(Addr::Rep(owner)) {
            self.at(
                self.now + 20,
                Ev::DiskSynced {
                    disk: d,
                    life,
                    upto,
                },
            );
            return;
        }
        self.disks[d].synced(upto);
        if !self.p.ack_before_sync {
            let h = self.disks[d].held_upto(upto);
            self.publish(d, h);
        }
        if self.disks[d].life == life {
            self.queue_group(d);
        }
    }

    /// The writer publishes what the log holds; the executor steps `LogDurable`, the backup's
    /// acknowledger looks again, and once the copy is complete, the copies it supersedes on this
    /// host are removed (`on_durable`).
    fn publish(&mut self, d: DiskId, h: Held) {
        let disk = &mut self.disks[d];
        if h == disk.published {
            return;
        }
        disk.published = h;
        let Some(pid) = disk.owner else { return };
        self.rep_step(
            pid,
            replica::Input::LogDurable {
                epoch: h.pos.epoch,
                seq: h.pos.seq,
            },
        );
        self.backup_ack(pid);
        self.tidy(d, h);
    }

    fn tidy(&mut self, d: DiskId, h: Held) {
        if h.base && !self.disks[d].tidied && self.disks[d].owner.is_some() {
            self.disks[d].tidied = true;
            for x in disk::superseded(&self.disks, d, h.pos) {
                self.disks[x].removed = true;
                self.log(|| format!("copy {x} removed: superseded by copy {d} at {:?}", h.pos));
            }
        }
    }

    /// Backup side: acknowledges the initial copy and the updates once the log holds them
    /// (`links::acknowledge`); without logs, at once.
    fn backup_ack(&mut self, pid: Pid) {
        let Some(r) = self.reps.get(&pid) else { return };
        let Some(mut a) = r.acker.clone().filter(|_| r.alive) else {
            return;
        };
        let held = r.disk.map(|d| self.disks[d].published);
        let mut msgs = Vec::new();
        if let Some((seq, n)) = a.synced {
            if held.is_some_and(|h| !h.base || h.bases < n || h.pos.seq < seq) {
                return;
            }
            a.synced = None;
            a.acked = a.acked.max(seq);
            msgs.push(Msg::Synced { seq, pid });
        }
        let upto = held.map_or(a.want, |h| a.want.min(h.pos.seq));
        if upto > a.acked {
            a.acked = upto;
            msgs.push(Msg::Ack { seq: upto });
        }
        let conn = a.conn;
        if let Some(r) = self.reps.get_mut(&pid) {
            r.acker = Some(a);
        }
        for m in msgs {
            self.send(conn, Addr::Rep(pid), CONTROL, m);
        }
    }

    /// A replica's process ends: what its log keeps (`Death::Exit`: the store's last flush).
    fn disk_dies(&mut self, d: DiskId, how: Death) {
        let keep_cache = self.p.kill_keeps_page_cache;
        let drng = &mut self.drng;
        let disk = &mut self.disks[d];
        match how {
            Death::Exit => {
                disk.flush();
                disk.crash(|n| n);
            }
            Death::Kill => disk.crash(|n| if keep_cache { n } else { 0 }),
            Death::Power => disk.crash(|n| torn(drng, n)),
        }
    }

    /// A power cut of `host`: its replicas die, its directories lose what was not synced.
    fn power_cut(&mut self, host: u8) {
        let victims: Vec<Pid> = self
            .reps
            .values()
            .filter(|r| r.alive && r.host == host)
            .map(|r| r.pid)
            .collect();
        for pid in victims {
            self.kill(Addr::Rep(pid), Death::Power);
        }
        for d in 0..self.disks.len() {
            if self.disks[d].host == host && self.disks[d].owner.is_none() {
                let drng = &mut self.drng;
                self.disks[d].lose_page_cache(|n| torn(drng, n));
            }
        }
    }

    // ---- network ----

    fn open(&mut self, a: Addr, b: Addr, kind: ConnKind) -> ConnId {
        let id = self.conns.len() as ConnId;
        self.conns.push(Conn {
            a,
            b,
            kind,
            open: true,
            link: None,
            last: [[0; STREAMS]; 2],
            proxy_gen: self.proxy_starts,
            sent: [[0; STREAMS]; 2],
            delivered: [[0; STREAMS]; 2],
            blocked_since: None,
        });
        if !self.exists(b) {
            // Nobody there: the attempt times out like any unanswered handshake.
            self.conns[id as usize].open = false;
        } else {
            self.check_blocked(id);
        }
        id
    }

    fn blocked(&self, from: Addr, to: Addr) -> bool {
        self.cuts.contains(&(from, to)) || self.paused(from) || self.paused(to)
    }

    fn check_blocked(&mut self, c: ConnId) {
        let conn = &self.conns[c as usize];
        if !conn.open {
            return;
        }
        let b = self.blocked(conn.a, conn.b) || self.blocked(conn.b, conn.a);
        if b && conn.blocked_since.is_none() {
            self.conns[c as usize].blocked_since = Some(self.now);
            let at = self.now + self.p.idle_timeout;
            self.at(at, Ev::ConnCheck(c));
        } else if !b {
            self.conns[c as usize].blocked_since = None;
        }
    }

    fn recheck_all(&mut self) {
        for c in 0..self.conns.len() {
            self.check_blocked(c as ConnId);
        }
    }

    fn send(&mut self, c: ConnId, from: Addr, stream: usize, msg: Msg) {
        let Some(conn) = self.conns.get(c as usize) else {
            return;
        };
        if !conn.open {
            return;
        }
        let kind = conn.kind;
        let (to, dir) = if conn.a == from {
            (conn.b, 0)
        } else {
            (conn.a, 1)
        };
        let delay = self.rng.range(1, 4);
        let at = (self.now + delay).max(conn.last[dir][stream]);
        let cn = &mut self.conns[c as usize];
        cn.last[dir][stream] = at;
        cn.sent[dir][stream] += 1;
        let no = cn.sent[dir][stream];
        // Duplicates model re-sent reports and decisions between proxy and replicas (a stream
        // itself never duplicates nor reorders: replication updates are never duplicated).
        let dup = stream == CONTROL
            && kind == ConnKind::Proxy
            && self.duplicate > 0
            && !matches!(msg, Msg::Hello { .. });
        if dup {
            self.duplicate -= 1;
            let again = msg.clone();
            let at2 = at + self.rng.range(1, 20);
            self.conns[c as usize].last[dir][stream] = at2;
            self.at(
                at2,
                Ev::Deliver {
                    conn: c,
                    to,
                    stream,
                    no,
                    msg: again,
                },
            );
        }
        self.at(
            at,
            Ev::Deliver {
                conn: c,
                to,
                stream,
                no,
                msg,
            },
        );
    }

    fn close(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !conn.open {
            return;
        }
        conn.open = false;
        let (a, b) = (conn.a, conn.b);
        self.at(self.now + 1, Ev::Down { conn: c, to: a });
        self.at(self.now + 1, Ev::Down { conn: c, to: b });
    }

    // ---- the event loop ----

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                conn,
                to,
                stream,
                no,
                msg,
            } => {
                let Some(cn) = self.conns.get(conn as usize) else {
                    return;
                };
                if !cn.open || !self.exists(to) {
                    return;
                }
                let from = if cn.a == to { cn.b } else { cn.a };
                let dir = usize::from(cn.a == to);
                // Held while the path is cut or a side is paused (retransmitted later), and
                // never ahead of an earlier message of its stream.
                if self.blocked(from, to) || no > cn.delivered[dir][stream] + 1 {
                    let at = self.now + if self.blocked(from, to) { 20 } else { 1 };
                    self.at(
                        at,
                        Ev::Deliver {
                            conn,
                            to,
                            stream,
                            no,
                            msg,
                        },
                    );
                    return;
                }
                let d = &mut self.conns[conn as usize].delivered[dir][stream];
                *d = (*d).max(no);
                self.deliver(conn, to, stream, msg);
            }
            Ev::Down { conn, to } => {
                if !self.exists(to) {
                    return;
                }
                if self.paused(to) {
                    let at = self.now + 20;
                    self.at(at, Ev::Down { conn, to });
                    return;
                }
                self.down(conn, to);
            }
            Ev::Tick(a) => self.tick(a),
            Ev::ProxyTick(n) => {
                if n == self.proxy_starts && self.proxy.is_some() {
                    let period = (self.p.heartbeat_interval / 2).max(5);
                    self.at(self.now + period, Ev::ProxyTick(n));
                    if !self.proxy_paused {
                        self.proxy_step(router::Input::Tick);
                    }
                }
            }
            Ev::ClientNext(c) => self.client_next(c),
            Ev::ConnCheck(c) => {
                let conn = &self.conns[c as usize];
                if conn.open
                    && conn
                        .blocked_since
                        .is_some_and(|s| s + self.p.idle_timeout <= self.now)
                {
                    let (a, b) = (conn.a, conn.b);
                    self.conns[c as usize].open = false;
                    self.log(|| format!("connection {c} {a:?}<->{b:?} timed out"));
                    self.at(self.now, Ev::Down { conn: c, to: a });
                    self.at(self.now, Ev::Down { conn: c, to: b });
                }
            }
            Ev::Fault(i) => self.fault(i),
            Ev::Heal(i) => self.heal(i),
            Ev::ProxyStart { with_state } => self.start_proxy(with_state),
            Ev::ProxyPersisted { n, state } => self.proxy_persisted(n, state),
            Ev::Resume(a) => {
                self.log(|| format!("{a:?} resumes"));
                match a {
                    Addr::Proxy => self.proxy_paused = false,
                    Addr::Rep(p) => {
                        if let Some(r) = self.reps.get_mut(&p) {
                            r.paused = false;
                        }
                    }
                    Addr::Client(_) => {}
                }
                self.recheck_all();
            }
            Ev::ConnectTimeout { pid, conn } => {
                let Some(r) = self.reps.get(&pid) else { return };
                if r.alive && r.proxy_conn == Some(conn) && !r.welcomed {
                    if r.paused {
                        let at = self.now + 20;
                        self.at(at, Ev::ConnectTimeout { pid, conn });
                        return;
                    }
                    self.close(conn);
                    if let Some(r) = self.reps.get_mut(&pid) {
                        r.proxy_conn = None;
                    }
                    self.rep_step(pid, replica::Input::ProxyConnectFailed);
                }
            }
            Ev::BackupReach { pid, id, deadline } => self.backup_reach(pid, id, deadline),
            Ev::BindBackupSap { pid, deadline } => {
                if !self.exists(Addr::Rep(pid)) {
                    return;
                }
                if self.backup_sap.is_none_or(|o| !self.exists(Addr::Rep(o))) {
                    self.backup_sap = Some(pid);
                    self.at(self.now + 1, Ev::Tick(Addr::Rep(pid)));
                } else if self.now >= deadline {
                    self.log(|| format!("replica {pid} cannot bind BACKUP_SAP: exits"));
                    self.kill(Addr::Rep(pid), Death::Exit);
                } else {
                    self.at(self.now + 20, Ev::BindBackupSap { pid, deadline });
                }
            }
            Ev::TakePrimarySaps { pid } => {
                if !self.exists(Addr::Rep(pid)) {
                    return;
                }
                if self
                    .primary_saps
                    .is_none_or(|o| o == pid || !self.exists(Addr::Rep(o)))
                {
                    self.primary_saps = Some(pid);
                    self.rep_step(pid, replica::Input::PromotionDone);
                } else {
                    self.at(self.now + 20, Ev::TakePrimarySaps { pid });
                }
            }
            Ev::CloseConn(c) => self.close(c),
            Ev::DiskGroup { disk, life } => self.disk_group(disk, life),
            Ev::DiskSynced { disk, life, upto } => self.disk_synced(disk, life, upto),
            Ev::Operator { attempt, proxy } => self.operator(attempt, proxy),
        }
    }

    fn tick(&mut self, a: Addr) {
        if !self.exists(a) {
            return;
        }
        match a {
            Addr::Proxy => {}
            Addr::Rep(pid) => {
                self.at(self.now + self.p.heartbeat_interval, Ev::Tick(a));
                if self.paused(a) {
                    return;
                }
                // The backup's ping task.
                if let Some(r) = self.reps.get(&pid)
                    && r.machine.role() == Role::Backup
                {
                    let beat = r.beat.filter(|c| self.conns[*c as usize].open);
                    let received = r.kv.seq;
                    let c = match beat {
                        Some(c) => Some(c),
                        None => self.primary_saps.map(|owner| {
                            let c = self.open(a, Addr::Rep(owner), ConnKind::Beat);
                            if let Some(r) = self.reps.get_mut(&pid) {
                                r.beat = Some(c);
                            }
                            c
                        }),
                    };
                    if let Some(c) = c {
                        self.send(c, a, CONTROL, Msg::Ping { received });
                    }
                }
                self.rep_step(pid, replica::Input::Tick);
            }
            Addr::Client(_) => {}
        }
    }

    // ---- faults ----

    fn resolve(&self, t: Target) -> Option<Addr> {
        match t {
            Target::Proxy => self.proxy.as_ref().map(|_| Addr::Proxy),
            Target::Primary => self
                .reps
                .values()
                .filter(|r| r.alive && r.machine.role() == Role::Primary)
                .max_by_key(|r| r.machine.epoch())
                .map(|r| Addr::Rep(r.pid)),
            Target::Backup => self
                .reps
                .values()
                .filter(|r| r.alive && r.machine.role() == Role::Backup)
                .max_by_key(|r| r.pid)
                .map(|r| Addr::Rep(r.pid)),
        }
    }

    fn fault(&mut self, i: usize) {
        let f = self.faults[i].1.clone();
        self.log(|| format!("FAULT {f:?}"));
        match f {
            Fault::Kill(t) => {
                if let Some(a) = self.resolve(t) {
                    if let Addr::Rep(p) = a {
                        self.replica_kills += 1;
                        // Killing a primary that has no promotable backup kills the only full
                        // copy: from then on the service may wait for an operator.
                        // (The witness must know it too: it learns it from the next heartbeat.)
                        let witness_knows = match &self.proxy {
                            Some(px) => px.router.witness().backup_synced(),
                            None => self
                                .disk
                                .as_ref()
                                .is_some_and(|(_, d)| d.synced_backup.is_some()),
                        };
                        if self.reps.get(&p).is_some_and(|r| {
                            r.machine.role() == Role::Primary
                                && !(r.machine.has_promotable_backup() && witness_knows)
                        }) {
                            self.only_copy_killed = true;
                        }
                    }
                    self.kill(a, Death::Kill);
                }
            }
            Fault::ProxyRestart { after, with_state } => {
                if !with_state {
                    self.stateless_restarts += 1;
                }
                if self.proxy.is_some() {
                    self.kill(Addr::Proxy, Death::Kill);
                }
                if !self.proxy_start_pending {
                    self.proxy_start_pending = true;
                    self.at(self.now + after, Ev::ProxyStart { with_state });
                }
            }
            Fault::Pause(t, ms) => {
                if let Some(a) = self.resolve(t) {
                    match a {
                        Addr::Proxy => self.proxy_paused = true,
                        Addr::Rep(p) => {
                            if let Some(r) = self.reps.get_mut(&p) {
                                r.paused = true;
                            }
                        }
                        Addr::Client(_) => {}
                    }
                    self.recheck_all();
                    self.at(self.now + ms, Ev::Resume(a));
                }
            }
            Fault::Cut { a, b, one_way, ms } => {
                if let (Some(x), Some(y)) = (self.resolve(a), self.resolve(b)) {
                    self.cuts.push((x, y));
                    self.resolved[i] = vec![x, y];
                    if !one_way {
                        self.cuts.push((y, x));
                    }
                    self.recheck_all();
                    self.at(self.now + ms, Ev::Heal(i));
                }
            }
            Fault::Duplicate(n) => self.duplicate += n,
            Fault::PowerCut(t) => {
                if let Some(Addr::Rep(p)) = self.resolve(t) {
                    let host = self.reps[&p].host;
                    self.replica_kills += 1;
                    self.power_cuts += 1;
                    self.power_cut(host);
                }
            }
            Fault::PowerCutAll {
                proxy_after,
                restart_after,
            } => {
                self.replica_kills += 2;
                self.power_cuts += 1;
                for h in 0..self.hosts {
                    self.power_cut(h);
                }
                if self.proxy.is_some() {
                    self.kill(Addr::Proxy, Death::Power);
                }
                if !self.proxy_start_pending {
                    self.proxy_start_pending = true;
                    self.at(self.now + proxy_after, Ev::ProxyStart { with_state: true });
                }
                self.at(
                    self.now + restart_after,
                    Ev::Operator {
                        attempt: 0,
                        proxy: false,
                    },
                );
            }
            Fault::Restart => {
                // A dead replica, restarted on its host if a complete copy is there.
                let dead: Vec<(Pid, u8)> = self
                    .reps
                    .values()
                    .filter(|r| !r.alive && r.disk.is_some())
                    .map(|r| (r.pid, r.host))
                    .collect();
                if dead.is_empty() {
                    return;
                }
                let (pid, host) = *self.rng.pick(&dead);
                let host = self.operator_host(Some(host), 0);
                if matches!(disk::recover(&self.disks, host), Ok(None)) {
                    self.log(|| format!("no complete copy on host {host} to restart {pid} from"));
                    return;
                }
                self.restart_primary(host, 0);
            }
        }
    }

    /// An operator, once the faults are over (or after a power cut of everything), following
    /// docs/OPERATIONS.md: if no primary runs, stop what still runs (a stale backup would hold a
    /// directory) and start a primary from the logs ([`World::operator_host`]). If the proxy
    /// refuses it, run `up` again: the proxy restarts with its state file, then the primary;
    /// refused again, the proxy restarts without its state file (as on a new proxy host: it
    /// learns the replicas' epochs), then the primary (`operator_escalation` says how far).
    fn operator(&mut self, attempt: u32, proxy: bool) {
        let serving = self
            .reps
            .values()
            .any(|r| r.alive && r.machine.role() == Role::Primary);
        if serving || attempt > 2 * u32::from(self.hosts) + 2 {
            return;
        }
        if proxy {
            let with_state = attempt < 2;
            self.log(|| format!("operator: restart the proxy (state file: {with_state})"));
            self.operator_proxy_restarts += 1;
            if !with_state {
                // The state file is moved away; the proxy starts a new one.
                self.operator_state_discarded += 1;
                self.disk = None;
            }
            if self.proxy.is_some() {
                self.kill(Addr::Proxy, Death::Kill);
            }
            if !self.proxy_start_pending {
                self.proxy_start_pending = true;
                self.at(self.now + 50, Ev::ProxyStart { with_state: true });
            }
            self.at(
                self.now + 100,
                Ev::Operator {
                    attempt,
                    proxy: false,
                },
            );
            return;
        }
        let live: Vec<Pid> = self
            .reps
            .values()
            .filter(|r| r.alive)
            .map(|r| r.pid)
            .collect();
        for pid in live {
            self.kill(Addr::Rep(pid), Death::Exit);
        }
        let host = self.operator_host(None, attempt);
        self.log(|| format!("operator: restart a primary on host {host} (attempt {attempt})"));
        if self.restart_primary(host, attempt + 1).is_none() {
            self.at(
                self.now + 100,
                Ev::Operator {
                    attempt: attempt + 1,
                    proxy: false,
                },
            );
        }
    }

    /// Where an operator starts a primary from the logs. Careful (OPERATIONS.md): on the host
    /// whose copy is the most advanced (each host's recovery logs its position). Otherwise: on
    /// `dead`'s host (the replica that died), or any host holding a complete copy.
    fn operator_host(&mut self, dead: Option<u8>, attempt: u32) -> u8 {
        let copies: Vec<(u8, disk::Pos)> = self
            .operator_hosts
            .iter()
            .filter_map(|h| {
                let pos = match disk::recover(&self.disks, *h) {
                    Ok(Some((_, c))) => c.held.pos,
                    Err(d) => self.disks[d].read().held.pos,
                    Ok(None) => return None,
                };
                Some((*h, pos))
            })
            .collect();
        if self.p.careful_operator {
            // (Ties: the first in the operator's order.)
            let mut best: Option<(u8, disk::Pos)> = None;
            for (h, pos) in &copies {
                if best.is_none_or(|(_, b)| *pos > b) {
                    best = Some((*h, *pos));
                }
            }
            return best.map_or(self.operator_hosts[0], |(h, _)| h);
        }
        if let Some(h) = dead.filter(|d| copies.iter().any(|(h, _)| h == d)) {
            return h;
        }
        match copies.len() {
            0 => self.operator_hosts[0],
            n => copies[attempt as usize % n].0,
        }
    }

    fn heal(&mut self, i: usize) {
        if let [x, y] = self.resolved[i][..] {
            self.cuts.retain(|c| *c != (x, y) && *c != (y, x));
            self.log(|| format!("heal cut {x:?} {y:?}"));
            self.recheck_all();
        }
    }

    // ---- clients ----

    fn client_next(&mut self, c: u32) {
        if self.now >= self.end {
            return;
        }
        let cl = &self.clients[c as usize];
        if cl.inflight.is_some() {
            return;
        }
        let conn = cl.conn.filter(|x| self.conns[*x as usize].open);
        let conn = match conn {
            Some(x) => x,
            None => {
                if self.proxy.is_none() {
                    self.at(self.now + 50, Ev::ClientNext(c));
                    return;
                }
                let x = self.open(Addr::Client(c), Addr::Proxy, ConnKind::Client);
                self.clients[c as usize].conn = Some(x);
                x
            }
        };
        let key = self.rng.range(0, self.p.keys as u64 - 1) as u32;
        let idx = self.hist.len() as u64;
        let kv = match self.rng.range(0, 9) {
            0..=3 => KvOp::Get(key),
            4..=6 => KvOp::Put(key, idx),
            7 => KvOp::Post(key, idx),
            _ => KvOp::Delete(key),
        };
        let op = self.hist.len();
        self.hist.push(Hist {
            client: c,
            kv: kv.clone(),
            invoke: self.ns(),
            complete: None,
            outcome: HistOutcome::Unknown,
        });
        self.clients[c as usize].inflight = Some(op);
        self.log(|| format!("client {c}: op {op} {kv:?}"));
        self.send(conn, Addr::Client(c), RELAY, Msg::ClientReq { op, kv });
    }

    fn client_done(&mut self, c: u32, op: usize, outcome: Option<Outcome<KvReply>>) {
        let cl = &mut self.clients[c as usize];
        if cl.inflight != Some(op) {
            return;
        }
        cl.inflight = None;
        let ns = self.ns();
        let h = &mut self.hist[op];
        h.outcome = match outcome {
            Some(Outcome::Reply(KvReply::Read(v))) => HistOutcome::Read(v.map(|v| v.to_string())),
            Some(Outcome::Reply(KvReply::Applied)) => HistOutcome::Applied,
            Some(Outcome::Reply(KvReply::Rejected)) => HistOutcome::Rejected,
            Some(Outcome::Reply(KvReply::Deleted(v))) => {
                HistOutcome::Deleted(v.map(|v| v.to_string()))
            }
            Some(Outcome::Unavailable) => HistOutcome::Failed,
            Some(Outcome::Unknown) | None => HistOutcome::Unknown,
        };
        if h.outcome != HistOutcome::Unknown {
            h.complete = Some(ns);
        }
        let o = h.outcome.clone();
        self.log(|| format!("client {c}: op {op} -> {o:?}"));
        let think = self.rng.range(0, 30);
        self.at(self.now + think, Ev::ClientNext(c));
    }

    // ---- deliveries ----

    fn deliver(&mut self, conn: ConnId, to: Addr, stream: usize, msg: Msg) {
        match to {
            Addr::Proxy => self.proxy_msg(conn, msg),
            Addr::Rep(pid) => self.rep_msg(pid, conn, stream, msg),
            Addr::Client(c) => {
                if let Msg::ClientResp { op, outcome } = msg {
                    self.client_done(c, op, Some(outcome));
                }
            }
        }
    }

    fn down(&mut self, conn: ConnId, to: Addr) {
        let kind = self.conns[conn as usize].kind;
        match to {
            Addr::Proxy => {
                if kind == ConnKind::Proxy
                    && self.conns[conn as usize].proxy_gen == self.proxy_starts
                    && let Some(link) = self.conns[conn as usize].link
                    && let Some(p) = self.proxy.as_mut()
                    && p.links.remove(&link).is_some()
                {
                    self.proxy_step(router::Input::Witness(witness::Input::LinkDown { link }));
                }
            }
            Addr::Client(c) => {
                if self.clients[c as usize].conn == Some(conn) {
                    self.clients[c as usize].conn = None;
                    if let Some(op) = self.clients[c as usize].inflight {
                        self.client_done(c, op, None);
                    }
                }
            }
            Addr::Rep(pid) => {
                let Some(r) = self.reps.get_mut(&pid) else {
                    return;
                };
                match kind {
                    ConnKind::Proxy => {
                        if r.proxy_conn == Some(conn) {
                            r.proxy_conn = None;
                            r.held.clear();
                            let was = std::mem::take(&mut r.welcomed);
                            let input = if was {
                                replica::Input::ProxyDown
                            } else {
                                replica::Input::ProxyConnectFailed
                            };
                            self.rep_step(pid, input);
                        }
                    }
                    ConnKind::Repl(id) => {
                        if r.inbound == Some(conn) {
                            r.inbound = None;
                            self.rep_step(pid, replica::Input::ReplicationDown { stop: false });
                        } else if r.backup.is_some_and(|(_, c)| c == conn) {
                            r.backup = None;
                            self.rep_step(
                                pid,
                                replica::Input::BackupDown {
                                    id,
                                    why: "replication link closed".into(),
                                },
                            );
                        }
                    }
                    ConnKind::Beat => {
                        if r.beat == Some(conn) {
                            r.beat = None;
                        }
                    }
                    ConnKind::Client => {}
                }
            }
        }
    }

    // ---- the proxy's executor (mirrors src/proxy.rs) ----

    fn proxy_msg(&mut self, conn: ConnId, msg: Msg) {
        let link = self.conns[conn as usize].link;
        match msg {
            Msg::Hello {
                role,
                epoch,
                pid,
                primary,
            } => {
                let Some(p) = self.proxy.as_mut() else { return };
                let link = p.next_link;
                p.next_link += 1;
                p.links.insert(link, conn);
                self.conns[conn as usize].link = Some(link);
                self.proxy_step(router::Input::Witness(witness::Input::Hello {
                    link,
                    role,
                    epoch,
                    info: info(pid),
                    primary: primary.map(|p| p.to_string()),
                }));
            }
            Msg::RelayReady => {
                if let Some(link) = link
                    && self
                        .proxy
                        .as_ref()
                        .is_some_and(|p| p.links.contains_key(&link))
                {
                    self.proxy_step(router::Input::RelayReady { link });
                }
            }
            Msg::Heartbeat {
                epoch,
                synced_backup,
                echo,
            } => {
                if let Some(link) = link {
                    self.proxy_step(router::Input::Witness(witness::Input::Heartbeat {
                        link,
                        epoch,
                        synced_backup,
                        echo,
                    }));
                }
            }
            Msg::PeerLost { epoch } => {
                if let Some(link) = link {
                    self.proxy_step(router::Input::Witness(witness::Input::PeerLost {
                        link,
                        epoch,
                    }));
                }
            }
            Msg::Reply { rid, reply } => {
                if let Some(link) = link {
                    self.proxy_step(router::Input::Replies {
                        link,
                        replies: vec![(rid, reply)],
                    });
                }
            }
            Msg::ClientReq { op, kv } => {
                let Addr::Client(c) = self.conns[conn as usize].a else {
                    return;
                };
                let write = kv.is_write();
                self.proxy_step(router::Input::Request {
                    payload: (c, op),
                    write,
                    wait: 0,
                });
            }
            _ => {}
        }
    }

    fn proxy_step(&mut self, input: router::Input<Pending, KvReply>) {
        let now = self.now;
        let Some(p) = self.proxy.as_mut() else { return };
        let mut actions = std::mem::take(&mut p.actions);
        p.router.step(now, input, &mut actions);
        for a in actions.drain(..) {
            match self.proxy.as_mut() {
                Some(p) if p.persisting => p.held.push_back(a),
                Some(_) => self.proxy_apply(a),
                None => {}
            }
        }
        if let Some(p) = self.proxy.as_mut() {
            p.actions = actions;
        }
    }

    /// The state file write of incarnation `n` is done: it is on the disk, the actions held
    /// behind it go out in order (up to the next `Persist`), then the witness hears `Persisted`.
    fn proxy_persisted(&mut self, n: u64, state: Durable) {
        if n != self.proxy_starts {
            // That proxy died with its write: the state file is as before.
            return;
        }
        if self.proxy_paused {
            self.at(self.now + 20, Ev::ProxyPersisted { n, state });
            return;
        }
        let Some(p) = self.proxy.as_mut() else { return };
        self.disk = Some((p.incarnation, state));
        p.persisting = false;
        while let Some(a) = self
            .proxy
            .as_mut()
            .filter(|p| !p.persisting)
            .and_then(|p| p.held.pop_front())
        {
            self.proxy_apply(a);
        }
        self.proxy_step(router::Input::Witness(witness::Input::Persisted));
    }

    fn proxy_conn(&self, link: LinkId) -> Option<ConnId> {
        self.proxy
            .as_ref()
            .and_then(|p| p.links.get(&link).copied())
    }

    fn proxy_apply(&mut self, a: router::Action<Pending, KvReply>) {
        use witness::Action as W;
        match a {
            router::Action::Forward { link, rid } => {
                let op = self
                    .proxy
                    .as_ref()
                    .and_then(|p| p.router.payload(rid))
                    .map(|(_, op)| self.hist[*op].kv.clone());
                if let (Some(c), Some(op)) = (self.proxy_conn(link), op) {
                    self.send(c, Addr::Proxy, RELAY, Msg::Request { rid, op });
                }
            }
            router::Action::Answer { payload, outcome } => {
                let (c, op) = payload;
                if let Some(conn) = self.clients[c as usize].conn
                    && self.conns[conn as usize].open
                {
                    self.send(conn, Addr::Proxy, RELAY, Msg::ClientResp { op, outcome });
                }
            }
            router::Action::Watermark { link, rid } => {
                if let Some(c) = self.proxy_conn(link) {
                    self.send(c, Addr::Proxy, RELAY, Msg::Watermark(rid));
                }
            }
            router::Action::Witness(w) => {
                if self.p.trace && !matches!(w, W::HeartbeatAck { .. }) {
                    self.log(|| format!("proxy: {w:?}"));
                }
                match w {
                    W::Persist(d) => {
                        let Some(p) = self.proxy.as_mut() else { return };
                        if !p.with_state {
                            // Nothing to write: done at once, as in `src/proxy.rs`.
                            self.proxy_step(router::Input::Witness(witness::Input::Persisted));
                            return;
                        }
                        p.persisting = true;
                        let (lo, hi) = self.p.proxy_disk_delay;
                        let (slow, slowest) = self.p.proxy_slow_disk;
                        let delay = if self.prng.chance(slow) {
                            self.prng.range(hi, slowest)
                        } else {
                            self.prng.range(lo, hi)
                        };
                        let n = self.proxy_starts;
                        self.at(self.now + delay, Ev::ProxyPersisted { n, state: d });
                    }
                    W::HeartbeatAck { link, epoch, n } => {
                        if let Some(c) = self.proxy_conn(link) {
                            self.send(c, Addr::Proxy, CONTROL, Msg::HbAck { epoch, n });
                        }
                    }
                    W::Welcome { link, epoch, .. } => {
                        if let Some(c) = self.proxy_conn(link) {
                            self.send(c, Addr::Proxy, CONTROL, Msg::Welcome { epoch });
                        }
                    }
                    W::Grant { link, epoch } => {
                        if let Some(c) = self.proxy_conn(link) {
                            self.send(c, Addr::Proxy, CONTROL, Msg::Grant { epoch });
                        }
                    }
                    W::Fence { link, epoch } => {
                        if let Some(c) = self.proxy.as_mut().and_then(|p| p.links.remove(&link)) {
                            self.send(c, Addr::Proxy, CONTROL, Msg::Fence { epoch });
                            self.at(self.now + 200, Ev::CloseConn(c));
                        }
                    }
                    W::Drop { link } => {
                        if let Some(c) = self.proxy.as_mut().and_then(|p| p.links.remove(&link)) {
                            self.at(self.now + 200, Ev::CloseConn(c));
                        }
                    }
                    W::Notify { kind, .. } => {
                        if kind == "failover" {
                            self.failovers += 1;
                        }
                    }
                    W::RouteTo { .. } | W::NoPrimary => {}
                }
            }
        }
    }

    // ---- a replica's executor (mirrors src/server/) ----

    // One arm per message, each with its own guard, reads better than guards in the patterns.
    #[allow(clippy::collapsible_match)]
    fn rep_msg(&mut self, pid: Pid, conn: ConnId, _stream: usize, msg: Msg) {
        let Some(r) = self.reps.get_mut(&pid) else {
            return;
        };
        let me = Addr::Rep(pid);
        match msg {
            Msg::Welcome { epoch } => {
                if r.proxy_conn == Some(conn) && !r.welcomed {
                    r.welcomed = true;
                    r.ever_welcomed = true;
                    self.send(conn, me, RELAY, Msg::RelayReady);
                    self.rep_step(pid, replica::Input::ProxyUp { epoch });
                }
            }
            Msg::Fence { epoch } => {
                if r.proxy_conn == Some(conn) {
                    let input = if r.welcomed {
                        replica::Input::Fence { epoch }
                    } else {
                        replica::Input::ProxyRefused { epoch }
                    };
                    self.rep_step(pid, input);
                }
            }
            Msg::Grant { epoch } => {
                if r.proxy_conn == Some(conn) && r.welcomed {
                    self.rep_step(pid, replica::Input::Grant { epoch });
                }
            }
            Msg::HbAck { epoch, n } => {
                if r.proxy_conn == Some(conn) && r.welcomed {
                    self.rep_step(pid, replica::Input::HeartbeatAck { epoch, n });
                }
            }
            Msg::Request { rid, op } => {
                if r.proxy_conn != Some(conn) {
                    return;
                }
                if r.machine.role() == Role::Primary {
                    self.store_request(pid, rid, op);
                } else {
                    r.held.push((rid, op));
                }
            }
            Msg::Watermark(w) => {
                if r.proxy_conn != Some(conn) || r.machine.role() != Role::Primary {
                    return;
                }
                r.kv.watermark(w);
                if let Some((_, c)) = r.backup {
                    self.send(c, me, CONTROL, Msg::ReplWatermark(w));
                }
            }
            // backup side: replication
            Msg::ReplHello { epoch } => {
                if r.machine.role() == Role::Backup && epoch >= r.machine.epoch() {
                    r.acker = Some(Acker {
                        conn,
                        synced: None,
                        want: 0,
                        acked: 0,
                    });
                    if let Some(old) = r.inbound.replace(conn) {
                        self.close(old);
                    }
                } else {
                    self.close(conn);
                }
            }
            Msg::Snapshot(kv) => {
                if r.inbound == Some(conn) {
                    // The store resets the space and logs the copy: Reset, pairs, Base.
                    r.kv = (*kv).clone();
                    let seq = r.kv.seq;
                    let epoch = r.logged_epoch;
                    r.bases_sent += 1;
                    let n = r.bases_sent;
                    if let Some(a) = &mut r.acker {
                        a.synced = Some((seq, n));
                    }
                    self.log_rec(pid, Rec::Reset);
                    self.log_rec(pid, Rec::Base { epoch, kv });
                    self.backup_ack(pid);
                }
            }
            Msg::Update {
                seq,
                rid,
                change,
                reply,
            } => {
                if r.inbound == Some(conn) {
                    let kseq = r.kv.seq;
                    if self.p.trace {
                        let line = format!(
                            "{:>6} replica {pid} update seq {seq} (have {kseq}) {change:?}",
                            self.now
                        );
                        self.trace.push(line);
                    }
                    let Some(r) = self.reps.get_mut(&pid) else {
                        return;
                    };
                    if let Some(a) = &mut r.acker {
                        a.want = a.want.max(seq);
                    }
                    if seq > r.kv.seq {
                        r.kv.apply(&change);
                        r.kv.seq = seq;
                        r.kv.dedupe.insert(rid, reply.clone());
                        let epoch = r.logged_epoch;
                        self.log_rec(
                            pid,
                            Rec::Change {
                                epoch,
                                seq,
                                rid,
                                change,
                                reply,
                            },
                        );
                    }
                    self.backup_ack(pid);
                }
            }
            Msg::ReplWatermark(w) => {
                if r.inbound == Some(conn) {
                    r.kv.watermark(w);
                }
            }
            // primary side: replication acks and heartbeats
            Msg::Synced { seq, pid: handle } => {
                if let Some((id, c)) = r.backup
                    && c == conn
                {
                    self.rep_step(
                        pid,
                        replica::Input::BackupSynced {
                            id,
                            seq,
                            handle: handle.to_string(),
                        },
                    );
                }
            }
            Msg::Ack { seq } => {
                if let Some((id, c)) = r.backup
                    && c == conn
                {
                    self.rep_step(pid, replica::Input::BackupAck { id, seq });
                }
            }
            Msg::Ping { received } => {
                if self.primary_saps == Some(pid) {
                    self.send(conn, me, CONTROL, Msg::Pong);
                    self.rep_step(pid, replica::Input::Ping { received });
                }
            }
            Msg::Pong => {
                if r.beat == Some(conn) {
                    self.rep_step(pid, replica::Input::Pong);
                }
            }
            Msg::Terminate { epoch } => self.rep_step(pid, replica::Input::Terminate { epoch }),
            _ => {}
        }
    }

    fn store_request(&mut self, pid: Pid, rid: u64, op: KvOp) {
        let Some(r) = self.reps.get_mut(&pid) else {
            return;
        };
        match r.kv.request(rid, &op) {
            StoreOut::Read {
                after_seq,
                rid,
                reply,
            } => self.rep_step(
                pid,
                replica::Input::Read {
                    after_seq,
                    reply: Rel {
                        rid,
                        reply,
                        seq: after_seq,
                        write: false,
                    },
                },
            ),
            StoreOut::Write {
                seq,
                rid,
                change,
                reply,
            } => {
                let epoch = r.logged_epoch;
                let backup = r.backup;
                self.log_rec(
                    pid,
                    Rec::Change {
                        epoch,
                        seq,
                        rid,
                        change,
                        reply: reply.clone(),
                    },
                );
                if let Some((_, c)) = backup {
                    let update = Msg::Update {
                        seq,
                        rid,
                        change,
                        reply: reply.clone(),
                    };
                    self.send(c, Addr::Rep(pid), CONTROL, update);
                }
                self.rep_step(
                    pid,
                    replica::Input::Write {
                        seq,
                        reply: Rel {
                            rid,
                            reply,
                            seq,
                            write: true,
                        },
                    },
                );
            }
        }
    }

    fn rep_step(&mut self, pid: Pid, input: replica::Input<Rel>) {
        let now = self.now;
        let Some(r) = self.reps.get_mut(&pid) else {
            return;
        };
        if !r.alive {
            return;
        }
        let mut actions = std::mem::take(&mut r.actions);
        r.machine.step(now, input, &mut actions);
        // The epoch rose: logged (and carried by every later change) before anything the
        // actions lead to (`server::Replica::step`).
        let epoch = r.machine.epoch();
        if epoch > r.logged_epoch {
            r.logged_epoch = epoch;
            self.log_rec(pid, Rec::Epoch(epoch));
        }
        for a in actions.drain(..) {
            self.rep_apply(pid, a);
        }
        let Some(r) = self.reps.get_mut(&pid) else {
            return;
        };
        r.actions = actions;
        if r.alive && r.machine.role() == Role::Primary && !r.held.is_empty() {
            for (rid, op) in std::mem::take(&mut r.held) {
                self.store_request(pid, rid, op);
            }
        }
    }

    fn rep_apply(&mut self, pid: Pid, a: replica::Action<Rel>) {
        use replica::Action as A;
        let me = Addr::Rep(pid);
        if self.p.trace && !matches!(a, A::Heartbeat { .. } | A::Release(_)) {
            self.log(|| format!("replica {pid}: {a:?}"));
        }
        let Some(r) = self.reps.get_mut(&pid) else {
            return;
        };
        if !r.alive {
            return;
        }
        match a {
            A::ConnectProxy { role, epoch } => {
                let primary = r.primary_handle.filter(|_| role == Role::Backup);
                let c = self.open(me, Addr::Proxy, ConnKind::Proxy);
                if let Some(r) = self.reps.get_mut(&pid) {
                    r.proxy_conn = Some(c);
                    r.welcomed = false;
                }
                self.send(
                    c,
                    me,
                    CONTROL,
                    Msg::Hello {
                        role,
                        epoch,
                        pid,
                        primary,
                    },
                );
                let at = self.now + self.p.connect_timeout;
                self.at(at, Ev::ConnectTimeout { pid, conn: c });
            }
            A::Heartbeat {
                epoch,
                synced_backup,
                echo,
            } => {
                if let (Some(c), true) = (r.proxy_conn, r.welcomed) {
                    let m = Msg::Heartbeat {
                        epoch,
                        synced_backup,
                        echo,
                    };
                    self.send(c, me, CONTROL, m);
                }
            }
            A::PeerLost { epoch } => {
                if let (Some(c), true) = (r.proxy_conn, r.welcomed) {
                    self.send(c, me, CONTROL, Msg::PeerLost { epoch });
                }
            }
            A::Release(Rel {
                rid,
                reply,
                seq,
                write,
            }) => {
                if !matches!(reply, KvReply::Read(_)) {
                    let epoch = r.machine.epoch();
                    let recovered = r.recovered;
                    let top = if write { seq } else { 0 };
                    match self.write_epochs.get(&epoch).copied() {
                        Some((other, released)) if other != pid => {
                            // A primary restarted from the logs goes on with the history of the
                            // epoch its copy ends in: allowed once the previous writer is gone,
                            // and only if that copy holds everything it released.
                            let continues = !self.exists(Addr::Rep(other))
                                && recovered.is_some_and(|(e, s)| e == epoch && s >= released);
                            // (Reported once: from now on it is this replica's epoch.)
                            self.write_epochs.insert(epoch, (pid, released.max(top)));
                            let gone = !self.exists(Addr::Rep(other));
                            match recovered {
                                _ if continues => {}
                                Some((e, s)) if gone && e == epoch => {
                                    self.violations.push(format!(
                                        "acknowledged writes lost: replica {pid} restarted from a copy at epoch {e}, update {s}, and serves epoch {epoch}, in which {other} acknowledged updates up to {released}"
                                    ));
                                }
                                _ => self.violations.push(format!(
                                    "two replicas acknowledged writes in epoch {epoch}: {other} (up to update {released}) and {pid} (started from {recovered:?})"
                                )),
                            }
                        }
                        other => {
                            let released = other.map_or(0, |(_, s)| s);
                            self.write_epochs.insert(epoch, (pid, released.max(top)));
                        }
                    }
                }
                if let Some(r) = self.reps.get(&pid)
                    && let (Some(c), true) = (r.proxy_conn, r.welcomed)
                {
                    self.send(c, me, RELAY, Msg::Reply { rid, reply });
                }
            }
            A::StartBackup { id, .. } => {
                let host = if self.remote {
                    // The launch command runs it on the other host.
                    1 - r.host
                } else {
                    r.host
                };
                let child = self.spawn_replica(Role::Backup, Some(pid), host);
                if let Some(r) = self.reps.get_mut(&pid) {
                    r.children.insert(id, child);
                }
                let reach = self.p.backup_sync_timeout.min(self.p.connect_timeout * 5);
                let deadline = self.now + reach;
                self.at(self.now + 5, Ev::BackupReach { pid, id, deadline });
            }
            A::SendSnapshot { id } => {
                if let Some((bid, c)) = r.backup
                    && bid == id
                {
                    let snap = Box::new(r.kv.clone());
                    self.send(c, me, CONTROL, Msg::Snapshot(snap));
                }
            }
            A::CloseBackup { id } => {
                if let Some((bid, c)) = r.backup
                    && bid == id
                {
                    r.backup = None;
                    self.close(c);
                }
            }
            A::KillBackup { id } => {
                if let Some(child) = r.children.remove(&id)
                    && self.exists(Addr::Rep(child))
                {
                    self.kill(Addr::Rep(child), Death::Kill);
                }
            }
            A::Promote { .. } => {
                if let Some(c) = r.inbound.take() {
                    self.close(c);
                }
                if let Some(r) = self.reps.get_mut(&pid)
                    && let Some(c) = r.beat.take()
                {
                    self.close(c);
                }
                if self.backup_sap == Some(pid) {
                    self.backup_sap = None;
                }
            }
            A::TakeOver { epoch } => {
                let old = r.primary_handle;
                if let Some(old) = old.filter(|o| self.exists(Addr::Rep(*o))) {
                    if self.remote {
                        // A terminate message; a paused old primary never answers the handshake.
                        if !self.paused(Addr::Rep(old)) {
                            let c = self.open(me, Addr::Rep(old), ConnKind::Beat);
                            self.send(c, me, CONTROL, Msg::Terminate { epoch });
                        }
                    } else {
                        self.kill(Addr::Rep(old), Death::Kill);
                    }
                }
                self.at(self.now + 1, Ev::TakePrimarySaps { pid });
            }
            A::Exit { reason, .. } => {
                if r.operator > 0 && !r.ever_welcomed && reason == replica::ExitReason::Fenced {
                    // The proxy refused it: `up` again (the proxy too, with its state file),
                    // and the next host with a copy.
                    let attempt = r.operator;
                    let proxy = attempt <= u32::from(self.p.operator_escalation);
                    self.at(self.now + 100, Ev::Operator { attempt, proxy });
                }
                if reason == replica::ExitReason::ProxyLost {
                    // By design (SPEC §3): a server that loses the proxy for longer than
                    // proxy_loss_timeout saves (primary) and stops; an operator restarts it.
                    self.proxy_loss_exits += 1;
                }
                self.kill(me, Death::Exit)
            }
            A::Notify { .. } => {}
        }
    }

    fn backup_reach(&mut self, pid: Pid, id: BackupId, deadline: Millis) {
        let Some(r) = self.reps.get(&pid) else { return };
        if !r.alive || r.machine.role() != Role::Primary {
            return;
        }
        if r.paused {
            self.at(self.now + 20, Ev::BackupReach { pid, id, deadline });
            return;
        }
        let me = Addr::Rep(pid);
        let target = self
            .backup_sap
            .filter(|o| self.running(Addr::Rep(*o)) && !self.blocked(me, Addr::Rep(*o)));
        match target {
            Some(b) => {
                let c = self.open(me, Addr::Rep(b), ConnKind::Repl(id));
                let epoch = self.reps[&pid].machine.epoch();
                self.send(c, me, CONTROL, Msg::ReplHello { epoch });
                let attach = self.reps[&pid].machine.backup_id().is_none();
                if attach {
                    if let Some(r) = self.reps.get_mut(&pid) {
                        r.backup = Some((id, c));
                    }
                } else {
                    self.close(c);
                }
                self.rep_step(pid, replica::Input::BackupConnected { id });
            }
            None if self.now >= deadline => {
                self.rep_step(
                    pid,
                    replica::Input::BackupStartFailed {
                        id,
                        why: "unreachable".into(),
                    },
                );
            }
            None => self.at(self.now + 50, Ev::BackupReach { pid, id, deadline }),
        }
    }

    // ---- the checks ----

    fn finish(mut self, seed: u64, last_heal: Millis) -> Report {
        let history: Vec<HistOp> = self
            .hist
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (key, kind) = match h.kv {
                    KvOp::Get(k) => (k, OpKind::Get),
                    KvOp::Put(k, v) => (k, OpKind::Put(v.to_string())),
                    KvOp::Post(k, v) => (k, OpKind::Post(v.to_string())),
                    KvOp::Delete(k) => (k, OpKind::Delete),
                };
                HistOp {
                    id: i as u64,
                    client: h.client,
                    key: format!("k{key}"),
                    kind,
                    invoke_ns: h.invoke,
                    complete_ns: h.complete,
                    outcome: h.outcome.clone(),
                }
            })
            .collect();
        let mut by_key: BTreeMap<&str, Vec<HistOp>> = BTreeMap::new();
        for op in &history {
            by_key.entry(op.key.as_str()).or_default().push(op.clone());
        }
        for (key, ops) in by_key {
            match checker::check_key(&ops) {
                checker::Verdict::Linearizable => {}
                checker::Verdict::NotLinearizable { detail } => self
                    .violations
                    .push(format!("key {key} is not linearizable: {detail}")),
                checker::Verdict::Inconclusive { detail } => self
                    .violations
                    .push(format!("key {key}: checker inconclusive: {detail}")),
            }
        }
        // Liveness: after the last fault healed, writes complete again (unless two replicas
        // were killed: both copies may be gone).
        // (A proxy that lost its state cannot know which backup was synchronised: with a replica
        // killed as well, that is a double fault too.)
        // With logs and the operator, every run: whatever happened, once the faults are over an
        // operator restarts a primary from the logs if none runs, and writes must succeed.
        let liveness_checked = (self.p.logs && self.p.operator)
            || (self.replica_kills < 2
                && !self.only_copy_killed
                && self.proxy_loss_exits == 0
                && !(self.stateless_restarts > 0 && self.replica_kills > 0));
        let from = (last_heal.max(self.p.fault_window.1) + self.p.settle / 2) * 1_000_000;
        if liveness_checked {
            let ok = self.hist.iter().any(|h| {
                h.kv.is_write()
                    && h.invoke >= from
                    && matches!(
                        h.outcome,
                        HistOutcome::Applied | HistOutcome::Rejected | HistOutcome::Deleted(_)
                    )
            });
            if !ok {
                self.violations.push(format!(
                    "no write succeeded in the last {} ms after every fault healed at {} ms",
                    self.p.settle / 2,
                    last_heal
                ));
            }
        }
        let acknowledged_writes = self
            .hist
            .iter()
            .filter(|h| {
                h.kv.is_write()
                    && matches!(
                        h.outcome,
                        HistOutcome::Applied | HistOutcome::Rejected | HistOutcome::Deleted(_)
                    )
            })
            .count();
        if self.p.trace
            && let Some(px) = &self.proxy
        {
            let w = px.router.witness();
            self.trace.push(format!("end: witness {w:?}"));
        }
        let end_epoch = self
            .proxy
            .as_ref()
            .map(|p| p.router.witness().epoch())
            .unwrap_or(0);
        Report {
            seed,
            violations: self.violations,
            ops: self.hist.len(),
            acknowledged_writes,
            faults: self
                .faults
                .iter()
                .map(|(at, f)| format!("{at}ms {f:?}"))
                .chain(self.remote.then(|| "remote launch".to_string()))
                .collect(),
            failovers: self.failovers,
            end_epoch,
            trace: self.trace,
            liveness_checked,
            restarts: self.restarts,
            power_cuts: self.power_cuts,
            recoveries: self.recoveries,
            operator_proxy_restarts: self.operator_proxy_restarts,
            operator_state_discarded: self.operator_state_discarded,
        }
    }
}
