//! `lazyfs`: a small FUSE test filesystem in the spirit of Jepsen's LazyFS.
//!
//! ```text
//! lazyfs MOUNTPOINT BACKING_DIR [--control FIFO]
//! ```
//!
//! Mounts a pass-through filesystem at `MOUNTPOINT` whose files live in `BACKING_DIR`, except that
//! **file data is not written through**: every write (and every truncation) since a file's last
//! `fsync`/`fdatasync` is kept in memory only, in a per-inode overlay (non-overlapping byte
//! extents, the pending size, and how much of the backing file a truncation cut off). Reads see
//! the backing data overlaid with the pending state. `fsync`/`fdatasync` of a file writes its
//! overlay to the backing file and then fsyncs / fdatasyncs it. `close` does **not** sync (as on a
//! real filesystem, data reaches the disk only when synced or eventually; here: only when synced).
//!
//! **Power cut**: on `SIGUSR1`, or a line `clear-cache` (also accepted: `lazyfs::clear-cache`,
//! `power-cut`) written to the control FIFO, all unsynced data of all files is dropped, as a
//! power failure would lose it: each file's size and content revert to what they were at its last
//! sync. One line is printed to stderr: `lazyfs: dropped N unsynced bytes in M files`. The kernel's
//! cached pages and attributes of those files are invalidated before that line is printed, so a
//! reader that sees the line also sees the reverted files.
//!
//! **Checkpoint**: on `SIGUSR2`, or a line `sync` (also `checkpoint`, `lazyfs::cache-checkpoint`)
//! on the control FIFO, every pending overlay is written and fsynced, as `sync(1)` would; it prints
//! `lazyfs: flushed N bytes in M files`.
//!
//! **Slow disk**: with `--fsync-delay-ms N`, every `fsync`, `fdatasync` and directory `fsync`
//! takes N ms more (it sleeps before writing the overlay back), as a disk that stalls would; reads
//! and writes are not slowed. A line `fsync-delay N` on the control FIFO changes it (0: off).
//!
//! **Shutdown**: on `SIGTERM`, `SIGINT` or `SIGHUP` it unmounts (lazily if the mount is busy, then
//! it serves the files still open for at most 2 s more), writes and fsyncs every overlay (a clean
//! unmount of a real filesystem writes its dirty data back), prints `lazyfs: flushed N bytes in M
//! files` and `lazyfs: unmounted`, and exits 0. To lose the data instead, send `SIGUSR1` first, or
//! `SIGKILL` the process (then, if `fusermount3`/`fusermount` was on `PATH` at mount time,
//! fusermount's `auto_unmount` removes the dead mount; otherwise `umount -l MOUNTPOINT` does). If
//! the mount is removed from outside (`umount`, `fusermount3 -u`), lazyfs flushes and exits the
//! same way.
//!
//! Exit status: 0 after a clean shutdown, 2 for bad arguments, 3 when mounting failed (no
//! `/dev/fuse`, not root and no `fusermount3`, ...), 1 for any other failure.
//!
//! # What is durable immediately
//!
//! Namespace and metadata operations are applied to `BACKING_DIR` at once and so survive a power
//! cut (LazyFS's default also only loses file data): `create`/`mknod`/`mkdir`/`symlink`/`link`,
//! `rename` (including replacing an existing file and `RENAME_NOREPLACE`/`RENAME_EXCHANGE`),
//! `unlink`, `rmdir`, `chmod`, `chown` and `utimens`. A file created and written but never synced
//! therefore exists after a power cut, with its last synced size (0 if never synced). File **size
//! changes are data**, not metadata: `truncate`/`ftruncate`/`O_TRUNC`/`fallocate` (mode 0, which
//! only extends the size) are pending until the next fsync, like writes. Overlays belong to the
//! inode, not the name: a renamed file carries its pending writes along, and hard links share
//! them. `fsyncdir` fsyncs the backing directory (nothing is pending in directories).
//!
//! # Locks
//!
//! lazyfs does not ask the kernel for `FUSE_POSIX_LOCKS`/`FUSE_FLOCK_LOCKS`, so `flock(2)` (what
//! `File::try_lock` uses) and `fcntl` record locks are handled by the kernel locally on the
//! mount: they work between processes on this host, exactly as on a local filesystem.
//!
//! # Other behaviour
//!
//! The mount uses `default_permissions` (the kernel checks permissions against the attributes
//! lazyfs reports). The process sets its umask to 0 (the kernel already applied the caller's);
//! running as root, new objects are chowned to the calling user. Attribute and entry timeouts are
//! zero, so every path walk revalidates with lazyfs and nothing stale survives a power cut. While
//! a file has pending data, `stat` reports the pending size and the time of the last pending write
//! as mtime/ctime. Extended attributes, `copy_file_range` and `lseek(SEEK_DATA/SEEK_HOLE)` are not
//! implemented (the kernel then reports `EOPNOTSUPP` or uses its generic fallback). `BACKING_DIR`
//! must not be modified by anyone else while mounted. `LAZYFS_TRACE=1` in the environment prints
//! every lookup, read, write, truncate, fsync and forget to stderr.
//!
//! A process that keeps a file open across a power cut (a real power cut would have killed it)
//! keeps the kernel's pre-cut idea of the file size for `O_APPEND` writes through that descriptor
//! until something refreshes it (a read or `stat` does; there is no FUSE notification that
//! shrinks a cached size). Processes that open the file after the cut see the reverted file.
//!
//! Costs: a write is `O(log n + k)` in the number of pending extents `n` and the `k` extents it
//! overlaps (appends extend the previous extent in place), a read `O(log n + k)` plus one `pread`
//! (and, with `FUSE_AUTO_INVAL_DATA`, one attribute revalidation per `read(2)`), an fsync
//! `O(pending)`; data is buffered in memory until synced.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use nix::sys::signal::{SigSet, Signal};
use rustix::fs::{self as rfs, AtFlags, CWD, Mode, OFlags, StatxFlags, Timespec, Timestamps};

