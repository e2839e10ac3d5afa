//! The replicas' disks, modelled on `src/durable`: one log directory per replica process on the
//! host it runs on, records appended in the order the store applies them, group commit (a sync
//! covers everything appended before it started and completes after a random disk delay), crashes
//! that lose what was not synced (a power cut may keep part of the group being synced: a torn or
//! partly written tail, cut at recovery), and recovery of the most advanced complete copy among
//! a host's directories (epoch, then sequence number), as `durable::recover` does.
//!
//! A directory is a list of segments (a restarted process appends to a new one, as the log
//! writer does); records a crash left unsynced in an older segment stay unsynced, so a later
//! power cut may still lose them (the log is then cut at the gap, as a recovery that finds
//! "updates missing" does).

use super::world::{Change, Kv, KvReply};

pub(super) type DiskId = usize;

/// A position in a replica's history, ordered by epoch, then update (`durable::Position`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub epoch: u64,
    pub seq: u64,
}

/// What a log holds: a position, whether it holds a complete copy, and how many base records
/// the writer appended since its process started (`wal::Durable`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Held {
    pub pos: Pos,
    pub base: bool,
    pub bases: u64,
}

/// One log record (`durable::Record`; `Pairs` are folded into `Base`).
#[derive(Clone, Debug)]
pub(super) enum Rec {
    /// Start of a base copy: the directory holds no usable copy until the next `Base`.
    Reset,
    /// End of a base copy: the space, its update number and dedupe table, at `epoch`.
    Base {
        epoch: u64,
        kv: Box<Kv>,
    },
    Change {
        epoch: u64,
        seq: u64,
        rid: u64,
        change: Change,
        reply: KvReply,
    },
    Epoch(u64),
}

