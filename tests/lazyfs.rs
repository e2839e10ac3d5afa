//! `examples/lazyfs.rs`, the power-cut test filesystem: on a real FUSE mount, data written and
//! fsynced survives a power cut (SIGUSR1), data not fsynced is lost (size and content revert to the
//! last synced state), renames and other metadata survive, a checkpoint (SIGUSR2) makes everything
//! durable, `flock`/`File::try_lock` work, and SIGTERM unmounts cleanly.
//!
//! It runs the example binary, which `cargo test` builds; `cargo test --test lazyfs` alone does
//! not, so build it first with `cargo build --release --examples` (or `--examples` in the profile
//! you test with). Prints `SKIPPED` and passes when there is no `/dev/fuse` or lazyfs cannot mount
//! (neither root nor `fusermount3`).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// How long lazyfs may take to mount, answer a signal or exit.
const DEADLINE: Duration = Duration::from_secs(20);
/// Polling interval while waiting for the mount to appear or the process to exit.
const POLL: Duration = Duration::from_millis(10);

/// `target/<profile>/examples/lazyfs`, next to this test's `target/<profile>/deps/lazyfs-HASH`.
fn lazyfs_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("examples").join("lazyfs"))
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
}

/// Whether `path` (canonical) is a mount point, per /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|line| line.split(' ').nth(4) == Some(want.as_str()))
}

/// A running lazyfs. Dropping it (also when a test panics) stops the process and removes the mount.
struct Lazyfs {
    child: Option<Child>,
    mnt: PathBuf,
    /// lazyfs's stderr, line by line.
    lines: Receiver<String>,
}

enum Started {
    Mounted(Lazyfs),
    /// Mounting is impossible here; the reason.
    Skip(String),
}