/// Attribute and entry timeout: zero, so that nothing the kernel caches outlives a power cut.
const TTL: Duration = Duration::ZERO;
/// Number of threads serving FUSE requests (an fsync must not stall the other operations).
const THREADS: usize = 4;
/// Largest file offset accepted (`off_t` is signed).
const MAX_OFFSET: u64 = i64::MAX as u64;
/// First synthetic inode number, for backing inodes whose own number cannot be used.
const SYNTHETIC_INO: u64 = 1 << 62;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An errno to reply with; converts from every error type used here so `?` works.
#[derive(Debug, Clone, Copy)]
struct Fail(Errno);

type Res<T> = Result<T, Fail>;

impl From<rustix::io::Errno> for Fail {
    fn from(e: rustix::io::Errno) -> Self {
        Fail(Errno::from_i32(e.raw_os_error()))
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail(Errno::from(e))
    }
}

fn fail<T>(e: rustix::io::Errno) -> Res<T> {
    Err(e.into())
}

/// Locks a mutex, recovering the data if another thread panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The per-inode overlay of unsynced writes
// ---------------------------------------------------------------------------------------------

/// Everything written to a file since its last fsync.
#[derive(Debug)]
struct Overlay {
    /// Logical size of the file.
    size: u64,
    /// Bytes `[0, keep)` of the backing file are still visible; a truncation lowers this. Always
    /// `keep <= size`. Bytes in `[keep, size)` not covered by an extent read as zeros.
    keep: u64,
    /// Pending data, non-overlapping, keyed by file offset, all within `[0, size)`.
    extents: BTreeMap<u64, Vec<u8>>,
    /// Total length of `extents`.
    bytes: u64,
    /// Time of the last pending change (reported as mtime/ctime).
    mtime: SystemTime,
}

impl Overlay {
    fn new(backing_len: u64) -> Overlay {
        Overlay {
            size: backing_len,
            keep: backing_len,
            extents: BTreeMap::new(),
            bytes: 0,
            mtime: SystemTime::now(),
        }
    }

    /// Removes every pending byte in `[start, end)`, splitting extents that straddle the bounds.
    fn punch(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut tail = None;
        if let Some((&s, v)) = self.extents.range_mut(..start).next_back() {
            let e = s + v.len() as u64;
            if e > start {
                if e > end {
                    tail = Some((end, v[(end - s) as usize..].to_vec()));
                }
                self.bytes -= e.min(end) - start;
                v.truncate((start - s) as usize);
            }
        }
        if let Some((at, t)) = tail {
            self.extents.insert(at, t);
            return; // the extent covered all of [start, end)
        }
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&k, _)| k).collect();
        for s in inside {
            let Some(v) = self.extents.remove(&s) else {
                continue;
            };
            let e = s + v.len() as u64;
            if e > end {
                self.bytes -= end - s;
                self.extents.insert(end, v[(end - s) as usize..].to_vec());
            } else {
                self.bytes -= v.len() as u64;
            }
        }
    }

    /// Records a write. The caller has checked that `off + data.len()` does not overflow.
    fn write(&mut self, off: u64, data: &[u8]) {
        self.mtime = SystemTime::now();
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        // Fast path: an overwrite entirely inside one pending extent.
        if let Some((&s, v)) = self.extents.range_mut(..=off).next_back()
            && s + v.len() as u64 >= end
        {
            let at = (off - s) as usize;
            v[at..at + data.len()].copy_from_slice(data);
            return;
        }
        self.punch(off, end);
        self.bytes += data.len() as u64;
        self.size = self.size.max(end);
        // Appending right after a pending extent extends it in place (the WAL case).
        if let Some((&s, v)) = self.extents.range_mut(..off).next_back()
            && s + v.len() as u64 == off
        {
            v.extend_from_slice(data);
            return;
        }
        self.extents.insert(off, data.to_vec());
    }

    fn truncate(&mut self, size: u64) {
        self.mtime = SystemTime::now();
        if size < self.size {
            self.punch(size, u64::MAX);
            self.keep = self.keep.min(size);
        }
        self.size = size;
    }

    /// Reads `[off, off + len)` of the logical file: backing bytes below `keep`, then the extents.
    fn read(&self, file: &File, off: u64, len: u32) -> io::Result<Vec<u8>> {
        if off >= self.size {
            return Ok(Vec::new());
        }
        let end = off.saturating_add(u64::from(len)).min(self.size);
        let mut buf = vec![0u8; (end - off) as usize];
        let backing_end = end.min(self.keep);
        if off < backing_end {
            // A short read (backing file shorter than expected) leaves zeros.
            pread_full(file, &mut buf[..(backing_end - off) as usize], off)?;
        }
        for (&s, v) in self.extents.range(..end).rev() {
            let e = s + v.len() as u64;
            if e <= off {
                break;
            }
            let (from, to) = (s.max(off), e.min(end));
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&v[(from - s) as usize..(to - s) as usize]);
        }
        Ok(buf)
    }

    /// Writes the overlay into the backing file (not synced). Idempotent, so a failure half-way
    /// leaves the overlay valid for a retry.
    fn apply(&self, file: &File) -> io::Result<()> {
        let backing_len = file.metadata()?.len();
        let keep = self.keep.min(backing_len);
        if keep < backing_len {
            file.set_len(keep)?;
        }
        let mut len = keep;
        for (&s, v) in &self.extents {
            file.write_all_at(v, s)?;
            len = len.max(s + v.len() as u64);
        }
        if len != self.size {
            file.set_len(self.size)?;
        }
        Ok(())
    }
}

