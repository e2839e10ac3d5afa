//! `tuplespace client`: one-shot commands and an interactive shell (rustyline: history, line
//! editing, `help`), with readable or `--json` output.

use std::path::PathBuf;

use ciborium::Value;

use super::syntax::{self, Line};
use super::{BackupState, ClusterStatus};
use super::{CertRole, Client, ClientError, Request, Response, Status};
use crate::config::Config;
use crate::wire::node::ReplicaInfo;

pub const HELP: &str = r#"commands (tuples in text form: elements joined by commas, e.g. user,42):
  get KEYEXP VALEXP        pairs whose key and value fully match the regexes   get 'user,\d+' '.*'
  delete KEYEXP VALEXP     remove and return the matching pairs
    get/delete options:    --limit N  only the first N matches in key order (delete removes only those)
                           --wait D   if nothing matches, wait up to D (500ms, 5s, 2m; the service
                                      caps it at max_wait_ms) for a put/post that makes something
                                      match; then answer at once. Waiters are served in the order
                                      they came; a timeout answers ok with no pairs and changes nothing
                                                                                   get --wait 5s --limit 1 'job,.*' '.*'
  take KEYEXP VALEXP [--wait D]   remove and return the first match (delete --limit 1): a work-queue
                           consumer; one pair goes to one take only        take 'job,.*' '.*' --wait 30s
  put KEY=VALUE ...        insert pairs whose key is absent                     put user,1=alice user,2=bob
  post KEY=VALUE ...       replace values of present keys                       post user,1=carol
                           an element may also be any JSON value, sent as-is:   put '"junk"' '[["a"],["b"]]'
  op NAME [JSON-ARGS]      send any operator (unknown ones too)                  op FROB '[]'
  raw JSON                 send a whole request written as JSON                  raw '{"id":9,"op":"get"}'
  rawhex HEX               send bytes as one frame (the 4-byte length is added)  rawhex ff
  status [--watch]         cluster status (admin certificate, shutdown SAP); --watch: every second
  shutdown                 stop the service, saving its data (admin)
  connect [SAP]            (re)connect to the client SAP; disconnect: drop the connections
  help, quit"#;

/// Where and how the CLI connects.
#[derive(Clone, Debug)]
pub struct CliOptions {
    pub client_sap: String,
    pub shutdown_sap: String,
    pub certs: PathBuf,
    /// Certificate used on the client SAP (`client` or `admin`).
    pub cert_role: CertRole,
    pub json: bool,
    pub config: Config,
}

/// The CLI's connections, opened on first use.
pub struct Session {
    opts: CliOptions,
    data: Option<Client>,
    admin: Option<Client>,
}

/// The outcome of one command, for the exit status of one-shot use.
pub enum Outcome {
    Response(Response),
    Text(String),
    Quit,
}

impl Session {
    pub fn new(opts: CliOptions) -> Session {
        Session {
            opts,
            data: None,
            admin: None,
        }
    }

    async fn data(&mut self) -> Result<&mut Client, ClientError> {
        if self.data.is_none() {
            let c = Client::connect(
                &self.opts.client_sap,
                &self.opts.certs,
                self.opts.cert_role,
                &self.opts.config,
            )
            .await?;
            self.data = Some(c);
        }
        self.data.as_mut().ok_or(ClientError::EndOfStream)
    }

    async fn admin(&mut self) -> Result<&mut Client, ClientError> {
        if self.admin.is_none() {
            let c = Client::connect(
                &self.opts.shutdown_sap,
                &self.opts.certs,
                CertRole::Admin,
                &self.opts.config,
            )
            .await?;
            self.admin = Some(c);
        }
        self.admin.as_mut().ok_or(ClientError::EndOfStream)
    }

