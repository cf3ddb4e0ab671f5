//! labctl's integration tests: one binary, one module per area.
//!
//! Tests drive the real `labctl` binary in temporary directories with a
//! cleared environment (so they can never touch a real repository), or the
//! library directly where many cases are needed (property tests).

mod common;

mod cli;
mod daemon;
mod damage;
mod dedup;
mod drill;
mod etcd;
mod faultproxy;
mod fixture;
mod integrity;
mod keys;
mod kfp;
mod killed;
mod kube;
mod kube_sim;
mod layout;
mod mariadb;
mod mlflow;
mod points;
mod policy;
mod postgres;
mod provision;
mod prune;
mod pvc;
mod pve_sim;
mod roundtrip;
pub mod s3;
mod staging;
mod vm;
