//! A Proxmox VE API client (reqwest, API-token authentication), and the
//! platform file that says how to reach the cluster ([`platform`]), shared
//! by `labctl provision` and the VM source.
//!
//! - Every error carries what it was about: method and path, node, VMID and
//!   task UPID where known, and PVE's own message.
//! - Tasks (clone, resize, start, destroy) are polled until `status` is
//!   `stopped`; an `exitstatus` of `OK` is success, `WARNINGS: N` success
//!   with the warnings printed, anything else an error with the end of the
//!   task log.
//! - Only failures that can succeed later are retried, with backoff: config
//!   lock timeouts (`can't lock file ... got timeout`, `VM is locked`), `got
//!   no worker upid`, 502-504 and pveproxy's 595/596, timeouts and dropped
//!   connections; and a 400 for a task status right after the task started
//!   (the UPID is not visible yet). PVE's other 500s ("already exists",
//!   "already running"), a refused connection and certificate errors fail
//!   at once.
//! - The token secret is sent only in the `Authorization` header and never
//!   appears in errors or logs.

pub mod platform;
pub mod ssh;

use secrecy::ExposeSecret;
use serde_json::Value;
use std::time::Duration;

/// What went wrong, with its context.
#[derive(Debug, Clone)]
pub struct PveError {
    pub method: String,
    pub path: String,
    /// HTTP status (0 for transport errors and failed tasks).
    pub status: u16,
    pub message: String,
    pub node: Option<String>,
    pub vmid: Option<u32>,
    pub upid: Option<String>,
    /// For a transport error (status 0, no task): whether trying again can
    /// help (a timeout or a dropped connection can; a refused connection,
    /// a certificate or a name that does not resolve cannot).
    pub retry_transport: bool,
}

impl std::fmt::Display for PveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PVE {} {}", self.method, self.path)?;
        if self.status != 0 {
            write!(f, " ({})", self.status)?;
        }
        write!(f, ": {}", self.message)?;
        let mut ctx = vec![];
        if let Some(n) = &self.node {
            ctx.push(format!("node {n}"));
        }
        if let Some(v) = self.vmid {
            ctx.push(format!("VMID {v}"));
        }
        if let Some(u) = &self.upid {
            ctx.push(format!("task {u}"));
        }
        if !ctx.is_empty() {
            write!(f, " [{}]", ctx.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for PveError {}

impl PveError {
    pub fn transient(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        // Someone changed the config since we read it: retrying the same
        // request cannot help; the next plan sees the change.
        if m.contains("detected modified configuration") {
            return false;
        }
        if self.status == 0 && self.upid.is_none() {
            return self.retry_transport;
        }
        // PVE answers 500 for whatever its API code dies with ("config file
        // already exists", "VM 702 already running", a bad storage): only
        // these messages say the same request can succeed later. 502-504
        // come from a proxy in front, 595/596 from pveproxy failing to reach
        // the node that owns the VM (PVE::APIServer::AnyEvent).
        matches!(self.status, 502..=504 | 595 | 596)
            || m.contains("got timeout")
            || m.contains("can't lock file")
            || m.contains("vm is locked")
            || m.contains("got no worker upid")
    }
    /// Whether this is PVE saying the object does not exist.
    pub fn is_not_found(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        m.contains("does not exist") || self.status == 404
    }
    fn exit_code(&self) -> crate::error::ExitCode {
        match self.status {
            401 | 403 => crate::error::ExitCode::Key,
            400 => crate::error::ExitCode::Usage,
            _ => crate::error::ExitCode::Failure,
        }
    }
    /// As a classified error for the CLI's exit code.
    pub fn into_lab(self) -> crate::error::Error {
        let code = self.exit_code();
        crate::error::LabError::new(code, self.to_string()).into()
    }
}

/// Whether a task's exit status is `WARNINGS: N` (a success that logged
/// warnings).
fn is_warnings(exit: &str) -> bool {
    exit.strip_prefix("WARNINGS: ")
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Context attached to a request's errors.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub node: Option<String>,
    pub vmid: Option<u32>,
}

impl Ctx {
    pub fn vm(node: &str, vmid: u32) -> Ctx {
        Ctx {
            node: Some(node.into()),
            vmid: Some(vmid),
        }
    }
}

/// TLS trust for the PVE endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    System,
    CaFile(std::path::PathBuf),
    /// SHA-256 of the certificate, 32 bytes.
    Fingerprint(Vec<u8>),
    Insecure,
}

/// The token secret: held, never printed.
#[derive(Clone)]
pub struct Token {
    pub id: String,
    pub secret: secrecy::SecretString,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token {{ id: {}, secret: <redacted> }}", self.id)
    }
}

