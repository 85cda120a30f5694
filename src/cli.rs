//! `candela token`, `candela project` and `candela usage`: the platform's state in the data
//! directory's database, managed from the command line (also while a server runs on it).

use std::path::Path;

use anyhow::{bail, Context};

use super::{ProjectCommand, TokenCommand, UsageArgs};
use candela::platform::store::{now, ProjectLimits, Store};
use candela::platform::{token, usage};

/// Lets `candela token list | head -1` end quietly, as other command-line tools do, instead of
/// panicking when the reader goes away.
pub fn quiet_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default action of a signal before any thread starts writing.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn open(home: &Path) -> anyhow::Result<Store> {
    Store::open_dir(home).context("opening the database")
}

fn iso(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn token(command: TokenCommand, home: &Path) -> anyhow::Result<()> {
    let store = open(home)?;
    match command {
        TokenCommand::Create { project, ttl, name } => {
            let ttl = token::parse_ttl(&ttl).map_err(|e| anyhow::anyhow!("--ttl {e}"))?;
            let (record, secret) = store.create_token(&project, name.as_deref(), ttl)?;
            println!(
                "Created token {} for project `{}`{}, valid until {}.",
                record.id,
                record.project,
                record
                    .name
                    .as_deref()
                    .map(|n| format!(" (name `{n}`)"))
                    .unwrap_or_default(),
                iso(record.expires_at)
            );
            println!("This is the only time it is shown; use it as the API key (Authorization: Bearer ...):");
            println!("{}", secret.expose());
        }
        TokenCommand::List { project } => {
            let now = now();
            for t in store.tokens(project.as_deref())? {
                println!(
                    "{}  project={}  name={}  status={}  created={}  expires={}",
                    t.id,
                    t.project,
                    t.name.as_deref().unwrap_or("-"),
                    t.state(now),
                    iso(t.created_at),
                    iso(t.expires_at)
                );
            }
        }
        TokenCommand::Revoke { id } => match store.revoke(&id)? {
            Some(t) => println!(
                "Revoked token {} (project `{}`); calls with it now get 401.",
                t.id, t.project
            ),
            None => bail!("no token has the id `{id}` (see `candela token list`)"),
        },
    }
    Ok(())
}

pub fn project(command: ProjectCommand, home: &Path) -> anyhow::Result<()> {
    let store = open(home)?;
    let show = |limit: Option<u64>| limit.map_or("default".to_string(), |n| n.to_string());
    let print = |p: &candela::platform::store::Project| {
        println!(
            "{}  rpm={}  tpm={}  embeddings_rpm={}",
            p.name,
            show(p.limits.rpm),
            show(p.limits.tpm),
            show(p.limits.embeddings_rpm)
        )
    };
    match command {
        ProjectCommand::Set {
            name,
            rpm,
            tpm,
            embeddings_rpm,
        } => {
            if rpm.is_none() && tpm.is_none() && embeddings_rpm.is_none() {
                bail!("nothing to set: give --rpm, --tpm or --embeddings-rpm");
            }
            let p = store.set_project(
                &name,
                &ProjectLimits {
                    rpm,
                    tpm,
                    embeddings_rpm,
                },
            )?;
            print(&p);
        }
        ProjectCommand::List => store.projects()?.iter().for_each(print),
    }
    Ok(())
}

pub fn usage(args: UsageArgs, home: &Path) -> anyhow::Result<()> {
    let store = open(home)?;
    let (from, to) = usage::period(args.from.as_deref(), args.to.as_deref())
        .map_err(|e| anyhow::anyhow!("{e} (--{})", e.param))?;
    let rows = store.usage(args.project.as_deref(), from, to)?;
    if args.json {
        let body = serde_json::json!({
            "object": "list",
            "project": args.project,
            "currency": "EUR",
            "data": rows,
            "total": usage::totals(&rows),
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:<10}  {:<16}  {:<28}  {:>8}  {:>6}  {:>12}  {:>12}  {:>10}",
        "date", "project", "model", "requests", "failed", "input_tok", "output_tok", "cost_eur"
    );
    for r in &rows {
        println!(
            "{:<10}  {:<16}  {:<28}  {:>8}  {:>6}  {:>12}  {:>12}  {:>10.4}",
            r.date,
            r.project,
            r.model,
            r.requests,
            r.failed_requests,
            r.input_tokens,
            r.output_tokens,
            r.cost
        );
    }
    Ok(())
}
