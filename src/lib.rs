//! labctl: provision, back up, restore and govern a university ML lab platform.
//!
//! The library holds all behaviour; `main.rs` only parses the command line,
//! calls [`cli::run`] and maps errors to exit codes (see [`error::ExitCode`]).
//!
//! Module map, lowest layer first (each imports only from layers above it
//! in this list; docs/DEVELOPING.md has the rules, a test enforces them):
//! - [`error`]: exit codes and typed errors.
//! - [`util`]: units (one grammar each), secret files, locks, SQLite, progress.
//! - [`backend`]: where repository objects live (local filesystem, S3).
//! - [`repo`]: the encrypted, deduplicated repository engine (format, keys,
//!   chunker, packs, index, catalog, backup runs, extract, check, prune).
//! - [`records`]: job history, provision records, the policy audit chain.
//! - [`k8s`], [`proxmox`]: clients for the Kubernetes API and Proxmox VE.
//! - [`sources`]: backup sources, one file per kind.
//! - [`restore`]: restore plans, targets, verification, drills.
//! - [`policy`]: researcher profiles, RBAC and quotas from policy files.
//! - [`provision`]: `labctl provision` (platform.yaml, plan, apply, destroy).
//! - [`schedule`]: the daemon (labctl.toml, cron jobs, metrics, webhooks).
//! - [`demo`]: the main job end to end on a local sample.
//! - [`cli`]: the clap definitions and one file per command.

pub mod backend;
pub mod cli;
pub mod demo;
pub mod error;
pub mod k8s;
pub mod policy;
pub mod provision;
pub mod proxmox;
pub mod records;
pub mod repo;
pub mod restore;
pub mod schedule;
pub mod sources;
pub mod util;
