//! labctl: provision, back up, restore and govern a university ML lab platform.
//!
//! The library holds all behaviour; `main.rs` only parses the command line,
//! calls [`cli::run`] and maps errors to exit codes (see [`error::ExitCode`]).
//!
//! Module map (one concern each):
//! - [`repo`]: the encrypted, deduplicated repository (format, chunker, blobs,
//!   packs, index, snapshots, keys, backup, restore, check).
//! - [`backend`]: where repository objects live (local filesystem today).
//! - [`catalog`]: the local SQLite cache of the index, snapshots and file cache.
//! - [`config`]: `labctl.toml`, the daemon's configuration.
//! - [`schedule`]: the daemon (cron jobs, history, metrics, webhooks).
//! - [`policy`]: researcher profiles, RBAC and quotas from policy files.
//! - [`provision`]: `labctl provision` (platform.yaml, plan, apply, destroy).
//! - [`proxmox`]: the PVE API client.
//! - [`cli`]: the clap definitions and one file per command.

pub mod backend;

pub mod cli;

pub mod demo;
pub mod error;
pub mod policy;
pub mod provision;
pub mod proxmox;
pub mod records;
pub mod repo;
pub mod schedule;
pub mod sources;
pub mod util;