impl Lazyfs {
    fn start(bin: &Path, mnt: &Path, backing: &Path) -> Started {
        let mnt = mnt.canonicalize().expect("canonical mount point");
        let mut child = Command::new(bin)
            .arg(&mnt)
            .arg(backing)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[lazyfs] {line}");
                let _ = tx.send(line);
            }
        });
        let mut fs = Lazyfs {
            child: Some(child),
            mnt,
            lines,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if is_mount_point(&fs.mnt) {
                return Started::Mounted(fs);
            }
            let exited = fs.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                fs.child = None;
                // The pipe closes when lazyfs exits: collect everything it said.
                let mut said = Vec::new();
                while let Ok(line) = fs.lines.recv_timeout(DEADLINE) {
                    said.push(line);
                }
                if status.code() == Some(3) {
                    return Started::Skip(format!(
                        "lazyfs cannot mount here: {}",
                        said.join(" | ")
                    ));
                }
                panic!("lazyfs exited with {status} before mounting: {said:?}");
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not mount {} within {DEADLINE:?}",
                fs.mnt.display()
            );
            std::thread::sleep(POLL);
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let child = self.child.as_ref().expect("lazyfs is running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal lazyfs");
    }

    /// The next stderr line that starts with `prefix`.
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line {prefix:?} from lazyfs within {DEADLINE:?}: {e}"),
            }
        }
    }

    /// SIGUSR1: drops every unsynced write. Returns (bytes, files) dropped.
    fn power_cut(&self) -> (u64, u64) {
        self.signal(rustix::process::Signal::USR1);
        // lazyfs: dropped N unsynced bytes in M files
        let line = self.line("lazyfs: dropped ");
        let w: Vec<&str> = line.split_whitespace().collect();
        (number(&line, w.get(2)), number(&line, w.get(6)))
    }

    /// SIGUSR2: writes and fsyncs every overlay. Returns (bytes, files) flushed.
    fn checkpoint(&self) -> (u64, u64) {
        self.signal(rustix::process::Signal::USR2);
        // lazyfs: flushed N bytes in M files
        let line = self.line("lazyfs: flushed ");
        let w: Vec<&str> = line.split_whitespace().collect();
        (number(&line, w.get(2)), number(&line, w.get(5)))
    }

    /// SIGTERM, then waits for lazyfs to exit.
    fn stop(mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        let mut child = self.child.take().expect("lazyfs is running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for lazyfs") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not exit within {DEADLINE:?} of SIGTERM"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Lazyfs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                    Ok(Some(_)) => break,
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if is_mount_point(&self.mnt) {
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn number(line: &str, word: Option<&&str>) -> u64 {
    word.and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("unexpected lazyfs line {line:?}"))
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read(path: &Path) -> String {
    String::from_utf8(fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("utf-8")
}

#[test]
fn power_cut_drops_exactly_the_unsynced_writes() {
    if !Path::new("/dev/fuse").exists() {
        println!("SKIPPED: /dev/fuse is missing");
        return;
    }
    let bin = lazyfs_bin();
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it; with `--test lazyfs` alone, run \
         `cargo build --release --examples` first",
        bin.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let (mnt, backing) = (tmp.path().join("mnt"), tmp.path().join("backing"));
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&backing).unwrap();
    let lazyfs = match Lazyfs::start(&bin, &mnt, &backing) {
        Started::Mounted(fs) => fs,
        Started::Skip(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let m = |name: &str| mnt.join(name);
    let b = |name: &str| backing.join(name);

    // (1) Written and fsynced.
    write_synced(&m("synced"), b"durable data");

    // (2) Written, never synced: visible on the mount, not in the backing directory.
    fs::write(m("unsynced"), b"volatile").unwrap();
    assert_eq!(read(&m("unsynced")), "volatile");
    assert_eq!(fs::metadata(m("unsynced")).unwrap().len(), 8);
    assert_eq!(
        fs::metadata(b("unsynced")).unwrap().len(),
        0,
        "data reached the backing dir unsynced"
    );

    // (3) Append after a partial sync.
    {
        let mut f = File::create(m("log")).unwrap();
        f.write_all(b"prefix;").unwrap();
        f.sync_data().unwrap();
    }
    {
        let mut f = OpenOptions::new().append(true).open(m("log")).unwrap();
        f.write_all(b"tail").unwrap();
    }
    assert_eq!(read(&m("log")), "prefix;tail");

    // (4) Rename of a synced file over an existing one (then fsync of the directory), and rename
    // of a file whose writes are pending (they move with the inode).
    write_synced(&m("old"), b"renamed content");
    write_synced(&m("target"), b"replaced");
    fs::rename(m("old"), m("target")).unwrap();
    File::open(&mnt).unwrap().sync_all().unwrap();
    fs::write(m("moving"), b"pending").unwrap();
    fs::rename(m("moving"), m("moved")).unwrap();
    assert_eq!(read(&m("moved")), "pending");

    // An overwrite inside synced data and a truncation are pending data too.
    {
        let f = File::create(m("overwrite")).unwrap();
        f.write_all_at(b"AAAAAAAAAA", 0).unwrap();
        f.sync_all().unwrap();
        f.write_all_at(b"BB", 4).unwrap();
    }
    assert_eq!(read(&m("overwrite")), "AAAABBAAAA");
    {
        let f = File::create(m("truncated")).unwrap();
        f.write_all_at(b"0123456789", 0).unwrap();
        f.sync_all().unwrap();
        f.set_len(4).unwrap();
    }
    assert_eq!(read(&m("truncated")), "0123");

    // (5) Locks (the service's LOCK file): flock semantics, local to this host.
    {
        let open_lock = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(m("LOCK"))
                .unwrap()
        };
        let (first, second) = (open_lock(), open_lock());
        first.try_lock().expect("try_lock on lazyfs");
        match second.try_lock() {
            Err(TryLockError::WouldBlock) => {}
            other => panic!("a second exclusive lock must be refused, got {other:?}"),
        }
        first.unlock().unwrap();
        second.try_lock().expect("lock after unlock");
    }

    // The power cut. Pending: unsynced 8 bytes, log tail 4, moved 7, overwrite 2, and the
    // truncation (no bytes): 21 bytes in 5 files.
    assert_eq!(lazyfs.power_cut(), (21, 5));

    assert_eq!(read(&m("synced")), "durable data");
    assert!(m("unsynced").exists(), "creation is durable");
    assert_eq!(fs::metadata(m("unsynced")).unwrap().len(), 0);
    assert_eq!(read(&m("unsynced")), "");
    assert_eq!(read(&m("log")), "prefix;");
    assert_eq!(fs::metadata(m("log")).unwrap().len(), 7);
    assert!(!m("old").exists());
    assert_eq!(read(&m("target")), "renamed content");
    assert!(!m("moving").exists());
    assert_eq!(read(&m("moved")), "");
    assert_eq!(read(&m("overwrite")), "AAAAAAAAAA");
    assert_eq!(read(&m("truncated")), "0123456789");
    // The backing directory holds exactly the synced state.
    assert_eq!(read(&b("log")), "prefix;");
    assert_eq!(read(&b("target")), "renamed content");
    assert_eq!(read(&b("overwrite")), "AAAAAAAAAA");
    {
        let lock = OpenOptions::new().write(true).open(m("LOCK")).unwrap();
        lock.try_lock().expect("try_lock after the power cut");
    }

    // Appending after the cut continues from the synced end.
    {
        let mut f = OpenOptions::new().append(true).open(m("log")).unwrap();
        f.write_all(b"again").unwrap();
        f.sync_data().unwrap();
    }
    assert_eq!(read(&b("log")), "prefix;again");

    // A checkpoint (SIGUSR2) makes everything pending durable; a power cut then loses nothing.
    fs::write(m("checkpointed"), b"kept by SIGUSR2").unwrap();
    assert_eq!(lazyfs.checkpoint(), (15, 1));
    assert_eq!(read(&b("checkpointed")), "kept by SIGUSR2");
    assert_eq!(lazyfs.power_cut(), (0, 0));
    assert_eq!(read(&m("checkpointed")), "kept by SIGUSR2");

    // SIGTERM: a clean unmount writes pending data back, like a real filesystem's.
    fs::write(m("at-exit"), b"flushed at unmount").unwrap();
    let mount_point = lazyfs.mnt.clone();
    let status = lazyfs.stop();
    assert!(status.success(), "lazyfs exited with {status}");
    assert!(!is_mount_point(&mount_point), "still mounted after SIGTERM");
    assert_eq!(read(&b("at-exit")), "flushed at unmount");
}
