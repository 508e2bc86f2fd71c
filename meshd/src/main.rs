//! `meshd`: the node agent and its CLI. The lab is a binary of its own (`meshd-lab`) that this
//! one never links.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use meshd::{Output, agent, cli, config};

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "Encryption- and identity-first mesh daemon for Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<config::AgentConfig>),
    /// Show the agent's status (as `cilium status`).
    Status {
        #[arg(long, default_value = meshd_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Encryption status (as `cilium encrypt status`).
    Encrypt {
        #[command(subcommand)]
        command: cli::encrypt::EncryptCommand,
    },
    /// Internal: the userspace WireGuard device process (started by the agent).
    #[command(hide = true)]
    WireguardUserspace {
        #[arg(long, default_value = wg::INTERFACE)]
        interface: String,
        #[arg(long, default_value_t = wg::LISTEN_PORT)]
        listen_port: u16,
        /// Disable TUN TSO and UDP GSO/GRO.
        #[arg(long)]
        no_offload: bool,
    },
    /// Network policies.
    Policy {
        #[command(subcommand)]
        command: cli::policy::PolicyCommand,
    },
    /// Live datapath events: drops (reason, identities, addresses, port) and AUTH_REQUIRED.
    Monitor {
        #[arg(long, default_value = meshd_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// `drop` (every drop, including authentication required) or `auth`.
        #[arg(long = "type", value_parser = ["drop", "auth"])]
        kind: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The eBPF maps on this node (as `cilium-dbg bpf`).
    Bpf {
        #[command(subcommand)]
        command: cli::bpf::BpfCommand,
    },
    /// Local endpoints.
    Endpoint {
        #[command(subcommand)]
        command: cli::endpoint::EndpointCommand,
    },
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // netlink-packet-route warns, on every link dump, about attributes a newer kernel sends
    // than it knows (IFLA_INET6_CONF growing): noise, once a second, unless asked for.
    let filter =
        if std::env::var("RUST_LOG").is_ok_and(|v| v.contains("netlink_packet_route")) {
            filter
        } else {
            filter.add_directive("netlink_packet_route=error".parse().unwrap_or_else(|_| {
                tracing_subscriber::filter::Directive::from(tracing::Level::ERROR)
            }))
        };
    // Colours only for a person at a terminal: a log file (the lab's agent.log, journald)
    // stays plain text that grep and parsers can read.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `meshd … | head` ends quietly, as Unix tools do; daemons keep Rust's ignored SIGPIPE.
#[allow(unsafe_code, reason = "restoring a signal's default disposition")]
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_DFL installs no handler, so no code runs in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> std::process::ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = if argv.get(1).is_some_and(|a| a == "agent") {
        // The agent's options merge flags, environment and config files; parse them ourselves.
        match config::AgentConfig::parse_with_files(argv[1..].to_vec()) {
            Ok(cfg) => {
                init_tracing(std::env::var_os("MESHD_LOG_JSON").is_some());
                // The agent's errors name their causes themselves: print them once.
                if let Err(e) = rt.block_on(agent::run(cfg)) {
                    eprintln!("Error: {e}");
                    return std::process::ExitCode::FAILURE;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    } else {
        let cli = Cli::parse_from(argv);
        init_tracing(false);
        let daemon = matches!(cli.command, Command::WireguardUserspace { .. });
        if !daemon {
            default_sigpipe();
        }
        rt.block_on(async move {
            match cli.command {
                Command::Agent(_) => Err(anyhow::anyhow!("`agent` must be the first argument")),
                Command::Status { socket, output } => cli::status::status(&socket, output).await,
                Command::Endpoint { command } => cli::endpoint::endpoint(command).await,
                Command::Bpf { command } => cli::bpf::bpf(command),
                Command::Monitor {
                    socket,
                    kind,
                    output,
                } => cli::monitor::monitor(&socket, kind.as_deref(), output).await,
                Command::Encrypt { command } => cli::encrypt::encrypt(command).await,
                Command::Policy { command } => cli::policy::policy(command).await,
                Command::WireguardUserspace {
                    interface,
                    listen_port,
                    no_offload,
                } => {
                    let socket = wg::uapi::socket_path(&interface);
                    tokio::task::spawn_blocking(move || {
                        wg::userspace::run(wg::userspace::Options {
                            interface,
                            offload: !no_offload,
                            listen_port,
                            uapi_socket: socket,
                        })
                    })
                    .await?
                    .map_err(Into::into)
                }
            }
        })
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