/// Reads until `buf` is full or end of file; returns the number of bytes read.
fn pread_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// Inodes
// ---------------------------------------------------------------------------------------------

/// Backing identity of an inode: (st_dev, st_ino).
type Key = (u64, u64);

/// An inode the kernel knows (or that has pending data).
struct Node {
    ino: u64,
    key: Key,
    kind: FileType,
    /// `O_PATH` descriptor of the backing object: stays valid across renames and unlinks.
    fd: OwnedFd,
    data: Mutex<Data>,
}

#[derive(Default)]
struct Data {
    /// Backing file opened for I/O (regular files only), opened on first use.
    file: Option<Arc<File>>,
    /// Unsynced state, if any.
    overlay: Option<Overlay>,
}

impl Node {
    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    fn is_file(&self) -> Res<()> {
        match self.kind {
            FileType::RegularFile => Ok(()),
            FileType::Directory => fail(rustix::io::Errno::ISDIR),
            _ => fail(rustix::io::Errno::INVAL),
        }
    }

    /// The backing file for I/O (read-write, or read-only if that is all the backing allows).
    fn file(&self, data: &mut Data) -> Res<Arc<File>> {
        self.is_file()?;
        if let Some(f) = &data.file {
            return Ok(f.clone());
        }
        let path = self.proc_path();
        let fd = match rfs::open(&path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(_) => rfs::open(&path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?,
        };
        let f = Arc::new(File::from(fd));
        data.file = Some(f.clone());
        Ok(f)
    }
}

struct Table {
    /// ino -> (node, kernel lookup count).
    nodes: HashMap<u64, (Arc<Node>, u64)>,
    by_key: HashMap<Key, u64>,
    next_ino: u64,
}

struct DirEnt {
    name: OsString,
    ino: u64,
    kind: FileType,
}

/// Open directory handles: a snapshot of the listing taken at opendir, by handle number.
#[derive(Default)]
struct DirHandles {
    last: u64,
    open: HashMap<u64, Arc<Vec<DirEnt>>>,
}

struct Shared {
    root: Arc<Node>,
    table: Mutex<Table>,
    dirs: Mutex<DirHandles>,
    notifier: OnceLock<Notifier>,
    euid: u32,
    egid: u32,
    /// `LAZYFS_TRACE=1`: print every data operation to stderr.
    trace: bool,
    /// Added to every fsync (`--fsync-delay-ms`, `fsync-delay N`).
    fsync_delay_ms: std::sync::atomic::AtomicU64,
}

macro_rules! trace {
    ($shared:expr, $($arg:tt)*) => {
        if $shared.trace {
            eprintln!("lazyfs: trace: {}", format_args!($($arg)*));
        }
    };
}

fn statx_fd(fd: impl AsFd) -> Res<rfs::Statx> {
    Ok(rfs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )?)
}

fn key_of(st: &rfs::Statx) -> Key {
    (rfs::makedev(st.stx_dev_major, st.stx_dev_minor), st.stx_ino)
}

fn kind_of(mode: u32) -> FileType {
    match rfs::FileType::from_raw_mode(mode) {
        rfs::FileType::Directory => FileType::Directory,
        rfs::FileType::Symlink => FileType::Symlink,
        rfs::FileType::Fifo => FileType::NamedPipe,
        rfs::FileType::Socket => FileType::Socket,
        rfs::FileType::CharacterDevice => FileType::CharDevice,
        rfs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn systime(sec: i64, nsec: u32) -> SystemTime {
    let nsec = nsec.min(999_999_999);
    if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(sec.unsigned_abs(), nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(sec.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
    }
    .unwrap_or(UNIX_EPOCH)
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: d.subsec_nanos().into(),
        },
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                Timespec {
                    tv_sec: -secs,
                    tv_nsec: 0,
                }
            } else {
                Timespec {
                    tv_sec: -secs - 1,
                    tv_nsec: (1_000_000_000 - d.subsec_nanos()).into(),
                }
            }
        }
    }
}

fn check_name(name: &OsStr) -> Res<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return fail(rustix::io::Errno::INVAL);
    }
    Ok(())
}

impl Shared {
    fn node(&self, ino: INodeNo) -> Res<Arc<Node>> {
        if ino == INodeNo::ROOT {
            return Ok(self.root.clone());
        }
        match lock(&self.table).nodes.get(&ino.0) {
            Some((n, _)) => Ok(n.clone()),
            None => fail(rustix::io::Errno::STALE),
        }
    }

