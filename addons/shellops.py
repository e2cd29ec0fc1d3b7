"""Shell classification: what a command line sent over SSH does, in the Operation vocabulary.

A line is split into shell words (shlex, POSIX rules) and at the operators a shell runs
commands at (`;`, `&&`, `||`, `&`, `|`, parentheses); every simple command is classified
on its own, and policy decides each one (the strictest decision wins), as for SQL. Per
command: the program (after `VAR=x` prefixes and wrappers such as `env`, `nice`, `timeout`,
`xargs` and `sudo`, which is noted), its arguments, the paths it names, the paths it writes
(redirections, and the arguments of programs that change files), and an action:

    read    ls, cat, grep, ps, df, journalctl, systemctl status, … (and `find` without -delete/-exec)
    write   cp, mv, mkdir, touch, tee, chmod, sed -i, … and any `>`/`>>` redirection
    delete  rm, rmdir, unlink, shred, truncate, find -delete
    exec    interpreters and `bash -c` (whose string is classified too), network tools, any
            program not listed (it could do anything)
    admin   sudo/su/doas, package managers, services, users, kill, reboot, mount, crontab, …
    unknown what a gate cannot see: unbalanced quotes, `$(…)`, backticks, `<(…)`, a program
            named by a variable

`bash -c '…'` and `sh -c '…'` are classified by what they run. Interactive programs (editors,
pagers, top) cannot be governed line by line and are marked so the executor refuses them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

from addons.context import Operation

READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN = "read", "write", "delete", "exec", "admin", "unknown"
RISK = {READ: 10, WRITE: 40, DELETE: 70, EXEC: 80, ADMIN: 90, UNKNOWN: 100}
ORDER = (READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN)

READS = frozenset("""
    ls cat head tail grep egrep fgrep zgrep rg less more wc sort uniq cut tr echo printf pwd id whoami hostname uname
    uptime date df du free ps pgrep stat file which whereis type env printenv find locate diff cmp md5sum sha1sum
    sha256sum basename dirname realpath readlink test true false sleep seq yes journalctl dmesg lsblk lscpu lsof
    netstat ss ip ifconfig getent groups last w who awk jq column nl od hexdump xxd strings tac base64 zcat
""".split())
WRITES = frozenset("cp mv mkdir touch tee chmod chown chgrp ln install rsync dd sed patch tar unzip gzip gunzip".split())
DELETES = frozenset("rm rmdir unlink shred truncate".split())
ADMINS = frozenset("""
    sudo su doas pkexec systemctl service kill killall pkill reboot shutdown poweroff halt init mount umount useradd
    userdel usermod groupadd passwd chpasswd visudo crontab at iptables nft ufw modprobe insmod sysctl chattr setcap
    apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo go
""".split())
PACKAGE_MANAGERS = frozenset("apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo".split())
NETWORK = frozenset("curl wget nc ncat netcat socat ssh scp sftp ftp telnet nmap".split())
INTERPRETERS = frozenset("bash sh dash zsh ksh fish python python2 python3 perl ruby node php lua eval source exec .".split())
INTERACTIVE = frozenset("vi vim nvim nano emacs pico less more man top htop watch tmux screen mysql psql".split())
BUILTINS = frozenset("cd exit export unset pushd popd dirs alias unalias umask set shift wait history hash".split())
"""Shell builtins that change only the shell itself."""
NULL_SINKS = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
WRAPPERS = frozenset("env nice nohup time timeout stdbuf ionice xargs command builtin setsid".split())
SHELL_C = frozenset("bash sh dash zsh ksh".split())
READ_SUBCOMMANDS = {"systemctl": ("status", "show", "list-units", "is-active", "is-enabled", "cat"),
                    "apt": ("list", "show", "search", "policy"), "apt-get": (), "pip": ("list", "show", "freeze"),
                    "pip3": ("list", "show", "freeze"), "dpkg": ("-l", "-L", "-s", "--list", "--status")}
SEPARATORS = (";", "&&", "||", "&", "|", "|&", ";;", "(", ")")
REDIRECTS = (">", ">>", ">|", "<", "<<", "<<<", "&>", "&>>", "<>", ">&", "<&")
MAX_DEPTH = 3


class Unclassifiable(ValueError):
    """The gate cannot see what this line runs."""


def words(line: str) -> list[str]:
    """Shell words and operators; Unclassifiable for what a line-based gate cannot see."""
    if "`" in line or "$(" in line or "<(" in line or ">(" in line:
        raise Unclassifiable("command substitution runs commands the gateway cannot see")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError as e:
        raise Unclassifiable(f"the line does not parse: {e}") from None


def simple_commands(tokens: list[str]) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """(words, redirections) of each simple command, split at the shell's operators."""
    out: list[tuple[list[str], list[tuple[str, str]]]] = []
    current: list[str] = []
    redirects: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in SEPARATORS:
            if current or redirects:
                out.append((current, redirects))
            current, redirects = [], []
        elif t in REDIRECTS or (t[:1] in "<>&" and set(t) <= set("<>&|")):
            if current and current[-1].isdigit():
                current.pop()  # 2> file: the number is the descriptor, not an argument
            target = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not target or target in SEPARATORS:
                raise Unclassifiable(f"redirection {t!r} without a target")
            redirects.append((t, target))
            i += 1
        else:
            current.append(t)
        i += 1
    if current or redirects:
        out.append((current, redirects))
    return out


