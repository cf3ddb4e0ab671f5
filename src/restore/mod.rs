//! Restores as the lab runs them: restore plans (what to bring back, from
//! which restore point, into which target), the staging restore that runs
//! a plan, verification, and drills (a plan run on a schedule, with its
//! measured RTO).
//!
//! The engine's byte-level restore is [`crate::repo::extract`]; this layer
//! decides *what* to restore, where, in which order, and checks the result.
//! Must not be imported by `repo/` or `backend/`.

pub mod plan;
pub mod staging;
pub mod verify;
