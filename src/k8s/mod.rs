//! The Kubernetes client setup shared by policy governance and the
//! platform sources: the usual kubeconfig rules (a given file, else
//! `$KUBECONFIG` / `~/.kube/config`, else in-cluster), a context, and a
//! [`KubeTarget`] that jobs carry and connect on their own runtime.
//!
//! Must not know any resource kind: callers build their own APIs.

pub mod validation;

use std::path::PathBuf;

/// Where a job finds the cluster (a client factory: a `kube::Client` is
/// bound to the runtime it was made on, so jobs connect where they run).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct KubeTarget {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    #[serde(default)]
    pub context: Option<String>,
}

impl KubeTarget {
    /// This target, or `fallback` when it names neither a kubeconfig nor a
    /// context (a source's table falling back to labctl.toml's `[platform]`).
    pub fn or(&self, fallback: &KubeTarget) -> KubeTarget {
        if self.kubeconfig.is_none() && self.context.is_none() {
            fallback.clone()
        } else {
            self.clone()
        }
    }

    /// Connects (see [`connect`]).
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn connect(&self) -> crate::error::Result<(kube::Client, String)> {
        connect(self.kubeconfig.as_deref(), self.context.as_deref()).await
    }
}

/// Connects with the kubeconfig (`path`, else `$KUBECONFIG`/`~/.kube/config`,
/// else in-cluster) and `context`.
///
/// # Errors
/// A usage error when no configuration can be found.
pub async fn connect(
    path: Option<&std::path::Path>,
    context: Option<&str>,
) -> crate::error::Result<(kube::Client, String)> {
    let opts = kube::config::KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let usage =
        |e: String| crate::error::LabError::usage(format!("no Kubernetes configuration: {e}"));
    let config = match (path, context) {
        (Some(p), _) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| usage(format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| usage(e.to_string()))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| usage(e.to_string()))?,
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| usage(e.to_string()))?,
    };
    let url = config.cluster_url.to_string();
    Ok((kube::Client::try_from(config)?, url))
}