/// Client options.
#[derive(Debug, Clone)]
pub struct Options {
    pub trust: Trust,
    pub attempts: u32,
    pub retry_base: Duration,
    pub poll: Duration,
    pub task_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let ms = |var: &str, d: u64| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_millis(d), Duration::from_millis)
        };
        Options {
            trust: Trust::System,
            attempts: 6,
            // Overridable for tests against the simulator.
            retry_base: ms("LABCTL_PVE_RETRY_MS", 1000),
            poll: ms("LABCTL_PVE_POLL_MS", 1000),
            task_timeout: Duration::from_secs(900),
        }
    }
}

/// A connected client. It talks to one endpoint at a time; with several
/// (any node of a cluster serves the whole API: pveproxy forwards to the
/// node that owns a VM) a request that cannot reach the current one
/// moves the client to the next and counts as transient, until every
/// endpoint has failed in a row.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    bases: std::sync::Arc<Vec<String>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Transport failures in a row, over all endpoints.
    failing: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    auth: std::sync::Arc<secrecy::SecretString>,
    opts: Options,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pve::Client({})", self.base())
    }
}

impl Client {
    /// A client for `endpoint` (`https://host:8006`).
    ///
    /// # Errors
    /// A usage error for an unreadable CA file.
    pub fn new(endpoint: &str, token: &Token, opts: Options) -> crate::error::Result<Client> {
        Self::with_endpoints(&[endpoint.to_string()], token, opts)
    }