    /// Attributes of a node: the backing object's, with the overlay's size and times.
    fn attr_from(&self, node: &Node, st: &rfs::Statx) -> FileAttr {
        let mode = u32::from(st.stx_mode);
        let (major, minor) = (st.stx_rdev_major, st.stx_rdev_minor);
        let mut attr = FileAttr {
            ino: INodeNo(node.ino),
            size: st.stx_size,
            blocks: st.stx_blocks,
            atime: systime(st.stx_atime.tv_sec, st.stx_atime.tv_nsec),
            mtime: systime(st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
            ctime: systime(st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
            crtime: systime(st.stx_btime.tv_sec, st.stx_btime.tv_nsec),
            kind: kind_of(mode),
            perm: (mode & 0o7777) as u16,
            nlink: st.stx_nlink,
            uid: st.stx_uid,
            gid: st.stx_gid,
            // The kernel's "new" 32-bit device encoding.
            rdev: (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12),
            blksize: st.stx_blksize.max(512),
            flags: 0,
        };
        if node.kind == FileType::RegularFile
            && let Some(ov) = &lock(&node.data).overlay
        {
            attr.size = ov.size;
            attr.blocks = attr.blocks.max(ov.size.div_ceil(512));
            attr.mtime = ov.mtime;
            attr.ctime = attr.ctime.max(ov.mtime);
        }
        attr
    }

    fn attr(&self, node: &Node) -> Res<FileAttr> {
        let st = statx_fd(&node.fd)?;
        Ok(self.attr_from(node, &st))
    }

    /// Registers an `O_PATH` descriptor as a node the kernel now knows (lookup count + 1).
    fn register(&self, fd: OwnedFd) -> Res<(Arc<Node>, FileAttr)> {
        let st = statx_fd(&fd)?;
        let key = key_of(&st);
        let node = {
            let mut t = lock(&self.table);
            let known = t.by_key.get(&key).copied();
            match known.and_then(|ino| t.nodes.get_mut(&ino)) {
                Some(entry) => {
                    entry.1 += 1;
                    entry.0.clone()
                }
                None if key == self.root.key => self.root.clone(),
                None => {
                    let ino = if key.0 == self.root.key.0
                        && key.1 > 1
                        && key.1 < SYNTHETIC_INO
                        && !t.nodes.contains_key(&key.1)
                    {
                        key.1
                    } else {
                        loop {
                            let i = t.next_ino;
                            t.next_ino += 1;
                            if !t.nodes.contains_key(&i) {
                                break i;
                            }
                        }
                    };
                    let node = Arc::new(Node {
                        ino,
                        key,
                        kind: kind_of(u32::from(st.stx_mode)),
                        fd,
                        data: Mutex::new(Data::default()),
                    });
                    t.nodes.insert(ino, (node.clone(), 1));
                    t.by_key.insert(key, ino);
                    node
                }
            }
        };
        let attr = self.attr_from(&node, &st);
        trace!(
            self,
            "register key {key:?} -> ino {} size {}", node.ino, attr.size
        );
        Ok((node, attr))
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Res<(Arc<Node>, FileAttr)> {
        trace!(
            self,
            "lookup {} in ino {}",
            name.to_string_lossy(),
            parent.ino
        );
        check_name(name)?;
        if parent.kind != FileType::Directory {
            return fail(rustix::io::Errno::NOTDIR);
        }
        let fd = rfs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.register(fd)
    }

    fn forget(&self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        trace!(self, "forget ino {ino} n {n}");
        let mut t = lock(&self.table);
        let drop_it = match t.nodes.get_mut(&ino) {
            Some(entry) => {
                entry.1 = entry.1.saturating_sub(n);
                entry.1 == 0 && droppable(&entry.0)
            }
            None => false,
        };
        if drop_it {
            remove_node(&mut t, ino);
        }
    }

    /// Chowns a just-created object to the caller (when running as root and it differs).
    fn give_to_caller(&self, req: &Request, parent: &Node, name: &OsStr) {
        if self.euid != 0 {
            return;
        }
        let uid = (req.uid() != self.euid).then(|| rfs::Uid::from_raw(req.uid()));
        let parent_setgid = statx_fd(&parent.fd)
            .map(|st| u32::from(st.stx_mode) & 0o2000 != 0)
            .unwrap_or(true);
        let gid = (req.gid() != self.egid && !parent_setgid).then(|| rfs::Gid::from_raw(req.gid()));
        if uid.is_some() || gid.is_some() {
            let _ = rfs::chownat(&parent.fd, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
        }
    }

    fn read(&self, node: &Node, off: u64, size: u32) -> Res<Vec<u8>> {
        trace!(self, "read ino {} off {off} len {size}", node.ino);
        let mut data = lock(&node.data);
        let file = node.file(&mut data)?;
        match &data.overlay {
            Some(ov) => Ok(ov.read(&file, off, size)?),
            None => {
                let mut buf = vec![0u8; size as usize];
                let n = pread_full(&file, &mut buf, off)?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    fn write(&self, node: &Node, off: u64, buf: &[u8]) -> Res<()> {
        trace!(self, "write ino {} off {off} len {}", node.ino, buf.len());
        match off.checked_add(buf.len() as u64) {
            Some(end) if end <= MAX_OFFSET => {}
            _ => return fail(rustix::io::Errno::FBIG),
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut data = lock(&node.data);
        let file = node.file(&mut data)?;
        if data.overlay.is_none() {
            data.overlay = Some(Overlay::new(file.metadata()?.len()));
        }
        if let Some(ov) = data.overlay.as_mut() {
            ov.write(off, buf);
        }
        Ok(())
    }

    fn truncate(&self, node: &Node, size: u64) -> Res<()> {
        trace!(self, "truncate ino {} size {size}", node.ino);
        if size > MAX_OFFSET {
            return fail(rustix::io::Errno::FBIG);
        }
        let mut data = lock(&node.data);
        let file = node.file(&mut data)?;
        if data.overlay.is_none() {
            let len = file.metadata()?.len();
            if len == size {
                return Ok(());
            }
            data.overlay = Some(Overlay::new(len));
        }
        if let Some(ov) = data.overlay.as_mut() {
            ov.truncate(size);
        }
        Ok(())
    }

    /// Writes a node's overlay to its backing file and clears it; returns the pending bytes and
    /// the file (to sync outside the lock). `None` if the node is not a regular file.
    fn flush_node(&self, node: &Node) -> Res<Option<(u64, bool, Arc<File>)>> {
        if node.kind != FileType::RegularFile {
            return Ok(None);
        }
        let mut data = lock(&node.data);
        let file = node.file(&mut data)?;
        let Some(ov) = &data.overlay else {
            return Ok(Some((0, false, file)));
        };
        ov.apply(&file)?;
        let bytes = ov.bytes;
        data.overlay = None;
        Ok(Some((bytes, true, file)))
    }

    /// A slow disk (`--fsync-delay-ms`): every sync waits this long first.
    fn sync_delay(&self) {
        let ms = self
            .fsync_delay_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    fn fsync(&self, node: &Node, datasync: bool) -> Res<()> {
        trace!(self, "fsync ino {} datasync {datasync}", node.ino);
        self.sync_delay();
        let Some((_, _, file)) = self.flush_node(node)? else {
            return self.fsyncdir(node);
        };
        if datasync {
            rfs::fdatasync(&*file)?;
        } else {
            rfs::fsync(&*file)?;
        }
        Ok(())
    }

    fn fsyncdir(&self, node: &Node) -> Res<()> {
        if node.kind != FileType::Directory {
            return Ok(());
        }
        self.sync_delay();
        let fd = rfs::openat(
            &node.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rfs::fsync(&fd)?;
        Ok(())
    }

    fn all_nodes(&self) -> Vec<Arc<Node>> {
        let t = lock(&self.table);
        t.nodes.values().map(|(n, _)| n.clone()).collect()
    }

    /// Drops nodes the kernel has forgotten that no longer hold pending data.
    fn collect_orphans(&self) {
        let mut t = lock(&self.table);
        let orphans: Vec<u64> = t
            .nodes
            .iter()
            .filter(|(_, (node, lookups))| *lookups == 0 && droppable(node))
            .map(|(&ino, _)| ino)
            .collect();
        for ino in orphans {
            remove_node(&mut t, ino);
        }
    }

    /// The power cut: drops every overlay. Returns (bytes, files).
    fn power_cut(&self) -> (u64, u64) {
        let (mut bytes, mut files, mut inos) = (0, 0, Vec::new());
        for node in self.all_nodes() {
            if let Some(ov) = lock(&node.data).overlay.take() {
                bytes += ov.bytes;
                files += 1;
                inos.push(node.ino);
            }
        }
        self.collect_orphans();
        if let Some(notifier) = self.notifier.get() {
            for ino in inos {
                // ENOENT just means the kernel no longer caches that inode.
                let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
            }
        }
        (bytes, files)
    }

    /// Writes and fsyncs every overlay. Returns (bytes, files, errors).
    fn flush_all(&self) -> (u64, u64, u64) {
        let (mut bytes, mut files, mut errors) = (0, 0, 0);
        for node in self.all_nodes() {
            match self.flush_node(&node) {
                Ok(Some((n, true, file))) => {
                    bytes += n;
                    files += 1;
                    if rfs::fsync(&*file).is_err() {
                        errors += 1;
                    }
                }
                Ok(_) => {}
                Err(_) => errors += 1,
            }
        }
        self.collect_orphans();
        (bytes, files, errors)
    }

    fn report_power_cut(&self) {
        let (bytes, files) = self.power_cut();
        eprintln!("lazyfs: dropped {bytes} unsynced bytes in {files} files");
    }

    fn report_flush(&self) {
        let (bytes, files, errors) = self.flush_all();
        if errors == 0 {
            eprintln!("lazyfs: flushed {bytes} bytes in {files} files");
        } else {
            eprintln!("lazyfs: flushed {bytes} bytes in {files} files, {errors} errors");
        }
    }

    fn list_dir(&self, node: &Node) -> Res<Vec<DirEnt>> {
        let fd = rfs::openat(
            &node.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut dir = rfs::Dir::new(fd)?;
        let mut out = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent?;
            let name = OsStr::from_bytes(ent.file_name().to_bytes()).to_owned();
            let kind = match ent.file_type() {
                rfs::FileType::Unknown => {
                    rfs::statat(&node.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map(|st| kind_of(st.st_mode))
                        .unwrap_or(FileType::RegularFile)
                }
                t => kind_of(t.as_raw_mode()),
            };
            let ino = if name == "." {
                node.ino
            } else if ent.ino() == self.root.key.1 {
                INodeNo::ROOT.0
            } else {
                ent.ino()
            };
            out.push(DirEnt { name, ino, kind });
        }
        Ok(out)
    }
}

/// Whether a node the kernel forgot can be dropped: no pending data, or no name left to reach it.
fn droppable(node: &Node) -> bool {
    let mut data = lock(&node.data);
    if data.overlay.is_none() {
        return true;
    }
    if statx_fd(&node.fd).is_ok_and(|st| st.stx_nlink == 0) {
        data.overlay = None;
        return true;
    }
    false
}

fn remove_node(t: &mut Table, ino: u64) {
    if let Some((node, _)) = t.nodes.remove(&ino)
        && t.by_key.get(&node.key) == Some(&ino)
    {
        t.by_key.remove(&node.key);
    }
}

// ---------------------------------------------------------------------------------------------
// FUSE operations
// ---------------------------------------------------------------------------------------------

struct LazyFs(Arc<Shared>);

macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(Fail(errno)) => {
                $reply.error(errno);
                return;
            }
        }
    };
}

fn entry(reply: ReplyEntry, r: Res<(Arc<Node>, FileAttr)>) {
    match r {
        Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
        Err(Fail(e)) => reply.error(e),
    }
}

fn utime(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => timespec(t),
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Revalidate attributes on every read through an open file, so a reader that kept its
        // file open across a power cut sees the reverted size (and drops stale cached pages).
        if config
            .add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA)
            .is_err()
        {
            eprintln!("lazyfs: kernel lacks FUSE_AUTO_INVAL_DATA; open files may keep stale sizes");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = tri!(reply, self.0.node(parent));
        entry(reply, self.0.lookup_in(&parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let node = tri!(reply, self.0.node(ino));
        let attr = tri!(reply, self.0.attr(&node));
        reply.attr(&TTL, &attr);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = tri!(reply, self.0.node(ino));
        let symlink = node.kind == FileType::Symlink;
        if let Some(mode) = mode
            && !symlink
        {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            tri!(
                reply,
                rfs::chmodat(CWD, node.proc_path(), mode, AtFlags::empty()).map_err(Fail::from)
            );
        }
        if uid.is_some() || gid.is_some() {
            tri!(
                reply,
                rfs::chownat(
                    &node.fd,
                    "",
                    uid.map(rfs::Uid::from_raw),
                    gid.map(rfs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(Fail::from)
            );
        }
        if let Some(size) = size {
            tri!(
                reply,
                node.is_file().and_then(|()| self.0.truncate(&node, size))
            );
        }
        if (atime.is_some() || mtime.is_some()) && !symlink {
            let times = Timestamps {
                last_access: utime(atime),
                last_modification: utime(mtime),
            };
            tri!(
                reply,
                rfs::utimensat(CWD, node.proc_path(), &times, AtFlags::empty()).map_err(Fail::from)
            );
            if mtime.is_some()
                && let Some(ov) = lock(&node.data).overlay.as_mut()
            {
                // An explicit mtime wins over the time of the last pending write.
                ov.mtime = match mtime {
                    Some(TimeOrNow::SpecificTime(t)) => t,
                    _ => SystemTime::now(),
                };
            }
        }
        let attr = tri!(reply, self.0.attr(&node));
        reply.attr(&TTL, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = tri!(reply, self.0.node(ino));
        let target = tri!(
            reply,
            rfs::readlinkat(&node.fd, "", Vec::new()).map_err(Fail::from)
        );
        reply.data(target.as_bytes());
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(name));
        let kind = rfs::FileType::from_raw_mode(mode);
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let made = if kind == rfs::FileType::RegularFile {
            rfs::openat(
                &parent.fd,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                perm,
            )
            .map(drop)
        } else {
            rfs::mknodat(&parent.fd, name, kind, perm, u64::from(rdev))
        };
        tri!(reply, made.map_err(Fail::from));
        self.0.give_to_caller(req, &parent, name);
        entry(reply, self.0.lookup_in(&parent, name));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(name));
        tri!(
            reply,
            rfs::mkdirat(&parent.fd, name, Mode::from_raw_mode(mode & 0o7777)).map_err(Fail::from)
        );
        self.0.give_to_caller(req, &parent, name);
        entry(reply, self.0.lookup_in(&parent, name));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(name));
        tri!(
            reply,
            rfs::unlinkat(&parent.fd, name, AtFlags::empty()).map_err(Fail::from)
        );
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(name));
        tri!(
            reply,
            rfs::unlinkat(&parent.fd, name, AtFlags::REMOVEDIR).map_err(Fail::from)
        );
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(link_name));
        tri!(
            reply,
            rfs::symlinkat(target, &parent.fd, link_name).map_err(Fail::from)
        );
        self.0.give_to_caller(req, &parent, link_name);
        entry(reply, self.0.lookup_in(&parent, link_name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let parent = tri!(reply, self.0.node(parent));
        let newparent = tri!(reply, self.0.node(newparent));
        tri!(reply, check_name(name).and_then(|()| check_name(newname)));
        let done = if flags.is_empty() {
            rfs::renameat(&parent.fd, name, &newparent.fd, newname)
        } else {
            match rfs::RenameFlags::from_bits(flags.bits()) {
                Some(f) => rfs::renameat_with(&parent.fd, name, &newparent.fd, newname, f),
                None => Err(rustix::io::Errno::INVAL),
            }
        };
        tri!(reply, done.map_err(Fail::from));
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let node = tri!(reply, self.0.node(ino));
        let newparent = tri!(reply, self.0.node(newparent));
        tri!(reply, check_name(newname));
        tri!(
            reply,
            rfs::linkat(&node.fd, "", &newparent.fd, newname, AtFlags::EMPTY_PATH)
                .map_err(Fail::from)
        );
        entry(reply, self.0.lookup_in(&newparent, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = tri!(reply, self.0.node(ino));
        if node.kind == FileType::RegularFile {
            tri!(reply, node.file(&mut lock(&node.data)).map(drop));
            if flags.0 & (OFlags::TRUNC.bits() as i32) != 0 {
                tri!(reply, self.0.truncate(&node, 0));
            }
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = tri!(reply, self.0.node(ino));
        let data = tri!(reply, self.0.read(&node, offset, size));
        reply.data(&data);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let node = tri!(reply, self.0.node(ino));
        let Ok(len) = u32::try_from(data.len()) else {
            reply.error(Errno::from_i32(rustix::io::Errno::INVAL.raw_os_error()));
            return;
        };
        tri!(reply, self.0.write(&node, offset, data));
        reply.written(len);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() does not make data durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let node = tri!(reply, self.0.node(ino));
        tri!(reply, self.0.fsync(&node, datasync));
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let node = tri!(reply, self.0.node(ino));
        if node.kind != FileType::Directory {
            reply.error(Errno::from_i32(rustix::io::Errno::NOTDIR.raw_os_error()));
            return;
        }
        let entries = tri!(reply, self.0.list_dir(&node));
        let fh = {
            let mut dirs = lock(&self.0.dirs);
            dirs.last = dirs.last.wrapping_add(1);
            let fh = dirs.last;
            dirs.open.insert(fh, Arc::new(entries));
            fh
        };
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = lock(&self.0.dirs).open.get(&fh.0).cloned();
        let Some(entries) = entries else {
            reply.error(Errno::from_i32(rustix::io::Errno::BADF.raw_os_error()));
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.0.dirs).open.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let node = tri!(reply, self.0.node(ino));
        tri!(reply, self.0.fsyncdir(&node));
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let st = tri!(reply, rfs::fstatvfs(&self.0.root.fd).map_err(Fail::from));
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            u32::try_from(st.f_bsize).unwrap_or(4096),
            u32::try_from(st.f_namemax).unwrap_or(255),
            u32::try_from(st.f_frsize).unwrap_or(4096),
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Only called without default_permissions; the kernel checks permissions itself here.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = tri!(reply, self.0.node(parent));
        tri!(reply, check_name(name));
        let excl = if flags & (OFlags::EXCL.bits() as i32) != 0 {
            OFlags::EXCL
        } else {
            OFlags::empty()
        };
        let fd = tri!(
            reply,
            rfs::openat(
                &parent.fd,
                name,
                OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | excl,
                Mode::from_raw_mode(mode & 0o7777),
            )
            .map_err(Fail::from)
        );
        self.0.give_to_caller(req, &parent, name);
        // An O_PATH descriptor of exactly the inode just opened.
        let path_fd = tri!(
            reply,
            rfs::open(
                format!("/proc/self/fd/{}", fd.as_raw_fd()),
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(Fail::from)
        );
        let (node, _) = tri!(reply, self.0.register(path_fd));
        {
            let mut data = lock(&node.data);
            if data.file.is_none() && node.kind == FileType::RegularFile {
                data.file = Some(Arc::new(File::from(fd)));
            }
        }
        if flags & (OFlags::TRUNC.bits() as i32) != 0 {
            // Only reachable when the file already existed; the truncation is pending data.
            if let Err(Fail(e)) = self.0.truncate(&node, 0) {
                self.0.forget(node.ino, 1);
                reply.error(e);
                return;
            }
        }
        match self.0.attr(&node) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(Fail(e)) => {
                self.0.forget(node.ino, 1);
                reply.error(e);
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = 1; // FALLOC_FL_KEEP_SIZE
        let node = tri!(reply, self.0.node(ino));
        tri!(reply, node.is_file());
        match mode {
            0 => {
                let Some(end) = offset.checked_add(length) else {
                    reply.error(Errno::from_i32(rustix::io::Errno::FBIG.raw_os_error()));
                    return;
                };
                let size = tri!(reply, self.0.attr(&node)).size;
                if end > size {
                    tri!(reply, self.0.truncate(&node, end));
                }
                reply.ok();
            }
            KEEP_SIZE => reply.ok(),
            _ => reply.error(Errno::from_i32(rustix::io::Errno::OPNOTSUPP.raw_os_error())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process: arguments, mount, signals, control FIFO
// ---------------------------------------------------------------------------------------------

enum Exit {
    Usage(String),
    Mount(String),
    Other(String),
}

struct Args {
    mountpoint: PathBuf,
    backing: PathBuf,
    control: Option<PathBuf>,
    fsync_delay_ms: u64,
}

const USAGE: &str = "usage: lazyfs MOUNTPOINT BACKING_DIR [--control FIFO] [--fsync-delay-ms N]";

fn parse_args() -> Result<Args, Exit> {
    let mut positional = Vec::new();
    let mut control = None;
    let mut fsync_delay_ms = 0;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--fsync-delay-ms" {
            fsync_delay_ms = args
                .next()
                .and_then(|v| v.to_str().and_then(|v| v.parse::<u64>().ok()))
                .ok_or_else(|| Exit::Usage("--fsync-delay-ms needs a number of ms".into()))?;
        } else if a == "--control" {
            let Some(path) = args.next() else {
                return Err(Exit::Usage("--control needs a path".into()));
            };
            control = Some(PathBuf::from(path));
        } else if a == "-h" || a == "--help" {
            println!("{USAGE}\n(see the doc comment of examples/lazyfs.rs)");
            std::process::exit(0);
        } else if a.as_bytes().starts_with(b"-") {
            return Err(Exit::Usage(format!(
                "unknown option {}",
                a.to_string_lossy()
            )));
        } else {
            positional.push(PathBuf::from(a));
        }
    }
    let [mountpoint, backing]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|_| Exit::Usage("expected MOUNTPOINT and BACKING_DIR".into()))?;
    Ok(Args {
        mountpoint,
        backing,
        control,
        fsync_delay_ms,
    })
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            rfs::access(dir.join(name), rfs::Access::EXEC_OK).is_ok() && !dir.join(name).is_dir()
        })
    })
}

fn control_loop(path: PathBuf, shared: Arc<Shared>) {
    loop {
        // Blocks until a writer opens the FIFO; EOF when the last writer closes it.
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("lazyfs: control FIFO {}: {e}", path.display());
                return;
            }
        };
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "" => {}
                "clear-cache" | "lazyfs::clear-cache" | "power-cut" => shared.report_power_cut(),
                "sync" | "checkpoint" | "lazyfs::cache-checkpoint" => shared.report_flush(),
                other if other.starts_with("fsync-delay ") => {
                    match other["fsync-delay ".len()..].trim().parse::<u64>() {
                        Ok(ms) => {
                            shared
                                .fsync_delay_ms
                                .store(ms, std::sync::atomic::Ordering::Relaxed);
                            eprintln!("lazyfs: fsync delay {ms} ms");
                        }
                        Err(e) => eprintln!("lazyfs: bad control command {other:?}: {e}"),
                    }
                }
                other => eprintln!("lazyfs: unknown control command {other:?}"),
            }
        }
    }
}

fn prepare_control(path: &Path) -> Result<(), Exit> {
    match rfs::statat(CWD, path, AtFlags::empty()) {
        Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Fifo => Ok(()),
        Ok(_) => Err(Exit::Usage(format!(
            "--control {}: exists and is not a FIFO",
            path.display()
        ))),
        Err(rustix::io::Errno::NOENT) => rfs::mknodat(
            CWD,
            path,
            rfs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| Exit::Other(format!("mkfifo {}: {e}", path.display()))),
        Err(e) => Err(Exit::Other(format!("{}: {e}", path.display()))),
    }
}

fn run() -> Result<(), Exit> {
    let args = parse_args()?;
    // The kernel has already applied the caller's umask to the modes it sends.
    rustix::process::umask(Mode::empty());
    // One O_PATH descriptor per known inode: allow as many as the hard limit permits.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.maximum != lim.current {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    if let Some(c) = &args.control {
        prepare_control(c)?;
    }

    // Block the signals we handle in every thread; the main thread waits for them.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| Exit::Other(format!("blocking signals: {e}")))?;

    let root_fd = rfs::open(
        &args.backing,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Exit::Usage(format!("BACKING_DIR {}: {e}", args.backing.display())))?;
    let root_st = statx_fd(&root_fd)
        .map_err(|Fail(e)| Exit::Other(format!("stat {}: {e:?}", args.backing.display())))?;
    let root = Arc::new(Node {
        ino: INodeNo::ROOT.0,
        key: key_of(&root_st),
        kind: FileType::Directory,
        fd: root_fd,
        data: Mutex::new(Data::default()),
    });
    let shared = Arc::new(Shared {
        root,
        table: Mutex::new(Table {
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next_ino: SYNTHETIC_INO,
        }),
        dirs: Mutex::new(DirHandles::default()),
        notifier: OnceLock::new(),
        euid: rustix::process::geteuid().as_raw(),
        egid: rustix::process::getegid().as_raw(),
        trace: std::env::var_os("LAZYFS_TRACE").is_some_and(|v| v != "0" && !v.is_empty()),
        fsync_delay_ms: std::sync::atomic::AtomicU64::new(args.fsync_delay_ms),
    });

    let auto_unmount = on_path("fusermount3") || on_path("fusermount");
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lazyfs".into()),
        MountOption::Subtype("lazyfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    if auto_unmount {
        // fusermount unmounts if this process dies; fuser requires a non-owner-only ACL for it.
        config.mount_options.push(MountOption::AutoUnmount);
        config.acl = SessionACL::RootAndOwner;
    }
    config.n_threads = Some(THREADS);
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .map_err(|e| Exit::Usage(format!("MOUNTPOINT {}: {e}", args.mountpoint.display())))?;
    let mut session = fuser::Session::new(LazyFs(shared.clone()), &mountpoint, &config)
        .map_err(|e| Exit::Mount(format!("{}: {e}", args.mountpoint.display())))?;
    let _ = shared.notifier.set(session.notifier());
    let mut unmounter = session.unmount_callable();

    let (done_tx, done_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lazyfs-session".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                eprintln!("lazyfs: session ended: {e}");
            }
            let _ = done_tx.send(());
            // Wake the main thread (a no-op if it is already shutting down).
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::TERM,
            );
        })
        .map_err(|e| Exit::Other(format!("spawning the session thread: {e}")))?;

    if let Some(c) = args.control.clone() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("lazyfs-control".into())
            .spawn(move || control_loop(c, shared))
            .map_err(|e| Exit::Other(format!("spawning the control thread: {e}")))?;
    }

    eprintln!(
        "lazyfs: mounted {} (backing {}, auto_unmount {})",
        mountpoint.display(),
        args.backing.display(),
        if auto_unmount { "on" } else { "off" }
    );

    loop {
        match signals.wait() {
            Ok(Signal::SIGUSR1) => shared.report_power_cut(),
            Ok(Signal::SIGUSR2) => shared.report_flush(),
            Ok(_) => break,
            Err(e) => return Err(Exit::Other(format!("sigwait: {e}"))),
        }
    }

    // Unmount first, so that no write can arrive after the final flush (unless the mount is
    // busy: then it is detached lazily and the processes that still hold files on it may go on
    // writing until they close them or this process exits). Not via fuser's unmounter alone:
    // with auto_unmount it only hands the job to fusermount, which unmounts only a dead mount.
    if done_rx.try_recv().is_err() {
        unmount(&mountpoint);
    }
    let _ = unmounter.unmount();
    // The session ends once the kernel has dropped the connection; don't wait long for a
    // detached mount whose files are still open.
    let _ = done_rx.recv_timeout(Duration::from_secs(2));
    shared.report_flush();
    eprintln!("lazyfs: unmounted");
    Ok(())
}

/// Unmounts `mountpoint`: directly as root (lazily if busy), else with the setuid helper.
fn unmount(mountpoint: &Path) {
    use rustix::mount::UnmountFlags;
    match rustix::mount::unmount(mountpoint, UnmountFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => {
            eprintln!(
                "lazyfs: {} is busy; detaching it lazily",
                mountpoint.display()
            );
            if let Err(e) = rustix::mount::unmount(mountpoint, UnmountFlags::DETACH) {
                eprintln!("lazyfs: lazy unmount of {}: {e}", mountpoint.display());
            }
        }
        Err(rustix::io::Errno::PERM) => {
            let done = ["fusermount3", "fusermount"].iter().any(|helper| {
                std::process::Command::new(helper)
                    .args(["-u", "-z", "--"])
                    .arg(mountpoint)
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !done {
                eprintln!(
                    "lazyfs: cannot unmount {}: not permitted",
                    mountpoint.display()
                );
            }
        }
        Err(e) => eprintln!("lazyfs: unmount {}: {e}", mountpoint.display()),
    }
}

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(Exit::Usage(msg)) => {
            eprintln!("lazyfs: {msg}\n{USAGE}");
            2
        }
        Err(Exit::Mount(msg)) => {
            eprintln!("lazyfs: mount failed: {msg}");
            3
        }
        Err(Exit::Other(msg)) => {
            eprintln!("lazyfs: {msg}");
            1
        }
    };
    std::process::exit(code);
}
