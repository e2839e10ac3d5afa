//! Fault-injection testing: a linearizability checker for recorded client histories, and the
//! `tuplespace nemesis` runner that records histories under faults.

pub mod checker;
pub mod runner;