    /// A client for a cluster's endpoints, starting with the first.
    ///
    /// # Errors
    /// A usage error for an unreadable CA file.
    pub fn with_endpoints(
        endpoints: &[String],
        token: &Token,
        opts: Options,
    ) -> crate::error::Result<Client> {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("labctl/", env!("CARGO_PKG_VERSION")));
        match &opts.trust {
            Trust::System => {}
            Trust::CaFile(p) => {
                let pem = std::fs::read(p).map_err(|e| {
                    crate::error::LabError::usage(format!("PVE CA file {}: {e}", p.display()))
                })?;
                let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    crate::error::LabError::usage(format!("PVE CA file {}: {e}", p.display()))
                })?;
                b = b.tls_certs_only([cert]);
            }
            Trust::Fingerprint(fp) => {
                b = b.tls_backend_preconfigured(pinned_tls(fp.clone())?);
            }
            // The platform file's loader warns once (platform.rs).
            Trust::Insecure => b = b.tls_danger_accept_invalid_certs(true),
        }
        let http = b
            .build()
            .map_err(|e| anyhow::anyhow!("PVE client: {}", e.without_url()))?;
        let auth = format!("PVEAPIToken={}={}", token.id, token.secret.expose_secret());
        Ok(Client {
            http,
            bases: std::sync::Arc::new(
                endpoints
                    .iter()
                    .map(|e| format!("{}/api2/json", e.trim_end_matches('/')))
                    .collect(),
            ),
            current: std::sync::Arc::default(),
            failing: std::sync::Arc::default(),
            auth: std::sync::Arc::new(secrecy::SecretString::from(auth)),
            opts,
        })
    }

    /// The endpoint in use (`https://host:8006/api2/json`).
    pub fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    /// Uses endpoint `i` from now on.
    pub(crate) fn use_endpoint(&self, i: usize) {
        self.current
            .store(i % self.bases.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How many endpoints the client knows.
    pub(crate) fn endpoints(&self) -> usize {
        self.bases.len()
    }

    /// How long to wait before attempt `attempt + 1` (counting from 1),
    /// or `None` when the attempts are used up.
    pub(crate) fn backoff(&self, attempt: u32) -> Option<Duration> {
        (attempt < self.opts.attempts).then(|| {
            let wait = self.opts.retry_base * 2u32.pow(attempt.saturating_sub(1));
            let jitter = rand::random::<u64>() % (wait.as_millis() as u64 / 4 + 1);
            wait + Duration::from_millis(jitter)
        })
    }

    /// One request, no retries. Returns `data`.
    pub(crate) async fn once(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, String)],
        ctx: &Ctx,
    ) -> Result<Value, PveError> {
        use std::sync::atomic::Ordering;
        let index = self.current.load(Ordering::Relaxed) % self.bases.len();
        let base = &self.bases[index];
        let url = format!("{base}{path}");
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", self.auth.expose_secret());
        req = if method == reqwest::Method::GET || method == reqwest::Method::DELETE {
            req.query(params)
        } else {
            req.form(params)
        };
        let err = |status: u16, message: String| PveError {
            method: method.to_string(),
            path: path.to_string(),
            status,
            message,
            node: ctx.node.clone(),
            vmid: ctx.vmid,
            upid: None,
            retry_transport: false,
        };
        let resp = req.send().await.map_err(|e| {
            // The endpoint is not secret; the token is never in the URL.
            let e = e.without_url();
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why.push_str(&format!(": {s}"));
                src = s.source();
            }
            let lower = why.to_ascii_lowercase();
            let permanent = [
                "connection refused",
                "certificate",
                "tls",
                "ssl",
                "handshake",
                "dns error",
                "failed to lookup",
                "builder error",
            ]
            .iter()
            .any(|p| lower.contains(p));
            // Another endpoint may answer: move on to it (unless another
            // request already did) and let the caller retry, until every
            // endpoint has failed in a row.
            let failing = self.failing.fetch_add(1, Ordering::Relaxed) + 1;
            let next = self.bases.len() > 1 && failing < self.bases.len() * 2;
            if next {
                let _ = self.current.compare_exchange(
                    index,
                    (index + 1) % self.bases.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            PveError {
                retry_transport: e.is_timeout() || !permanent || next,
                ..err(0, format!("cannot reach PVE at {base}: {why}"))
            }
        })?;
        self.failing.store(0, Ordering::Relaxed);
        let status = resp.status();
        // PVE puts its message in the HTTP reason phrase.
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).to_string())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body.get("data").cloned().unwrap_or(Value::Null));
        }
        // PVE puts its message in the reason phrase and parameter errors in
        // `errors`; reqwest only exposes the canonical phrase, so prefer the
        // body's `message`/`errors`.
        let mut msg = body
            .get("message")
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or(&reason)
            .to_string();
        if let Some(errs) = body.get("errors").and_then(Value::as_object) {
            let list: Vec<String> = errs
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default().trim()))
                .collect();
            msg = format!("{msg} ({})", list.join("; "));
        }
        if status.as_u16() == 401 {
            msg =
                format!("{msg}: the API token was refused (check proxmox.token.id and the secret)");
        }
        Err(err(status.as_u16(), msg))
    }

    /// A request with retries for transient failures.
    ///
    /// # Errors
    /// The last [`PveError`].
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, String)],
        ctx: &Ctx,
    ) -> Result<Value, PveError> {
        let mut attempt = 0;
        loop {
            match self.once(method.clone(), path, params, ctx).await {
                Ok(v) => return Ok(v),
                Err(e) if e.transient() && attempt + 1 < self.opts.attempts => {
                    attempt += 1;
                    tokio::time::sleep(self.backoff(attempt).unwrap_or_default()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn get(
        &self,
        path: &str,
        params: &[(&str, String)],
        ctx: &Ctx,
    ) -> Result<Value, PveError> {
        self.call(reqwest::Method::GET, path, params, ctx).await
    }

    /// Starts a task (POST/PUT/DELETE returning a UPID) and waits for it.
    ///
    /// # Errors
    /// The request's error, or the task's (with its UPID and log tail).
    pub async fn task(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, String)],
        ctx: &Ctx,
    ) -> Result<String, PveError> {
        let data = self.call(method.clone(), path, params, ctx).await?;
        let Some(upid) = data.as_str().map(String::from) else {
            // Some calls (a synchronous config change) return null: done.
            return Ok(String::new());
        };
        self.wait_task(&upid, ctx).await?;
        Ok(upid)
    }

    /// Polls a task until it stops; success only with exitstatus `OK`.
    ///
    /// # Errors
    /// A [`PveError`] naming the UPID with the end of the task log.
    pub async fn wait_task(&self, upid: &str, ctx: &Ctx) -> Result<(), PveError> {
        let node = upid.split(':').nth(1).unwrap_or_default().to_string();
        let path = format!("/nodes/{node}/tasks/{}/status", urlencoding::encode(upid));
        let started = tokio::time::Instant::now();
        let with_upid = |mut e: PveError| {
            e.upid = Some(upid.to_string());
            e
        };
        loop {
            match self.once(reqwest::Method::GET, &path, &[], ctx).await {
                Ok(st) => {
                    if st.get("status").and_then(Value::as_str) == Some("stopped") {
                        let exit = st
                            .get("exitstatus")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        if exit == "OK" {
                            return Ok(());
                        }
                        // A task that logged warnings ends "WARNINGS: N" and
                        // succeeded (pve-common PVE::Tools
                        // upid_status_is_error: only OK and WARNINGS: N are
                        // not errors): say what it warned about, go on.
                        if is_warnings(&exit) {
                            let log = self.task_log_tail(&node, upid, ctx).await;
                            let what = match (&ctx.node, ctx.vmid) {
                                (Some(n), Some(v)) => format!("VMID {v} on {n}: "),
                                _ => String::new(),
                            };
                            eprintln!("warning: {what}task {upid} ended with {exit}: {log}");
                            return Ok(());
                        }
                        let log = self.task_log_tail(&node, upid, ctx).await;
                        return Err(with_upid(PveError {
                            method: "TASK".into(),
                            path: path.clone(),
                            status: 0,
                            message: format!(
                                "task failed: {}{}",
                                if exit.is_empty() {
                                    "no exit status"
                                } else {
                                    &exit
                                },
                                if log.is_empty() {
                                    String::new()
                                } else {
                                    format!(" — log: {log}")
                                }
                            ),
                            node: ctx.node.clone(),
                            vmid: ctx.vmid,
                            upid: None,
                            retry_transport: false,
                        }));
                    }
                }
                // Right after a task starts its UPID may not be visible yet.
                Err(e) if e.status == 400 && started.elapsed() < Duration::from_secs(30) => {}
                Err(e) if e.transient() && started.elapsed() < self.opts.task_timeout => {}
                Err(e) => return Err(with_upid(e)),
            }
            if started.elapsed() > self.opts.task_timeout {
                return Err(with_upid(PveError {
                    method: "TASK".into(),
                    path,
                    status: 0,
                    message: format!(
                        "still running after {}s (proxmox.task_timeout_secs); it may finish on its own — check the PVE task list",
                        self.opts.task_timeout.as_secs()
                    ),
                    node: ctx.node.clone(),
                    vmid: ctx.vmid,
                    upid: None,
                    retry_transport: false,
                }));
            }
            tokio::time::sleep(self.opts.poll).await;
        }
    }

    async fn task_log_tail(&self, node: &str, upid: &str, ctx: &Ctx) -> String {
        let path = format!("/nodes/{node}/tasks/{}/log", urlencoding::encode(upid));
        let Ok(v) = self
            .once(reqwest::Method::GET, &path, &[("limit", "500".into())], ctx)
            .await
        else {
            return String::new();
        };
        let lines: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.get("t").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        lines
            .iter()
            .rev()
            .take(3)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// Accepts exactly the server certificate whose SHA-256 is `fp` (the PVE
/// self-signed certificate pinned as `pvenode cert info` shows it); the
/// handshake signature is still verified against that certificate.
#[derive(Debug)]
struct Pinned {
    fp: Vec<u8>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        if sha2::Sha256::digest(end_entity.as_ref()).as_slice() == self.fp.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the PVE certificate does not match proxmox.tls.fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pinned_tls(fp: Vec<u8>) -> crate::error::Result<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Pinned { fp, provider }))
        .with_no_client_auth();
    Ok(cfg)
}

/// The non-loopback IPv4 addresses in a guest agent's
/// `network-get-interfaces` answer.
pub fn agent_ipv4s(v: &Value) -> Vec<String> {
    let mut ips = vec![];
    for iface in v
        .get("result")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for a in iface
            .get("ip-addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = a.get("ip-address").and_then(Value::as_str).unwrap_or("");
            let v4 = a.get("ip-address-type").and_then(Value::as_str) == Some("ipv4");
            if v4 && !ip.starts_with("127.") {
                ips.push(ip.to_string());
            }
        }
    }
    ips
}

/// Waits until the VM's guest agent reports a non-loopback IPv4 address
/// (the guest booted and its network is up); returns the addresses.
///
/// # Errors
/// The API's error, or a timeout naming the VM.
pub async fn wait_agent(
    c: &Client,
    node: &str,
    vmid: u32,
    timeout: std::time::Duration,
) -> Result<Vec<String>, PveError> {
    let ctx = Ctx::vm(node, vmid);
    let path = format!("/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces");
    let started = tokio::time::Instant::now();
    loop {
        match c.get(&path, &[], &ctx).await {
            Ok(v) => {
                let ips = agent_ipv4s(&v);
                if !ips.is_empty() {
                    return Ok(ips);
                }
            }
            Err(e) if started.elapsed() < timeout && (e.status == 500 || e.transient()) => {}
            Err(e) => return Err(e),
        }
        if started.elapsed() >= timeout {
            return Err(PveError {
                method: "GET".into(),
                path,
                status: 0,
                message: format!("the guest agent did not report an IPv4 address within {}s: is qemu-guest-agent installed in the template?", timeout.as_secs()),
                node: Some(node.into()),
                vmid: Some(vmid),
                upid: None,
                retry_transport: false,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
