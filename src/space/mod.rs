//! The tuple space: tuples, patterns, the ordered store, and snapshot files.
//!
//! Pure synchronous logic. Must never touch the network, spawn tasks, use
//! async, or do any I/O other than snapshot file save/load in `snapshot`.

pub mod pattern;
pub mod snapshot;
pub mod store;
pub mod tuple;
pub mod waiters;

pub use pattern::{IndexHint, Pattern, PatternError, PatternLimits};
pub use snapshot::{SnapshotError, load_snapshot, save_snapshot};
pub use store::{Change, Space};
pub use tuple::{
    Pair, TupleError, TupleLimits, check_tuple, pair_from_value, pair_to_value, split_text,
    text_form, tuple_from_value,
};
