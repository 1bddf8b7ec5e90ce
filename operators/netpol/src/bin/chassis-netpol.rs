//! `chassis-netpol`: the NetworkPolicy evaluator on the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chassis_netpol::eval::Evaluator;
use chassis_netpol::model::Protocol;
use chassis_netpol::probe::{load_model, load_policies, probe, table};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "chassis-netpol",
    about = "Who may reach whom under a set of NetworkPolicies"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Table,
}

#[derive(Subcommand)]
enum Command {
    /// Every pod to every declared port of every pod: the connectivity truth table.
    Probe {
        /// Folder of NetworkPolicy YAML/JSON files.
        #[arg(long)]
        policies: PathBuf,
        /// The model: namespaces, pods, labels, IPs and ports (JSON).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
    },
    /// For one pair, which policies select each side and which admit the traffic.
    Explain {
        #[arg(long)]
        policies: PathBuf,
        #[arg(long)]
        model: PathBuf,
        /// Source pod, `namespace/pod`.
        #[arg(long)]
        from: String,
        /// Destination pod, `namespace/pod`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP", value_parser = ["TCP", "UDP", "SCTP"])]
        protocol: String,
    },
}

fn pod(evaluator: &Evaluator<'_>, id: &str) -> Result<usize> {
    let (ns, name) = id
        .split_once('/')
        .with_context(|| format!("{id:?} is not namespace/pod"))?;
    evaluator
        .find(ns, name)
        .with_context(|| format!("the model has no pod {id}"))
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Probe {
            policies,
            model,
            format,
        } => {
            let (policies, model) = (load_policies(&policies)?, load_model(&model)?);
            let evaluator = Evaluator::new(&model, &policies);
            let results = probe(&evaluator);
            match format {
                Format::Json => {
                    // Streamed: a million rows would otherwise be one string in memory.
                    use std::io::Write;
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    serde_json::to_writer(&mut out, &results)?;
                    writeln!(out)?;
                    out.flush()?;
                }
                Format::Table => print!("{}", table(&results)),
            }
        }
        Command::Explain {
            policies,
            model,
            from,
            to,
            port,
            protocol,
        } => {
            let (policies, model) = (load_policies(&policies)?, load_model(&model)?);
            let evaluator = Evaluator::new(&model, &policies);
            let protocol = Protocol::parse(Some(&protocol)).context("protocol")?;
            let verdict = evaluator.explain(pod(&evaluator, &from)?, pod(&evaluator, &to)?, port, protocol);
            let side = |name: &str, d: &chassis_netpol::eval::Direction, pod: &str| {
                if d.selected_by.is_empty() {
                    format!("{name}: {pod} is not isolated for {name} (no policy selects it): allowed")
                } else if d.allowed_by.is_empty() {
                    format!(
                        "{name}: {pod} is selected by {} and no rule of them admits this traffic: refused",
                        d.selected_by.join(", ")
                    )
                } else {
                    format!("{name}: admitted by {}", d.allowed_by.join(", "))
                }
            };
            println!("{}", side("egress", &verdict.egress, &from));
            println!("{}", side("ingress", &verdict.ingress, &to));
            println!(
                "{from} -> {to} {}/{port}: {}",
                protocol.as_str(),
                if verdict.allowed() { "allowed" } else { "refused" }
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chassis-netpol: {err:#}");
            ExitCode::FAILURE
        }
    }
}
