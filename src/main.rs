//! The `meridian` command: `serve`, `token issue`, `migrate`, `audit verify`, `audit anchor`,
//! `catalog backup`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meridian_server::auth::{JwtAuthority, Role, load_or_create_secret};
use meridian_server::config::{Config, process_environment};
use meridian_server::{RunningNode, Settings, termination_signal};

const DEFAULT_CONFIG_PATH: &str = "config/meridian.toml";

/// mimalloc: measurably faster than glibc malloc on the ingest path's many small allocations, and
/// keeps RSS from growing through per-thread arena fragmentation. Built without transparent huge
/// pages (`no_thp`): with them the resident set under load doubled (ARCHITECTURE.md).
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Multi-region, Segment-compatible event ingestion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Config file merged over the embedded defaults (default: config/meridian.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Validate the configuration, print the resolved settings, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Admin JWTs.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Create or upgrade the catalog schema, then exit (serve does this at start too).
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The admin audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The catalog (orgs, projects, keys, audit log).
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Where projects' data lives.
    Residency {
        #[command(subcommand)]
        command: ResidencyCommand,
    },
    /// The admin console (/console).
    Console {
        #[command(subcommand)]
        command: ConsoleCommand,
    },
    /// Projects, written to the catalog directly (the admin API does the same over HTTP).
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Create a project pinned to a region forever, with its first write key. Prints the project
    /// as JSON (the write key is shown once), or only the key with --key-only. A running node
    /// picks it up within catalog.refresh_interval_ms.
    Create {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The org the project belongs to (it must exist).
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        /// The region the project's data stays in (default: default_region).
        #[arg(long)]
        region: Option<String>,
        /// Print only the write key.
        #[arg(long)]
        key_only: bool,
    },
}

#[derive(Subcommand)]
enum ConsoleCommand {
    /// Print a link that signs into the console with a short-lived token (kept in the link's
    /// fragment: browsers never send it to a server, and the console takes it out of the address
    /// bar at once).
    Login {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The org to manage (not needed for --role platform).
        #[arg(long)]
        org: Option<String>,
        /// owner, admin, member, or platform.
        #[arg(long, default_value = "owner")]
        role: String,
        /// Lifetime of the token, e.g. 15m, 1h.
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// Who acts (the token's subject, written in the audit log).
        #[arg(long, default_value = "console")]
        sub: String,
    },
}

