//! Restores as the lab runs them: restore plans (what to bring back, from
//! which restore point, into which target), targets (a directory, a staging
//! namespace, a staging VMID), verification, and drills (a plan run on a
//! schedule, with its measured RTO).
//!
//! What exists today is [`verify`]; plans, targets and drills land here with
//! `labctl restore --to staging`. The engine's byte-level restore is
//! [`crate::repo::extract`]; this layer decides *what* to restore and
//! checks the result. Must not be imported by `repo/` or `backend/`.

pub mod verify;