def _is_path(word: str) -> bool:
    return word.startswith(("/", "./", "../", "~")) or ("/" in word and not word.startswith("-") and "://" not in word)


def command(argv: list[str], redirects: list[tuple[str, str]], depth: int = 0) -> dict[str, Any]:
    """One simple command's details."""
    out: dict[str, Any] = {"argv": argv, "command": shlex.join(argv), "sudo": False, "network": False,
                           "interactive": False, "package": False}
    args = list(argv)
    while args and "=" in args[0] and not args[0].startswith("="):
        args.pop(0)  # VAR=value prefixes
    action = READ
    while args:
        program = os.path.basename(args[0])
        if program in ("sudo", "doas", "su", "pkexec"):
            out["sudo"] = True
            action = ADMIN
            args = [a for a in args[1:] if not a.startswith("-")] if program != "su" else []
            continue
        if program in WRAPPERS:
            rest = args[1:]
            while rest and (rest[0].startswith("-") or "=" in rest[0] or rest[0].replace(".", "").isdigit()):
                rest.pop(0)
            if program == "xargs":
                action = _riskier(action, EXEC)  # runs its command with arguments from input
            args = rest
            continue
        break
    paths = sorted({a for a in argv[1:] if _is_path(a)} | {t for op, t in redirects if not t.isdigit()})
    writes = sorted({t for op, t in redirects if op.startswith((">", "&>", "<>")) and not t.isdigit() and op != ">&"
                     and t not in NULL_SINKS})
    if not args:
        out.update(program="", programs=[], action=_riskier(action, READ if not writes else WRITE), paths=paths, writes=writes)
        return out
    program = os.path.basename(args[0])
    out["program"] = program
    out["programs"] = [program]
    if "$" in args[0]:
        raise Unclassifiable("the program is named by a variable")
    sub = next((a for a in args[1:] if not a.startswith("-")), "")
    if program in INTERACTIVE and not (program in ("mysql", "psql") and ("-c" in args or "-e" in args)):
        out["interactive"] = True
        action = _riskier(action, EXEC)
    elif program in SHELL_C and "-c" in args and depth < MAX_DEPTH:
        script = args[args.index("-c") + 1] if args.index("-c") + 1 < len(args) else ""
        inner = classify_line(script, depth + 1)
        out["runs"] = [p["command"] for p in inner]
        out["programs"] += [x for p in inner for x in p.get("programs", [])]
        action = _riskier(action, *(p["action"] for p in inner))
        paths = sorted(set(paths) | {x for p in inner for x in p["paths"]})
        writes = sorted(set(writes) | {x for p in inner for x in p["writes"]})
        out["sudo"] = out["sudo"] or any(p["sudo"] for p in inner)
        out["network"] = any(p["network"] for p in inner)
    elif program in ADMINS:
        read_only = program in READ_SUBCOMMANDS and sub in READ_SUBCOMMANDS[program]
        action = _riskier(action, READ if read_only else ADMIN)
        out["package"] = program in PACKAGE_MANAGERS and not read_only
    elif program in DELETES:
        action = _riskier(action, DELETE)
        writes = sorted(set(writes) | {a for a in args[1:] if not a.startswith("-")})
    elif program in WRITES or (program == "sed" and any(a.startswith("-i") for a in args)):
        if program != "sed" or any(a.startswith("-i") for a in args):
            action = _riskier(action, WRITE)
            named = [a for a in args[1:] if not a.startswith("-")]
            if program in ("chmod", "chown", "chgrp"):
                named = named[1:]  # the mode or owner
            writes = sorted(set(writes) | {a for a in named if _is_path(a) or program != "sed"})
    elif program in BUILTINS:
        pass
    elif program == "find":
        if any(a in ("-delete",) for a in args):
            action = _riskier(action, DELETE)
        elif any(a in ("-exec", "-execdir", "-ok", "-okdir") for a in args):
            action = _riskier(action, EXEC)
    elif program in NETWORK:
        out["network"] = True
        action = _riskier(action, EXEC)
    elif program in INTERPRETERS:
        action = _riskier(action, EXEC)
    elif program not in READS:
        action = _riskier(action, EXEC)  # a program nobody listed could do anything
    if writes:
        action = _riskier(action, WRITE)
    out.update(action=action, paths=paths, writes=writes)
    return out