#[derive(Subcommand)]
enum ResidencyCommand {
    /// Scan a region's ClickHouse, archive and customer buckets; list every project found with its
    /// pinned region; exit 1 when any data of a project pinned elsewhere (or unknown) is found.
    Report {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The region to scan (default: every region this node's configuration serves).
        #[arg(long)]
        region: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Write a consistent copy of the catalog while the service runs. SQLite: a database file
    /// (restore by putting it in place as <data_dir>/catalog.db while the node is stopped).
    /// PostgreSQL: runs pg_dump --format=custom (restore with pg_restore).
    Backup {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The file to write (must not exist).
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a JWT signed with the configured secret.
    Issue {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The org the token acts for (not needed for --role platform).
        #[arg(long)]
        org: Option<String>,
        /// owner, admin, member, or platform.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The token's subject (who acts).
        #[arg(long, default_value = "cli")]
        sub: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the keyed hash chain of the whole audit log; exit 1 if it was tampered with.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Anchor an audit log written before keyed hashes: check its plain chain, replace the user
    /// ids it names by their keyed hashes and re-hash it with the catalog key. Run it once, after
    /// upgrading, when you trust the log as it is.
    Anchor {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load_settings(config: Option<&Path>) -> anyhow::Result<Settings> {
    let default_path = Path::new(DEFAULT_CONFIG_PATH);
    let path = match config {
        Some(path) => Some(path),
        None if default_path.exists() => Some(default_path),
        None => None,
    };
    let config = Config::load(path, &process_environment())?;
    Ok(config.validate()?)
}

fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split_at);
    let number: u64 = number
        .parse()
        .with_context(|| format!("--ttl `{text}`: expected e.g. 30m, 1h, 7d"))?;
    let multiplier = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => bail!("--ttl unit `{other}` is not one of s, m, h, d"),
    };
    Ok(number * multiplier)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MERIDIAN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,aws=warn,hyper=warn"));
    let json = std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|format| format == "json");
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || EscapingLine::new(ansi));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One log line on stderr, with the control characters of its text escaped (a newline inside a
/// field — an admin-supplied string, an error from a peer — cannot forge a line of its own). The
/// formatter hands over each event whole; it is written when the line is dropped.
struct EscapingLine {
    buffer: Vec<u8>,
    /// The formatter's own colour codes are kept on a terminal.
    keep_escape_sequences: bool,
}

impl EscapingLine {
    fn new(keep_escape_sequences: bool) -> EscapingLine {
        EscapingLine {
            buffer: Vec::with_capacity(256),
            keep_escape_sequences,
        }
    }
}

impl std::io::Write for EscapingLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EscapingLine {
    fn drop(&mut self) {
        let escaped = escape_line(&self.buffer, self.keep_escape_sequences);
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(&escaped);
    }
}

/// A formatted event as one line: its control characters escaped, one newline at its end.
fn escape_line(formatted: &[u8], keep_escape_sequences: bool) -> Vec<u8> {
    let line = formatted.strip_suffix(b"\n").unwrap_or(formatted);
    let mut escaped = Vec::with_capacity(line.len() + 1);
    for &byte in line {
        match byte {
            b'\n' => escaped.extend_from_slice(b"\\n"),
            b'\r' => escaped.extend_from_slice(b"\\r"),
            b'\t' => escaped.push(byte),
            0x1b if keep_escape_sequences => escaped.push(byte),
            0x00..=0x1f | 0x7f => escaped.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
            _ => escaped.push(byte),
        }
    }
    escaped.push(b'\n');
    escaped
}

fn print_quick_start(settings: &Settings, host: &str) {
    let regions: Vec<&str> = settings
        .served_regions
        .iter()
        .map(|region| region.as_str())
        .collect();
    println!(
        "Meridian is listening on {host}\n\
         Regions served: {regions}; data in {data_dir}\n\n\
         Send a first event:\n\
         \x20 TOKEN=$(cargo run --release -- token issue --role platform)\n\
         \x20 curl -s -X POST {host}/admin/orgs -H \"Authorization: Bearer $TOKEN\" -d '{{\"org_id\":\"acme\",\"name\":\"Acme\"}}'\n\
         \x20 curl -s -X POST {host}/admin/orgs/acme/projects -H \"Authorization: Bearer $TOKEN\" -d '{{\"name\":\"Web\",\"region\":\"{default}\"}}'\n\
         \x20 # copy write_key from the answer, then:\n\
         \x20 curl -s -X POST {host}/v1/track -u \"$WRITE_KEY:\" -d '{{\"userId\":\"u1\",\"event\":\"Signed Up\"}}'\n\
         \x20 # a few seconds later: zcat {data_dir}/archive/{default}/segment-logs/*/*/*.gz\n\n\
         The admin console: cargo run --release -- console login --org acme   (prints a sign-in link)\n",
        regions = regions.join(", "),
        data_dir = settings.data_dir.display(),
        default = settings.default_region,
    );
}

async fn serve(config: Option<PathBuf>, check_config: bool) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    if check_config {
        println!("configuration is valid");
        println!(
            "  home region: {}; default region: {}",
            settings.home_region, settings.default_region
        );
        println!(
            "  serving: {}",
            settings
                .served_regions
                .iter()
                .map(|region| region.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  listen: {}; data dir: {}",
            settings
                .listen
                .map(|listen| listen.to_string())
                .unwrap_or_else(|| "off".to_string()),
            settings.data_dir.display()
        );
        println!("  catalog: {}", settings.catalog_url_for_display());
        for region in &settings.served_regions {
            let store = settings
                .regions
                .get(region)
                .and_then(|region_settings| region_settings.store_url.as_ref())
                .map(|url| meridian_core::redact_url(url.expose()))
                .unwrap_or_else(|| "the global catalog".to_string());
            println!("  store of {region} (its end users' data): {store}");
        }
        for warning in &settings.warnings {
            println!("warning: {warning}");
        }
        return Ok(());
    }
    for warning in &settings.warnings {
        tracing::warn!(%warning, "configuration");
    }
    // Handlers first: a SIGTERM from here on is a graceful shutdown, however early it comes.
    let shutdown = termination_signal();
    let node = RunningNode::start(settings.clone()).await?;
    match (node.local_addr(), node.tls_local_addr()) {
        (Some(address), _) => print_quick_start(&settings, &format!("http://{address}")),
        (None, Some(address)) => print_quick_start(&settings, &format!("https://{address}")),
        (None, None) => bail!("no listener is configured"),
    }
    node.serve(shutdown).await?;
    Ok(())
}

async fn issue_token(
    config: Option<PathBuf>,
    org: Option<String>,
    role: String,
    ttl: String,
    sub: String,
) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    println!("{}", mint_token(&settings, org, role, ttl, sub)?);
    Ok(())
}

async fn console_login(
    config: Option<PathBuf>,
    org: Option<String>,
    role: String,
    ttl: String,
    sub: String,
) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let token = mint_token(&settings, org, role, ttl, sub)?;
    let base = match (&settings.public_url, settings.listen, &settings.tls) {
        (Some(public_url), _, _) => public_url.trim_end_matches('/').to_string(),
        (None, Some(listen), _) => format!("http://{listen}"),
        (None, None, Some(tls)) => format!("https://{}", tls.listen),
        (None, None, None) => bail!("no listener is configured"),
    };
    println!("{base}/console/#token={token}");
    Ok(())
}

/// A JWT signed with the node's secret (the configured one, or the data dir's).
fn mint_token(
    settings: &Settings,
    org: Option<String>,
    role: String,
    ttl: String,
    sub: String,
) -> anyhow::Result<String> {
    let role = Role::parse(&role)
        .with_context(|| format!("--role `{role}` is not one of owner, admin, member, platform"))?;
    if role != Role::Platform && org.is_none() {
        bail!("--org is required for --role owner/admin/member");
    }
    let ttl_secs = parse_ttl(&ttl)?;
    let (secret, _) = load_or_create_secret(
        settings
            .jwt_secret
            .as_ref()
            .map(meridian_core::Secret::expose),
        &settings.data_dir,
    )
    .with_context(|| format!("reading the JWT secret in {}", settings.data_dir.display()))?;
    let authority = JwtAuthority::new(&secret, settings.token_rules());
    authority
        .issue(&sub, org.as_deref(), role, ttl_secs)
        .map_err(|error| anyhow::anyhow!(error.message))
}

async fn migrate(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let catalog = meridian_node::catalog_key::connect_catalog(&settings)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("catalog {}", settings.catalog_url_for_display()))?;
    let versions = catalog.applied_migrations().await?;
    println!(
        "catalog schema is at version {}",
        versions.last().copied().unwrap_or(0)
    );
    Ok(())
}

