//! Local records that are not a cache of the repository: the daemon's job
//! history, provision records, the policy audit chain. Each is the only
//! copy of what it holds, so each lives in its own private file and a cache
//! reset never touches it.
//!
//! Must not import from the workflows that write them (schedule, provision,
//! policy): they depend on records, not the other way round.

pub mod jobs;
pub mod policy_audit;
pub mod provision;