    /// Runs one command line.
    pub async fn exec(&mut self, line: &str) -> Result<Outcome, String> {
        let parsed = syntax::parse(line)?;
        let r = match parsed {
            Line::Empty => return Ok(Outcome::Text(String::new())),
            Line::Help => return Ok(Outcome::Text(HELP.into())),
            Line::Quit => return Ok(Outcome::Quit),
            Line::Disconnect => {
                for c in [self.data.take(), self.admin.take()].into_iter().flatten() {
                    c.close();
                }
                return Ok(Outcome::Text("disconnected".into()));
            }
            Line::Connect(sap) => {
                if let Some(s) = sap {
                    self.opts.client_sap = s;
                }
                if let Some(c) = self.data.take() {
                    c.close();
                }
                if let Err(e) = self.data().await {
                    return Err(self.explain(e));
                }
                return Ok(Outcome::Text(format!(
                    "connected to {}",
                    self.opts.client_sap
                )));
            }
            Line::Request { op, args, opts } => {
                self.on_data(|c| Box::pin(c.request_owned(op, args, opts)))
                    .await
            }
            Line::Raw(v) => self.on_data(|c| Box::pin(c.raw_value(v))).await,
            Line::RawBytes(b) => self.on_data(|c| Box::pin(c.raw_frame(b))).await,
            Line::Status { watch: false } => match self.admin().await {
                Ok(c) => c.call(&Request::status()).await,
                Err(e) => Err(e),
            },
            Line::Status { watch: true } => return self.watch_status().await,
            Line::Shutdown => match self.admin().await {
                Ok(c) => c.call(&Request::shutdown()).await,
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(resp) => Ok(Outcome::Response(resp)),
            Err(e) => {
                // A broken connection is dropped so the next command reconnects.
                self.data = None;
                self.admin = None;
                Err(self.explain(e))
            }
        }
    }

    /// `status --watch`: prints STATUS every `status_watch_interval_ms` (the screen cleared
    /// first on a terminal) until Ctrl-C or an error.
    async fn watch_status(&mut self) -> Result<Outcome, String> {
        use std::io::IsTerminal;
        let mut every = tokio::time::interval(self.opts.config.status_watch_interval());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tty = std::io::stdout().is_terminal() && !self.opts.json;
        // One listener for the whole watch, so a Ctrl-C between two refreshes is not missed.
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = &mut stop => return Ok(Outcome::Text(String::new())),
            }
            let r = tokio::select! {
                r = async {
                    match self.admin().await {
                        Ok(c) => c.call(&Request::status()).await,
                        Err(e) => Err(e),
                    }
                } => r,
                _ = &mut stop => return Ok(Outcome::Text(String::new())),
            };
            match r {
                Ok(resp) => {
                    let now = humantime_now();
                    if self.opts.json {
                        println!("{}", response_json(&resp));
                    } else if tty {
                        println!("\x1b[2J\x1b[H{now}\n{}", render(&resp));
                    } else {
                        println!("{now}\n{}\n", render(&resp));
                    }
                }
                Err(e) => {
                    self.admin = None;
                    return Err(self.explain(e));
                }
            }
        }
    }

    async fn on_data<F>(&mut self, f: F) -> Result<Response, ClientError>
    where
        F: for<'a> FnOnce(
            &'a mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Response, ClientError>> + 'a>,
        >,
    {
        let c = self.data().await?;
        f(c).await
    }

    /// The error as the user sees it (a close code's advice is part of its message).
    fn explain(&self, e: ClientError) -> String {
        e.to_string()
    }

    /// Closes the connections with NO_ERROR and waits (briefly) for the close to be sent.
    pub async fn close(&mut self) {
        for c in [self.data.take(), self.admin.take()].into_iter().flatten() {
            c.close();
            c.wait_closed(std::time::Duration::from_millis(200)).await;
        }
    }

    pub fn json(&self) -> bool {
        self.opts.json
    }
}

impl Client {
    async fn request_owned(
        &mut self,
        op: String,
        args: Option<Value>,
        opts: crate::wire::client::MatchOpts,
    ) -> Result<Response, ClientError> {
        let mut req = Request::op(&op, args);
        if let Some(n) = opts.limit {
            req = req.limit(n);
        }
        if let Some(ms) = opts.wait_ms {
            req = req.wait(std::time::Duration::from_millis(ms));
        }
        self.call(&req).await
    }
    async fn raw_value(&mut self, v: Value) -> Result<Response, ClientError> {
        self.send_value(&v).await?;
        self.read_response().await
    }
    async fn raw_frame(&mut self, body: Vec<u8>) -> Result<Response, ClientError> {
        let mut b = (body.len() as u32).to_be_bytes().to_vec();
        b.extend(body);
        self.send_raw(&b).await?;
        self.read_response().await
    }
}

fn value_to_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// The response as JSON (for `--json`): the same keys as on the wire.
pub fn response_json(r: &Response) -> serde_json::Value {
    value_to_json(&r.to_value())
}

