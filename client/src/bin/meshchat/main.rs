//! `meshchat`: the command-line client, for people and scripts.
//!
//! A profile directory (`--home`, `MESHCHAT_HOME`, default `~/.meshchat`) keeps the server,
//! CA path and token of the logged-in user, so later commands need neither. `--json` prints
//! one JSON object per line with stable field names; errors go to stderr with the protocol
//! code, and the exit status is 2 for a node's refusal, 1 for anything else.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod output;
mod profile;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use meshchat_client::{Client, ClientError, ConnectOptions, Event, Events, TypingTracker};
use meshchat_idgen::{ChannelId, ChatId, UserId};
use meshchat_proto::client::{Direction, ReceiptKind};

use output::Out;
use profile::Profile;

#[derive(Parser)]
#[command(version, about = "meshchat command-line client")]
struct Cli {
    /// Node address (host:port); any node of the cluster. Default: the profile's.
    #[arg(long, global = true)]
    server: Option<String>,
    /// CA certificate the node's certificate chains to (dev: <data-dir>/ca.pem).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// One JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    /// Profile directory (keeps the token).
    #[arg(long, global = true, env = "MESHCHAT_HOME")]
    home: Option<PathBuf>,
    /// Do not show me online to my contacts while this command runs.
    #[arg(long, global = true)]
    hide_presence: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account and log in.
    Register {
        /// User name (a-z, 0-9, _ . -).
        user: String,
        /// Password (else MESHCHAT_PASSWORD, else a prompt).
        #[arg(long, env = "MESHCHAT_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Log in.
    Login {
        /// User name.
        user: String,
        /// Password (else MESHCHAT_PASSWORD, else a prompt).
        #[arg(long, env = "MESHCHAT_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Send a message to a user or #channel.
    Send {
        /// User name or #channel.
        to: String,
        /// The text.
        text: String,
        /// Message id this replies to.
        #[arg(long)]
        reply_to: Option<u64>,
    },
    /// React to a message.
    React {
        /// Chat: user name or #channel.
        chat: String,
        /// Message id.
        id: u64,
        /// Emoji.
        emoji: String,
    },
    /// Remove my reaction.
    Unreact {
        /// Chat: user name or #channel.
        chat: String,
        /// Message id.
        id: u64,
    },
    /// Tell a chat I am typing (shown for a few seconds), or that I stopped.
    Typing {
        /// Chat: user name or #channel.
        chat: String,
        /// Stopped typing.
        #[arg(long)]
        stop: bool,
    },
    /// Mark messages up to ID seen.
    Seen {
        /// Chat: user name or #channel.
        chat: String,
        /// Message id.
        id: u64,
    },
    /// Page through a chat's history (newest first by default).
    History {
        /// Chat: user name or #channel.
        chat: String,
        /// Messages older than this id.
        #[arg(long, conflicts_with = "after")]
        before: Option<u64>,
        /// Messages newer than this id (oldest first).
        #[arg(long)]
        after: Option<u64>,
        /// Page size (capped by the node).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// My chats with unread counts, and whether each 1:1 chat's peer is online.
    Chats,
    /// Channels.
    #[command(subcommand)]
    Channel(ChannelCmd),
    /// Which node is a user's home.
    Whereis {
        /// User name.
        user: String,
    },
    /// The cluster's members, their states and the ring epoch.
    Cluster,
    /// Print pushes as they arrive (marks received messages delivered).
    Listen {
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Do not send delivered receipts.
        #[arg(long)]
        no_receipts: bool,
    },
}

#[derive(Subcommand)]
enum ChannelCmd {
    /// Create a channel.
    Create {
        /// Name.
        name: String,
    },
    /// Join a channel.
    Join {
        /// Name.
        name: String,
    },
    /// Leave a channel.
    Leave {
        /// Name.
        name: String,
    },
    /// Members of a channel I am in.
    Members {
        /// Name.
        name: String,
    },
    /// My channels.
    List,
    /// Send to a channel.
    Send {
        /// Name.
        name: String,
        /// The text.
        text: String,
        /// Message id this replies to.
        #[arg(long)]
        reply_to: Option<u64>,
    },
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHCHAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        let r = run(cli).await;
        close_endpoint().await;
        r
    });
    if let Err(e) = result {
        let code = e.downcast_ref::<ClientError>().and_then(ClientError::code);
        output::error(json, &e, code);
        std::process::exit(if code.is_some() { 2 } else { 1 });
    }
}

/// A connected, authenticated client plus what the CLI needs around it.
struct Session {
    client: Client,
    events: Events,
    out: Out,
}

fn password(given: Option<String>, user: &str) -> anyhow::Result<String> {
    match given {
        Some(p) => Ok(p),
        None => {
            rpassword::prompt_password(format!("password for {user}: ")).context("reading password")
        }
    }
}

async fn connect(cli: &Cli, profile: &Profile) -> anyhow::Result<(Client, Events)> {
    let server = cli
        .server
        .clone()
        .or_else(|| profile.server.clone())
        .ok_or_else(|| anyhow!("no server: pass --server HOST:PORT"))?;
    let ca = cli
        .ca
        .clone()
        .or_else(|| profile.ca.clone())
        .ok_or_else(|| anyhow!("no CA: pass --ca FILE (dev: <data-dir>/ca.pem)"))?;
    let roots = meshchat_client::load_ca(&ca)?;
    let mut opts = ConnectOptions::new(roots);
    opts.hide_presence = cli.hide_presence;
    let (client, events) = Client::connect(&server, opts).await?;
    let _ = ENDPOINT.set(client.endpoint());
    Ok((client, events))
}

/// The endpoint of this run's client, closed before the process exits.
static ENDPOINT: std::sync::OnceLock<quinn::Endpoint> = std::sync::OnceLock::new();

/// Closes every connection and waits (at most 1 s) until the node was told: without it the
/// process exits before its CONNECTION_CLOSE is sent, and the node counts the connection as
/// authenticated until its idle timeout (a drain waits for it).
async fn close_endpoint() {
    if let Some(endpoint) = ENDPOINT.get() {
        endpoint.close(0u32.into(), b"client closing");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

async fn logged_in(cli: &Cli, profile: &Profile) -> anyhow::Result<Session> {
    let token = profile.token.clone().ok_or_else(|| {
        anyhow!("not logged in: run `meshchat register USER` or `meshchat login USER`")
    })?;
    let (client, events) = connect(cli, profile).await?;
    client.authenticate(&token).await?;
    Ok(Session {
        client,
        events,
        out: Out::new(cli.json),
    })
}

impl Session {
    fn me(&self) -> anyhow::Result<UserId> {
        Ok(self.client.me()?)
    }

    /// A chat named by a user name or `#channel`.
    async fn chat(&mut self, name: &str) -> anyhow::Result<ChatId> {
        if let Some(ch) = name.strip_prefix('#') {
            let c = self.client.my_channel(ch).await?;
            self.out.remember_channel(c.channel_id, &c.name);
            return Ok(ChatId::Channel(ChannelId(c.channel_id)));
        }
        let u = self.client.resolve_user(name).await?;
        self.out.remember_user(u.user_id, &u.user_name);
        Ok(ChatId::direct(self.me()?, UserId(u.user_id)))
    }

    /// Learns a user's name for printing (best effort: the id is printed otherwise).
    async fn learn_user(&mut self, id: u64) {
        if !self.out.knows_user(id)
            && let Ok(u) = self.client.user_by_id(UserId(id)).await
        {
            self.out.remember_user(u.user_id, &u.user_name);
        }
    }

    /// Fills the name caches for printing a chat.
    async fn learn(&mut self, chat: ChatId) -> anyhow::Result<()> {
        let me = self.me()?;
        match chat {
            ChatId::Direct { .. } => {
                self.learn_user(chat.peer_of(me).unwrap_or(me).0).await;
            }
            ChatId::Channel(c) => {
                if !self.out.knows_channel(c.0) {
                    for ch in self.client.channel_list().await? {
                        self.out.remember_channel(ch.channel_id, &ch.name);
                    }
                }
            }
        }
        Ok(())
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = profile::home(cli.home.clone())?;
    let profile = Profile::load(&home)?;
    match &cli.cmd {
        Cmd::Register { user, password: pw } | Cmd::Login { user, password: pw } => {
            let pw = password(pw.clone(), user)?;
            let (client, _events) = connect(&cli, &profile).await?;
            let s = if matches!(cli.cmd, Cmd::Register { .. }) {
                client.register(user, &pw).await?
            } else {
                client.login(user, &pw).await?
            };
            let saved = Profile {
                server: Some(client.server()),
                ca: cli
                    .ca
                    .clone()
                    .or(profile.ca.clone())
                    .map(|p| std::path::absolute(&p).unwrap_or(p)),
                user_id: Some(s.user.0),
                user_name: Some(s.name.clone()),
                token: Some(s.token.clone()),
                expires_unix_ms: Some(s.expires_unix_ms),
            };
            saved.save(&home)?;
            Out::new(cli.json).auth(&s, &home);
            client.close();
            Ok(())
        }
        Cmd::Send { to, text, reply_to } => {
            let mut s = logged_in(&cli, &profile).await?;
            let chat = s.chat(to).await?;
            let p = s.client.send(chat, text.clone(), *reply_to).await?;
            s.out.processed(&p, chat, s.me()?);
            s.client.close();
            Ok(())
        }
        Cmd::Channel(ChannelCmd::Send {
            name,
            text,
            reply_to,
        }) => {
            let mut s = logged_in(&cli, &profile).await?;
            let chat = s
                .chat(&format!("#{}", name.trim_start_matches('#')))
                .await?;
            let p = s.client.send(chat, text.clone(), *reply_to).await?;
            s.out.processed(&p, chat, s.me()?);
            s.client.close();
            Ok(())
        }
        Cmd::React { chat, id, emoji } => {
            let mut s = logged_in(&cli, &profile).await?;
            let c = s.chat(chat).await?;
            s.client.react(c, *id, emoji).await?;
            s.out.done("react", c, s.me()?, Some(*id));
            Ok(())
        }
        Cmd::Unreact { chat, id } => {
            let mut s = logged_in(&cli, &profile).await?;
            let c = s.chat(chat).await?;
            s.client.unreact(c, *id).await?;
            s.out.done("unreact", c, s.me()?, Some(*id));
            Ok(())
        }
        Cmd::Typing { chat, stop } => {
            let mut s = logged_in(&cli, &profile).await?;
            let c = s.chat(chat).await?;
            s.client.typing(c, !stop).await?;
            s.out.done(
                if *stop { "typing stop" } else { "typing" },
                c,
                s.me()?,
                None,
            );
            Ok(())
        }
        Cmd::Seen { chat, id } => {
            let mut s = logged_in(&cli, &profile).await?;
            let c = s.chat(chat).await?;
            s.client.mark(c, *id, ReceiptKind::Seen).await?;
            s.out.done("seen", c, s.me()?, Some(*id));
            Ok(())
        }
        Cmd::History {
            chat,
            before,
            after,
            limit,
        } => {
            let mut s = logged_in(&cli, &profile).await?;
            let c = s.chat(chat).await?;
            let (cursor, dir) = match (before, after) {
                (_, Some(a)) => (*a, Direction::Forward),
                (Some(b), None) => (*b, Direction::Backward),
                (None, None) => (0, Direction::Backward),
            };
            let page = s.client.history(c, cursor, dir, *limit).await?;
            let me = s.me()?;
            for m in &page.messages {
                s.out.message(m, me, None);
            }
            s.out.page_end(page.next_cursor);
            Ok(())
        }
        Cmd::Chats => {
            let s = logged_in(&cli, &profile).await?;
            let me = s.me()?;
            let rows = s.client.chat_list().await?;
            let presence: std::collections::HashMap<u64, meshchat_proto::client::PresenceState> = s
                .client
                .presence()
                .await?
                .into_iter()
                .map(|p| (p.user_id, p))
                .collect();
            for row in rows {
                let peer = meshchat_proto::ids::chat_from_wire(row.chat.as_ref())
                    .ok()
                    .and_then(|c| c.peer_of(me))
                    .and_then(|p| presence.get(&p.0));
                s.out.chat_row(&row, me, peer);
            }
            Ok(())
        }
        Cmd::Channel(cmd) => {
            let s = logged_in(&cli, &profile).await?;
            match cmd {
                ChannelCmd::Create { name } => {
                    let c = s
                        .client
                        .channel_create(name.trim_start_matches('#'))
                        .await?;
                    s.out.channel(&c);
                }
                ChannelCmd::Join { name } => {
                    let c = s.client.channel_join(name.trim_start_matches('#')).await?;
                    s.out.channel(&c);
                }
                ChannelCmd::Leave { name } => {
                    let c = s.client.my_channel(name).await?;
                    s.client.channel_leave(ChannelId(c.channel_id)).await?;
                    s.out.left(&c);
                }
                ChannelCmd::Members { name } => {
                    let c = s.client.my_channel(name).await?;
                    for u in s.client.channel_members(ChannelId(c.channel_id)).await? {
                        s.out.member(&c, &u);
                    }
                }
                ChannelCmd::List => {
                    for c in s.client.channel_list().await? {
                        s.out.channel(&c);
                    }
                }
                ChannelCmd::Send { .. } => unreachable!("handled above"),
            }
            Ok(())
        }
        Cmd::Whereis { user } => {
            let s = logged_in(&cli, &profile).await?;
            let h = s.client.where_is(user).await?;
            s.out.user_home(&h);
            Ok(())
        }
        Cmd::Cluster => {
            let s = logged_in(&cli, &profile).await?;
            let c = s.client.cluster().await?;
            s.out.cluster(&c);
            Ok(())
        }
        Cmd::Listen {
            count,
            timeout,
            no_receipts,
        } => {
            let mut s = logged_in(&cli, &profile).await?;
            listen(
                &mut s,
                *count,
                timeout.map(Duration::from_secs),
                !no_receipts,
            )
            .await
        }
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn listen(
    s: &mut Session,
    count: Option<u64>,
    timeout: Option<Duration>,
    receipts: bool,
) -> anyhow::Result<()> {
    let me = s.me()?;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut seen = 0u64;
    let mut typing = TypingTracker::new();
    s.out.listening(&s.client.server());
    while count.is_none_or(|c| seen < c) {
        let expiry = typing.next_expiry().map(tokio::time::Instant::from_std);
        let next = tokio::select! {
            ev = s.events.next() => ev,
            () = sleep_until(deadline) => break,
            () = sleep_until(expiry) => {
                for c in typing.expire(std::time::Instant::now()) {
                    s.out.typing(&c, me);
                }
                continue;
            }
        };
        let Some(ev) = next else { break };
        match &ev {
            Event::Typing(t) => {
                if let Ok(c) = meshchat_proto::ids::chat_from_wire(t.chat.as_ref()) {
                    s.learn(c).await?;
                }
                s.learn_user(t.user_id).await;
                // A refresh of an indicator already shown is not an event to print.
                let Some(c) = typing.observe(t, std::time::Instant::now()) else {
                    continue;
                };
                s.out.typing(&c, me);
            }
            Event::Message(m) => {
                let chat = meshchat_proto::ids::chat_from_wire(m.chat.as_ref()).ok();
                if let Some(c) = chat {
                    s.learn(c).await?;
                }
                s.out.message(m, me, None);
                if let Some(c) = chat
                    && receipts
                    && m.sender_id != me.0
                {
                    // Best effort: the message is printed either way.
                    let _ = s.client.mark(c, m.message_id, ReceiptKind::Delivered).await;
                }
            }
            Event::Receipt(r) => {
                if let Ok(c) = meshchat_proto::ids::chat_from_wire(r.chat.as_ref()) {
                    s.learn(c).await?;
                }
                s.learn_user(r.user_id).await;
                s.out.receipt(r, me);
            }
            Event::Reaction(r) => {
                if let Ok(c) = meshchat_proto::ids::chat_from_wire(r.chat.as_ref()) {
                    s.learn(c).await?;
                }
                s.learn_user(r.user_id).await;
                s.out.reaction(r, me);
            }
            Event::Channel(c) => s.out.channel_event(c),
            Event::Presence(p) => {
                for u in &p.users {
                    s.learn_user(u.user_id).await;
                    s.out.presence(u);
                }
            }
            Event::Redirect(r) => {
                s.out.note(&format!(
                    "home moved to node {} ({}); reconnecting",
                    r.node_id, r.address
                ));
                s.client.follow_redirect(r).await?;
                continue;
            }
            Event::NodeError { code, message } => {
                s.out.note(&format!("node error {code}: {message}"));
            }
            Event::Gap { expected, got } => {
                s.out.note(&format!(
                    "pushes {expected}..{got} lost; filling from history"
                ));
                s.client.fill_gaps().await?; // runs in the background
            }
            Event::Resync => {
                s.out
                    .note("the node lost pushes on the way; filling from history");
                s.client.resync().await?;
            }
            Event::Silent => {
                s.out
                    .note("the node went silent; trying the new home ahead of the timeout");
                if let Err(e) = s.client.rehome_early().await {
                    s.out.note(&format!("staying for now: {e}"));
                }
                continue;
            }
            Event::Disconnected { code, reason } => {
                // The library reports no connection it replaced itself (a redirect followed,
                // a reconnect); a close while the current connection is fine still asks for
                // nothing.
                if s.client.conn().is_ok_and(|c| c.is_open()) {
                    continue;
                }
                s.out.note(&format!(
                    "disconnected (code {code}: {reason}); reconnecting"
                ));
                // Any node will do: the failover passes over a dead one and follows the
                // redirect to this user's current home.
                if let Err(e) = s.client.failover().await {
                    bail!("lost the connection and could not reconnect: {e}");
                }
                continue;
            }
        }
        seen += 1;
    }
    Ok(())
}
