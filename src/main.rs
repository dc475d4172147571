//! The `meridian` command: `serve` (a node), `token issue` and `console login` (admin tokens),
//! and the offline commands of `commands.rs` (`migrate`, `catalog backup`, `audit verify|anchor`,
//! `residency report`, `project create`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meridian_server::auth::{JwtAuthority, Role, load_or_create_secret};
use meridian_server::config::{Config, process_environment};
use meridian_server::{RunningNode, Settings, termination_signal};

mod commands;
mod logging;

use commands::{
    anchor_audit, backup_catalog, create_project, migrate, residency_report, verify_audit,
};
use logging::init_logging;

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
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