/// A readable rendering of a response.
pub fn render(r: &Response) -> String {
    let mut s = String::new();
    s.push_str(r.status.as_str());
    if let Some(id) = r.id {
        s.push_str(&format!(" (id {id})"));
    }
    if let Some(m) = &r.message {
        s.push_str(&format!(": {m}"));
    }
    if let Some(pairs) = &r.pairs {
        s.push_str(&format!(
            "\n{} pair{}",
            pairs.len(),
            if pairs.len() == 1 { "" } else { "s" }
        ));
        for p in pairs {
            s.push_str(&format!("\n  {} => {}", p.key, p.value));
        }
    }
    if let Some(rej) = &r.rejected {
        if rej.is_empty() {
            s.push_str("\nall elements applied");
        } else {
            s.push_str(&format!("\n{} rejected:", rej.len()));
            for v in rej {
                let json = v
                    .to_value()
                    .map_or(serde_json::Value::Null, |v| value_to_json(&v));
                s.push_str(&format!("\n  {json}"));
            }
        }
    }
    if let Some(c) = &r.cluster {
        s.push('\n');
        s.push_str(&status_table(c));
    }
    s
}

/// The current time (UTC, seconds) for `status --watch`.
fn humantime_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, sec) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{sec:02} UTC")
}

/// STATUS as a table: one row per item, the replicas with their address and process id.
pub fn status_table(c: &ClusterStatus) -> String {
    let replica = |r: &Option<ReplicaInfo>| match r {
        Some(r) => format!("{} at {} (pid {})", r.handle, r.sap, r.pid),
        None => "none".to_owned(),
    };
    let lag = match (c.backup_state, c.replication_lag) {
        (BackupState::Synced, Some(n)) => format!("{n} update{}", if n == 1 { "" } else { "s" }),
        (BackupState::Synced, None) => "not reported yet".to_owned(),
        _ => "-".to_owned(),
    };
    let rows = [
        ("epoch", c.epoch.to_string()),
        ("primary", replica(&c.primary)),
        (
            "backup",
            match &c.backup {
                Some(_) => format!("{}, {}", replica(&c.backup), c.backup_state.as_str()),
                None => "none".to_owned(),
            },
        ),
        ("replication lag", lag),
        ("clients", c.clients.to_string()),
        (
            "pairs",
            c.pairs
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        ),
        ("pending", c.pending.to_string()),
    ];
    rows.iter()
        .map(|(k, v)| format!("  {k:<16} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn print(session: &Session, o: &Outcome) {
    match o {
        Outcome::Response(r) if session.json() => println!("{}", response_json(r)),
        Outcome::Response(r) => println!("{}", render(r)),
        Outcome::Text(t) if !t.is_empty() => println!("{t}"),
        _ => {}
    }
}

fn print_err(session: &Session, e: &str) {
    if session.json() {
        println!("{}", serde_json::json!({ "error": e }));
    } else {
        eprintln!("error: {e}");
    }
}

/// One-shot: runs `words` as one command. Exit code 0 for `ok`, 1 for another status, 2 for an
/// error reaching the service.
pub fn run_once(rt: &tokio::runtime::Runtime, opts: CliOptions, words: &[String]) -> i32 {
    let line = shlex::try_join(words.iter().map(|s| s.as_str())).unwrap_or_default();
    let mut session = Session::new(opts);
    let r = rt.block_on(session.exec(&line));
    // Close politely so the proxy frees our client slot now, not at its idle timeout.
    rt.block_on(session.close());
    match r {
        Ok(o) => {
            print(&session, &o);
            match o {
                Outcome::Response(r) if r.status != Status::Ok => 1,
                _ => 0,
            }
        }
        Err(e) => {
            print_err(&session, &e);
            2
        }
    }
}

/// Interactive shell.
pub fn run_interactive(rt: &tokio::runtime::Runtime, opts: CliOptions) -> i32 {
    let mut session = Session::new(opts.clone());
    let mut rl = match rustyline::DefaultEditor::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return 2;
        }
    };
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".tuplespace_history"));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    println!(
        "tuplespace client: data on {}, admin on {}, certificates in {}. Type `help`.",
        opts.client_sap,
        opts.shutdown_sap,
        opts.certs.display()
    );
    loop {
        match rl.readline("tuplespace> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = rl.add_history_entry(line.as_str());
                }
                match rt.block_on(session.exec(&line)) {
                    Ok(Outcome::Quit) => break,
                    Ok(o) => print(&session, &o),
                    Err(e) => print_err(&session, &e),
                }
            }
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        }
    }
    if let Some(h) = &history {
        let _ = rl.save_history(h);
    }
    rt.block_on(session.close());
    0
}