impl Held {
    /// The log writer's accounting of one more record (`wal::Writer::take`).
    fn after(mut self, r: &Rec) -> Held {
        match r {
            Rec::Reset => self.base = false,
            Rec::Base { epoch, kv } => {
                self.pos = Pos {
                    epoch: *epoch,
                    seq: kv.seq,
                };
                self.base = true;
                self.bases += 1;
            }
            Rec::Change { epoch, seq, .. } => {
                self.pos.epoch = self.pos.epoch.max(*epoch);
                self.pos.seq = *seq;
            }
            Rec::Epoch(e) => self.pos.epoch = self.pos.epoch.max(*e),
        }
        self
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct Segment {
    pub recs: Vec<Rec>,
    /// `recs[..synced]` are on the disk; the rest only in the page cache.
    pub synced: usize,
}

/// One replica directory.
#[derive(Clone, Debug)]
pub(super) struct Disk {
    pub host: u8,
    /// The process that created it.
    pub creator: u32,
    /// The live process holding its LOCK.
    pub owner: Option<u32>,
    pub segs: Vec<Segment>,
    pub removed: bool,
    /// The writer's accounting (current owner): after every record of the last segment, and
    /// what it started from.
    after: Vec<Held>,
    start: Held,
    /// Records of the last segment handed to the OS (the group being synced ends here).
    pub written: usize,
    /// A group is being synced (its completion event is queued).
    pub syncing: bool,
    /// A group start is queued (at the current instant, after the current event).
    pub start_queued: bool,
    /// What the writer last published as held.
    pub published: Held,
    /// Bumped when the owner dies: its queued sync events are stale.
    pub life: u64,
    /// Copies this one supersedes were removed (done once, when it first holds a base).
    pub tidied: bool,
}

/// A directory's copy as recovery reads it.
#[derive(Clone, Debug)]
pub(super) struct Copy {
    pub held: Held,
    pub kv: Kv,
    /// Where the readable log ends (segment, record): anything after is cut.
    pub end: (usize, usize),
    /// The log had to be cut before its end (torn/missing records).
    pub cut: bool,
}

impl Disk {
    pub fn new(host: u8, owner: u32) -> Disk {
        Disk {
            host,
            creator: owner,
            owner: Some(owner),
            segs: vec![Segment::default()],
            removed: false,
            after: Vec::new(),
            start: Held::default(),
            written: 0,
            syncing: false,
            start_queued: false,
            published: Held::default(),
            life: 0,
            tidied: false,
        }
    }

    fn last(&self) -> &Segment {
        &self.segs[self.segs.len() - 1]
    }

    fn last_mut(&mut self) -> &mut Segment {
        let n = self.segs.len() - 1;
        &mut self.segs[n]
    }

    /// What the writer has appended so far.
    pub fn appended(&self) -> Held {
        self.after.last().copied().unwrap_or(self.start)
    }

    fn held_at(&self, n: usize) -> Held {
        if n == 0 {
            self.start
        } else {
            self.after[n - 1]
        }
    }

    pub fn append(&mut self, r: Rec) {
        let h = self.appended().after(&r);
        self.after.push(h);
        self.last_mut().recs.push(r);
    }

    /// Starts a group: everything appended so far goes to the OS. Returns its end, if any.
    pub fn start_group(&mut self) -> Option<usize> {
        let len = self.last().recs.len();
        if self.syncing || self.written >= len {
            return None;
        }
        self.written = len;
        self.syncing = true;
        Some(len)
    }

    /// What the group up to `upto` holds (published once it is synced, or at once when the
    /// executor counts a write to the OS as held).
    pub fn held_upto(&self, upto: usize) -> Held {
        self.held_at(upto)
    }

    /// Records were appended since the last group started.
    pub fn pending(&self) -> bool {
        self.written < self.last().recs.len()
    }

    /// The sync of the group ending at `upto` completed.
    pub fn synced(&mut self, upto: usize) {
        self.syncing = false;
        let s = &mut self.last_mut().synced;
        *s = (*s).max(upto);
    }

    /// A graceful stop: the store's last flush syncs everything appended.
    pub fn flush(&mut self) {
        let len = self.last().recs.len();
        self.last_mut().synced = len;
        self.written = len;
        self.published = self.appended();
    }

    /// The owner died. `keep(n)`: how many of a segment's `n` unsynced records that reached the
    /// OS survive (a prefix); records still queued for the writer never do.
    pub fn crash(&mut self, mut keep: impl FnMut(usize) -> usize) {
        let live = self.owner.is_some();
        let n = self.segs.len();
        for (i, seg) in self.segs.iter_mut().enumerate() {
            let reachable = if live && i == n - 1 {
                self.written.max(seg.synced)
            } else {
                seg.recs.len()
            };
            let k = keep(reachable - seg.synced).min(reachable - seg.synced);
            seg.recs.truncate(seg.synced + k);
        }
        self.owner = None;
        self.life += 1;
        self.syncing = false;
        self.start_queued = false;
    }

    /// A power cut of the host while nobody owns the directory: page-cache records may be lost.
    pub fn lose_page_cache(&mut self, mut keep: impl FnMut(usize) -> usize) {
        for seg in &mut self.segs {
            let extra = seg.recs.len() - seg.synced;
            let k = keep(extra).min(extra);
            seg.recs.truncate(seg.synced + k);
        }
    }

    /// Reads the directory as recovery does (`recover::read_copy` + `apply`): replays the
    /// segments in order and stops at the first record it cannot apply.
    pub fn read(&self) -> Copy {
        let mut held = Held::default();
        let mut kv = Kv::default();
        for (si, seg) in self.segs.iter().enumerate() {
            for (ri, r) in seg.recs.iter().enumerate() {
                match r {
                    Rec::Reset => {
                        held.base = false;
                        kv = Kv::default();
                    }
                    Rec::Base { epoch, kv: k } => {
                        held.base = true;
                        held.pos = Pos {
                            epoch: *epoch,
                            seq: k.seq,
                        };
                        kv = (**k).clone();
                    }
                    Rec::Change {
                        epoch,
                        seq,
                        rid,
                        change,
                        reply,
                    } => {
                        if !held.base || *seq > held.pos.seq + 1 {
                            // An update before any base, or updates missing: cut here.
                            return Copy {
                                held,
                                kv,
                                end: (si, ri),
                                cut: true,
                            };
                        }
                        if *seq == held.pos.seq + 1 {
                            kv.apply(change);
                            kv.seq = *seq;
                            kv.dedupe.insert(*rid, reply.clone());
                            held.pos.seq = *seq;
                            held.pos.epoch = held.pos.epoch.max(*epoch);
                        }
                    }
                    Rec::Epoch(e) => held.pos.epoch = held.pos.epoch.max(*e),
                }
            }
        }
        let end = (self.segs.len() - 1, self.last().recs.len());
        Copy {
            held,
            kv,
            end,
            cut: false,
        }
    }

    /// A new owner continues in this directory from `copy` (its log cut where recovery stopped)
    /// in a new segment.
    pub fn take_over(&mut self, owner: u32, copy: &Copy) {
        let (si, ri) = copy.end;
        self.segs.truncate(si + 1);
        let seg = &mut self.segs[si];
        seg.recs.truncate(ri);
        if copy.cut {
            // `recover::cut_log` truncates the segment and syncs it: what is before the cut is
            // on the disk now.
            seg.synced = ri;
        }
        // `recover::sync_copy`: every segment the copy was read from is synced before anything
        // is served from it (records a crashed process left in the page cache become durable).
        for s in &mut self.segs {
            s.synced = s.recs.len();
        }
        self.segs.push(Segment::default());
        self.owner = Some(owner);
        self.after.clear();
        // (`open_data`: what the directory holds, no base record appended by this process yet.)
        self.start = Held {
            bases: 0,
            ..copy.held
        };
        self.published = self.start;
        self.written = 0;
        self.syncing = false;
        self.start_queued = false;
        self.tidied = false;
    }
}

/// Recovery on `host` (`recover::recover`): the most advanced complete copy among the host's
/// directories, in creation order, a free one preferred at equal positions. `Err` with the
/// directory when that copy is held by a running process (the server refuses to start).
pub(super) fn recover(disks: &[Disk], host: u8) -> Result<Option<(DiskId, Copy)>, DiskId> {
    let mut best: Option<(DiskId, Copy, bool)> = None;
    for (id, d) in disks.iter().enumerate() {
        if d.removed || d.host != host {
            continue;
        }
        let c = d.read();
        if !c.held.base {
            continue;
        }
        let in_use = d.owner.is_some();
        let better = match &best {
            None => true,
            Some((_, b, b_in_use)) => {
                c.held.pos > b.held.pos || (c.held.pos == b.held.pos && *b_in_use && !in_use)
            }
        };
        if better {
            best = Some((id, c, in_use));
        }
    }
    match best {
        None => Ok(None),
        Some((id, _, true)) => Err(id),
        Some((id, c, false)) => Ok(Some((id, c))),
    }
}

/// The directories on `keep`'s host that a durable complete copy at `pos` supersedes (older or
/// equal position, or incomplete) and that no running process holds (`remove_superseded`).
pub(super) fn superseded(disks: &[Disk], keep: DiskId, pos: Pos) -> Vec<DiskId> {
    let host = disks[keep].host;
    disks
        .iter()
        .enumerate()
        .filter(|(id, d)| *id != keep && d.host == host && !d.removed && d.owner.is_none())
        .filter(|(_, d)| {
            let c = d.read();
            !c.held.base || c.held.pos <= pos
        })
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(epoch: u64, seq: u64) -> Rec {
        Rec::Change {
            epoch,
            seq,
            rid: seq,
            change: Some((0, Some(seq))),
            reply: KvReply::Applied,
        }
    }

    #[test]
    fn groups_crashes_and_recovery() {
        let mut d = Disk::new(0, 1);
        d.append(Rec::Reset);
        d.append(Rec::Base {
            epoch: 0,
            kv: Box::default(),
        });
        d.append(Rec::Epoch(1));
        assert_eq!(d.start_group(), Some(3));
        d.append(change(1, 1));
        assert_eq!(d.start_group(), None, "one group at a time");
        d.synced(3);
        assert_eq!(
            d.held_upto(3),
            Held {
                pos: Pos { epoch: 1, seq: 0 },
                base: true,
                bases: 1,
            }
        );
        assert_eq!(d.start_group(), Some(4));
        d.append(change(1, 2));
        // Killed: the group being synced may survive in part, the queued record never.
        d.crash(|n| n);
        assert_eq!(d.segs[0].recs.len(), 4);
        let c = d.read();
        assert_eq!(c.held.pos, Pos { epoch: 1, seq: 1 });
        // A later power cut loses the unsynced record of the dead process.
        d.lose_page_cache(|_| 0);
        assert_eq!(d.read().held.pos, Pos { epoch: 1, seq: 0 });
        // Taken over: appends go to a new segment.
        let c = d.read();
        d.take_over(2, &c);
        d.append(change(1, 1));
        assert_eq!(d.segs.len(), 2);
        assert_eq!(d.read().held.pos.seq, 1);
    }

    #[test]
    fn a_gap_cuts_the_log_and_incomplete_copies_are_skipped() {
        let mut a = Disk::new(0, 1);
        a.append(Rec::Reset);
        a.append(Rec::Base {
            epoch: 2,
            kv: Box::default(),
        });
        a.append(change(2, 1));
        a.flush();
        a.crash(|_| 0);
        let c = a.read();
        a.take_over(3, &c);
        a.append(change(2, 2));
        a.flush();
        a.crash(|_| 0);
        // The first segment loses its last record (it was never synced): update 2 follows a gap.
        a.segs[0].synced = 2;
        a.lose_page_cache(|_| 0);
        let c = a.read();
        assert!(c.cut);
        assert_eq!(c.held.pos, Pos { epoch: 2, seq: 0 });
        let mut b = Disk::new(0, 4);
        b.append(Rec::Epoch(9));
        b.append(Rec::Reset);
        b.flush();
        b.crash(|_| 0);
        let disks = vec![a, b];
        let (id, c) = recover(&disks, 0).unwrap().unwrap();
        assert_eq!(id, 0);
        assert_eq!(c.held.pos.epoch, 2);
        assert_eq!(superseded(&disks, 0, c.held.pos), vec![1]);
    }
}