async fn backup_catalog(config: Option<PathBuf>, output: PathBuf) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    if settings.catalog_url.expose().starts_with("postgres") {
        let status = std::process::Command::new("pg_dump")
            .args(["--format=custom", "--file"])
            .arg(&output)
            .arg(settings.catalog_url.expose())
            .status()
            .context("running pg_dump (install the PostgreSQL client tools)")?;
        if !status.success() {
            bail!("pg_dump failed with {status}");
        }
        println!(
            "catalog backed up with pg_dump to {} (restore with pg_restore)",
            output.display()
        );
        return Ok(());
    }
    let catalog = connect_catalog(&settings).await?;
    catalog.backup_sqlite(&output).await?;
    println!(
        "catalog backed up to {}; to restore, stop the node and put it in place as {}",
        output.display(),
        settings.data_dir.join("catalog.db").display()
    );
    backup_regional_stores(&settings, &catalog, &output).await?;
    if settings.catalog_hash_key.is_none() {
        println!(
            "keep a copy of {} apart from the backup: the catalog's suppressions and audit log need it",
            meridian_node::catalog_key::key_file(&settings.data_dir).display()
        );
    }
    Ok(())
}

/// Backs up each served region's own SQLite store beside `output` (`<output>-<region>.db`); a
/// PostgreSQL regional store lives in its region and is backed up there.
async fn backup_regional_stores(
    settings: &Settings,
    catalog: &meridian_catalog::Catalog,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let stores = meridian_node::regional_stores::connect_regional_stores(
        settings,
        catalog,
        &settings.served_regions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    for store in stores.stores() {
        if store.is_global {
            continue;
        }
        let regions = store.region_names().join("+");
        if store.catalog.backend() != meridian_catalog::CatalogBackend::Sqlite {
            println!(
                "the regional store of {regions} is a PostgreSQL database ({}): back it up in its region with pg_dump",
                store.display_url
            );
            continue;
        }
        let stem = output.file_stem().unwrap_or_default().to_string_lossy();
        let store_output = output.with_file_name(format!("{stem}-{regions}.db"));
        store.catalog.backup_sqlite(&store_output).await?;
        let live_path = store
            .display_url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        println!(
            "regional store of {regions} backed up to {}; to restore, put it in place as {live_path}",
            store_output.display()
        );
    }
    Ok(())
}

async fn anchor_audit(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    match catalog
        .anchor_audit_chain(&meridian_catalog::Actor::system("meridian-audit-anchor"))
        .await?
    {
        meridian_catalog::AnchorOutcome::AlreadyAnchored => {
            println!("audit log already anchored (or empty): nothing to do")
        }
        meridian_catalog::AnchorOutcome::Anchored { entries } => println!(
            "audit log anchored: {entries} entries re-hashed with the catalog key, user ids replaced by their keyed hashes"
        ),
    }
    Ok(())
}

async fn create_project(
    config: Option<PathBuf>,
    org: String,
    name: String,
    region: Option<String>,
    key_only: bool,
) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let region = match region {
        Some(text) => meridian_core::RegionId::parse(&text)?,
        None => settings.default_region.clone(),
    };
    let Some(region_settings) = settings.regions.get(&region) else {
        bail!(
            "region `{region}` is not configured; configured: {}",
            settings
                .regions
                .keys()
                .map(meridian_core::RegionId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if !region_settings.available {
        bail!("region `{region}` is unavailable for new projects");
    }
    let catalog = connect_catalog(&settings).await?;
    let actor = meridian_catalog::Actor {
        subject: "cli".to_string(),
        request_id: format!("cli-{}", std::process::id()),
    };
    let created = catalog
        .create_project(
            &org,
            meridian_catalog::NewProject {
                name,
                region: region.clone(),
            },
            &actor,
        )
        .await;
    catalog.close().await;
    let (project, write_key) = created?;
    if key_only {
        println!("{write_key}");
    } else {
        println!(
            "{}",
            serde_json::json!({
                "project_id": project.project_id, "org_id": project.org_id, "name": project.name,
                "region": project.region, "write_key": write_key,
            })
        );
    }
    Ok(())
}

/// Opens the catalog for a command: the key must exist already (tools never create one).
async fn connect_catalog(settings: &Settings) -> anyhow::Result<meridian_catalog::Catalog> {
    let key_file = meridian_node::catalog_key::key_file(&settings.data_dir);
    if settings.catalog_hash_key.is_none() && !key_file.exists() {
        bail!(
            "no catalog key: set catalog.hash_key (MERIDIAN_CATALOG_HASH_KEY) or run this where {} exists",
            key_file.display()
        );
    }
    let (key, _) =
        meridian_node::catalog_key::load_catalog_key(settings).map_err(anyhow::Error::msg)?;
    meridian_catalog::Catalog::connect(settings.catalog_url.expose(), key)
        .await
        .with_context(|| format!("catalog {}", settings.catalog_url_for_display()))
}

async fn residency_report(
    config: Option<PathBuf>,
    region: Option<String>,
    json: bool,
) -> anyhow::Result<bool> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    let customer_stores = std::sync::Arc::new(meridian_archive::customer::CustomerStores::new(
        settings.customer_access.clone(),
    ));
    let regions = match region {
        Some(text) => vec![
            meridian_core::RegionId::parse(&text)
                .map_err(|error| anyhow::anyhow!("--region {text}: {error:?}"))?,
        ],
        None => settings.served_regions.clone(),
    };
    let regional_stores =
        meridian_node::regional_stores::connect_regional_stores(&settings, &catalog, &regions)
            .await
            .map_err(anyhow::Error::msg)?;
    let keys =
        meridian_catalog::KeyCache::load_from(catalog.clone(), regional_stores.catalogs()).await?;
    let queue_encryption = meridian_node::node::load_queue_encryption(&settings)
        .map_err(anyhow::Error::msg)?
        .map(std::sync::Arc::new);
    let mut clean = true;
    let mut reports = Vec::new();
    for region in &regions {
        let services = meridian_node::region::region_services_for_tools(
            &settings,
            region,
            &keys,
            &customer_stores,
        )
        .await?;
        let report = meridian_node::residency::scan_region(
            &settings,
            &keys,
            &customer_stores,
            region,
            &services,
            queue_encryption.clone(),
            regional_stores.store_of_region(region),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        clean &= report.is_clean();
        if json {
            reports.push(report.to_json(&keys));
        } else {
            print!("{}", report.to_text());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(clean)
}

/// Verifies the global catalog's audit chain and the chain of each served region's own store.
async fn verify_audit(config: Option<PathBuf>) -> anyhow::Result<bool> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    let regional_stores = meridian_node::regional_stores::connect_regional_stores(
        &settings,
        &catalog,
        &settings.served_regions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut chains = vec![("audit log".to_string(), catalog.clone())];
    for store in regional_stores.stores() {
        if !store.is_global {
            let name = format!("audit log of {}", store.region_names().join(", "));
            chains.push((name, store.catalog.clone()));
        }
    }
    let mut intact = true;
    for (name, chain) in chains {
        let report = chain.verify_audit_chain().await?;
        match report.first_broken {
            None => println!("{name} intact: {} entries verified", report.entries_checked),
            Some((seq, reason)) => {
                println!(
                    "{name} TAMPERED at entry {seq}: {reason} ({} entries checked)",
                    report.entries_checked
                );
                intact = false;
            }
        }
    }
    Ok(intact)
}

fn main() -> ExitCode {
    // Everything the service writes (catalog, queue segments, archive objects, spool, secrets)
    // is private to its user from the first write: files 0600, directories 0700.
    // SAFETY: umask only sets this process's file mode creation mask; no memory is involved.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                config,
                check_config,
            } => serve(config, check_config).await.map(|()| true),
            Command::Token {
                command:
                    TokenCommand::Issue {
                        config,
                        org,
                        role,
                        ttl,
                        sub,
                    },
            } => issue_token(config, org, role, ttl, sub)
                .await
                .map(|()| true),
            Command::Migrate { config } => migrate(config).await.map(|()| true),
            Command::Audit {
                command: AuditCommand::Verify { config },
            } => verify_audit(config).await,
            Command::Audit {
                command: AuditCommand::Anchor { config },
            } => anchor_audit(config).await.map(|()| true),
            Command::Catalog {
                command: CatalogCommand::Backup { config, output },
            } => backup_catalog(config, output).await.map(|()| true),
            Command::Residency {
                command:
                    ResidencyCommand::Report {
                        config,
                        region,
                        json,
                    },
            } => residency_report(config, region, json).await,
            Command::Console {
                command:
                    ConsoleCommand::Login {
                        config,
                        org,
                        role,
                        ttl,
                        sub,
                    },
            } => console_login(config, org, role, ttl, sub)
                .await
                .map(|()| true),
            Command::Project {
                command:
                    ProjectCommand::Create {
                        config,
                        org,
                        name,
                        region,
                        key_only,
                    },
            } => create_project(config, org, name, region, key_only)
                .await
                .map(|()| true),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_keeps_its_control_characters_inside() {
        assert_eq!(
            escape_line(b"WARN role=arn:x\nERROR forged\r\x07 end\n", false),
            b"WARN role=arn:x\\nERROR forged\\r\\x07 end\n".to_vec()
        );
        assert_eq!(
            escape_line(b"\x1b[31mred\n", false),
            b"\\x1b[31mred\n".to_vec()
        );
        assert_eq!(
            escape_line(b"\x1b[31mred\ttab\n", true),
            b"\x1b[31mred\ttab\n".to_vec()
        );
    }

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