def classify_line(line: str, depth: int = 0) -> list[dict[str, Any]]:
    """Every simple command of a line, classified."""
    try:
        return [command(argv, redirects, depth) for argv, redirects in simple_commands(words(line))]
    except Unclassifiable as e:
        return [{"argv": [], "command": line, "program": "", "programs": [], "action": UNKNOWN, "paths": [], "writes": [],
                 "sudo": False, "network": False, "interactive": False, "package": False, "reason": str(e)}]


def _riskier(*actions: str) -> str:
    return max(actions, key=ORDER.index)


SESSION_HEADER = "ssh-bridge-session"
PHASES = {"/connect": "connect", "/exec": "exec", "/shell": "shell", "/close": "close"}


def classify(connection: str, phase: str, line: str | None, details: dict[str, Any] | None = None) -> Operation:
    """The Operation for one ssh_bridge request: a session step, or a command line (an
    `exec` request or a line typed into a shell), each command of it a part."""
    extra = dict(details or {})
    if line is None:
        return Operation(protocol="ssh", connection=connection, action=READ, resource="session", risk=RISK[READ],
                         summary=f"{phase} session on {connection}", details={"phase": phase, **extra})
    parts = tuple(_part(connection, phase, p) for p in classify_line(line))
    if not parts:
        parts = (_part(connection, phase, {"argv": [], "command": "", "program": "", "programs": [], "action": READ, "paths": [],
                                           "writes": [], "sudo": False, "network": False, "interactive": False,
                                           "package": False}),)
    action = _riskier(*(p.action for p in parts))
    programs = sorted({x for p in parts for x in p.details["programs"]})
    return Operation(
        protocol="ssh",
        connection=connection,
        action=action,
        resource=line,
        risk=max(p.risk for p in parts),
        summary=f"{phase} on {connection}: {line}"[:300],
        details={"phase": phase, "line": line, "programs": programs,
                 "paths": sorted({x for p in parts for x in p.details["paths"]}),
                 "writes": sorted({x for p in parts for x in p.details["writes"]}),
                 "sudo": any(p.details["sudo"] for p in parts), **extra},
        parts=parts,
    )


def _part(connection: str, phase: str, details: dict[str, Any]) -> Operation:
    action = details["action"]
    risk = RISK[action] + (10 if details["sudo"] and action != UNKNOWN else 0)
    return Operation(protocol="ssh", connection=connection, action=action, resource=details["command"],
                     risk=min(100, risk), summary=f"{details['command']} on {connection}"[:300],
                     details={**details, "phase": phase})


def classify_request(connection: str, method: str, path: str, session: str, body: Any) -> Operation:
    """The Operation for a request to an ssh connection's virtual host; anything that is
    not a well-formed ssh_bridge request is `unknown`."""
    phase = PHASES.get(path) if method.upper() == "POST" else None
    problem = (
        "not an ssh_bridge request (POST /connect, /exec, /shell or /close)" if phase is None else
        f"no {SESSION_HEADER} header" if not session else
        "the body is not a JSON object" if not isinstance(body, dict) else
        "command is missing or not a string" if phase in ("exec", "shell") and not isinstance(body.get("command"), str)
        else ""
    )
    if problem:
        return Operation(protocol="ssh", connection=connection, action=UNKNOWN, resource="", risk=RISK[UNKNOWN],
                         summary=f"{method} {path} on {connection}: {problem}",
                         details={"phase": phase or "unknown", "reason": problem, "session": session})
    op = classify(connection, phase, body.get("command") if phase in ("exec", "shell") else None,
                  {"session": session, **({"user": str(body.get("user", ""))} if phase == "connect" else {})})
    return dataclasses.replace(op, payload=body)
