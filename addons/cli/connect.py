"""`custody ssh-config`, `custody ssh` and `custody psql`: the real clients, already set up.

Like `tsh ssh` and `tsh db connect`: the agent never answers a prompt. `ssh-config` writes
a Host block per ssh connection and a known_hosts file holding the bridges' host keys,
fetched from the gateway over TLS pinned to the gateway's CA (the gateway publishes them:
addons/wellknown.py), so ssh trusts the bridge the first time without asking.
`custody ssh CONNECTION …` runs the real ssh with that configuration, the agent's token
given to ssh's own password prompt by `custody-askpass`, which answers that prompt only
(so a host key question can never be answered with a token), once. `custody psql
CONNECTION …` runs the real psql against pg_bridge with the token as the password.

The token is `--token`, else $CUSTODY_TOKEN (the agent's).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from addons.cli.base import CliError, load_config, with_config

TOKEN_FOR_ASKPASS = "CUSTODY_SSH_TOKEN"
"""Where `custody ssh` puts the token for `custody-askpass`: ssh's environment only."""
PROMPTS = ("password", "token")
"""What ssh_bridge's prompts say (password and keyboard-interactive); askpass answers only these."""


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("CUSTODY_TOKEN")
    if not token:
        raise CliError("the agent's token is needed: pass --token or set CUSTODY_TOKEN "
                       "(custody token --sub … in development)")
    return token


def _connections(args: argparse.Namespace, kind: str) -> list:
    cfg = load_config(args)
    found = [c for c in cfg.connections if c.kind == kind and c.listen
             and (not getattr(args, "connection", None) or c.name == args.connection)]
    if not found:
        names = ", ".join(c.name for c in cfg.connections if c.kind == kind) or "none"
        raise CliError(f"no {kind} connection {getattr(args, 'connection', '') or ''} with a listen address in "
                       f"{cfg.path} ({kind} connections: {names})".replace("  ", " "))
    return found


def fetch_known_hosts(args: argparse.Namespace) -> str:
    """The bridges' host keys, from the gateway, over TLS pinned to its CA."""
    import ssl
    import urllib.error
    import urllib.request

    cfg = load_config(args)
    ca = Path(args.ca or Path(args.confdir).expanduser() / "mitmproxy-ca-cert.pem")
    if not ca.exists():
        raise CliError(f"no gateway CA at {ca}: pass --ca or --confdir")
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": args.proxy_url}),
                                         urllib.request.HTTPSHandler(context=context))
    url = f"https://{cfg.gateway_host}/.well-known/ssh_known_hosts"
    try:
        with opener.open(url, timeout=30) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot fetch the bridges' host keys from {url} through {args.proxy_url}: "
                       f"{getattr(e, 'reason', e)}") from None


def write_ssh_config(args: argparse.Namespace) -> Path:
    conns = _connections(args, "ssh")
    directory = Path(args.dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    known = fetch_known_hosts(args)
    wanted = {f"[{c.listen[0]}]:{c.listen[1]}" for c in conns}
    lines = [line for line in known.splitlines() if line.split(" ", 1)[0] in wanted]
    if not lines:
        raise CliError("the gateway publishes no host key for "
                       f"{', '.join(sorted(wanted))}: is ssh_bridge running (it creates its key on first start)?")
    (directory / "known_hosts").write_text("\n".join(lines) + "\n")
    blocks = [
        "\n".join([
            f"Host {c.name}",
            f"  HostName {c.listen[0]}",
            f"  Port {c.listen[1]}",
            f"  User agent+{c.name}",
            f"  UserKnownHostsFile {directory / 'known_hosts'}",
            "  StrictHostKeyChecking yes",
            "  PreferredAuthentications password",
            "  PubkeyAuthentication no",
            "  NumberOfPasswordPrompts 1",
        ]) for c in conns]
    config = directory / "config"
    config.write_text("# written by custody ssh-config\n" + "\n\n".join(blocks) + "\n")
    return config


def cmd_ssh_config(args: argparse.Namespace) -> int:
    config = write_ssh_config(args)
    print(f"wrote {config} and {config.parent / 'known_hosts'}: ssh -F {config} CONNECTION "
          f"(or `Include {config}` in ~/.ssh/config)", file=sys.stderr)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    token = _token(args)
    config = write_ssh_config(args)
    askpass = Path(sys.executable).parent / "custody-askpass"
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", TOKEN_FOR_ASKPASS: token}
    argv = ["ssh", "-F", str(config), args.connection, *args.command]
    try:
        os.execvpe("ssh", argv, env)
    except OSError as e:
        raise CliError(f"cannot run ssh: {e.strerror} (install OpenSSH's client)") from None


def cmd_psql(args: argparse.Namespace) -> int:
    token = _token(args)
    conn = _connections(args, "postgres")[0]
    dsn = f"host={conn.listen[0]} port={conn.listen[1]} dbname={conn.upstream.database} user=agent"
    try:
        os.execvpe("psql", ["psql", dsn, *args.psql_args], {**os.environ, "PGPASSWORD": token})
    except OSError as e:
        raise CliError(f"cannot run psql: {e.strerror} (install PostgreSQL's client)") from None


def askpass() -> int:
    """`custody-askpass PROMPT`: ssh's askpass program under `custody ssh`. It prints the
    token for the bridge's password prompt and refuses anything else (exit 1: ssh cancels)."""
    prompt = " ".join(sys.argv[1:]).lower()
    token = os.environ.get(TOKEN_FOR_ASKPASS, "")
    if not token or not any(p in prompt for p in PROMPTS):
        print(f"custody-askpass: not answering {prompt!r}", file=sys.stderr)
        return 1
    print(token)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    def gateway(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(sp)
        sp.add_argument("--proxy-url", default=os.environ.get("CUSTODY_PROXY_URL", "http://127.0.0.1:8080"),
                        help="the gateway as agents reach it (default: $CUSTODY_PROXY_URL, else http://127.0.0.1:8080)")
        sp.add_argument("--confdir", default=os.environ.get("CUSTODY_CONFDIR", "~/.mitmproxy"),
                        help="the gateway's mitmproxy confdir, where its CA is (default: $CUSTODY_CONFDIR, ~/.mitmproxy)")
        sp.add_argument("--ca", help="the gateway CA certificate (default: CONFDIR/mitmproxy-ca-cert.pem)")
        sp.add_argument("--dir", default=os.environ.get("CUSTODY_SSH_DIR", "~/.config/custody/ssh"),
                        help="where the ssh configuration and known_hosts go (default: ~/.config/custody/ssh)")
        return sp

    c = gateway(sub.add_parser("ssh-config", help="write an ssh configuration and known_hosts for the ssh bridges"))
    c.add_argument("--connection", help="only this ssh connection (default: every one)")
    c.set_defaults(func=cmd_ssh_config)
    s = gateway(sub.add_parser("ssh", help="run ssh to an ssh connection, already trusted and authenticated"))
    s.add_argument("--token", help="the agent's token (default: $CUSTODY_TOKEN)")
    s.add_argument("connection", help="the ssh connection's name")
    s.add_argument("command", nargs=argparse.REMAINDER, help="a command to run (default: a governed shell)")
    s.set_defaults(func=cmd_ssh)
    p = with_config(sub.add_parser("psql", help="run psql to a postgres connection, already authenticated"))
    p.add_argument("--token", help="the agent's token (default: $CUSTODY_TOKEN)")
    p.add_argument("connection", help="the postgres connection's name")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="arguments for psql (e.g. -c 'SELECT 1')")
    p.set_defaults(func=cmd_psql)
