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
import posixpath
import shlex
from typing import Any

from addons.classifiers.http import parse_json_body
from addons.engine.bridge import SSH
from addons.engine.model import Operation, Request

READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN = "read", "write", "delete", "exec", "admin", "unknown"
RISK = {READ: 10, WRITE: 40, DELETE: 70, EXEC: 80, ADMIN: 90, UNKNOWN: 100}
ORDER = (READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN)

READS = frozenset("""
    ls cat head tail grep egrep fgrep zgrep rg wc cut tr echo printf pwd id whoami hostname uname
    uptime date df du free ps pgrep stat file which whereis type printenv locate diff cmp md5sum sha1sum
    sha256sum basename dirname realpath readlink test [ true false sleep seq yes journalctl dmesg lsblk lscpu lsof
    netstat ss ifconfig getent groups last w who jq column nl od hexdump xxd strings tac base64 zcat
""".split())
WRITES = frozenset("cp mv mkdir touch tee chmod chown chgrp ln install rsync patch unzip gzip gunzip truncate".split())
DELETES = frozenset("rm rmdir unlink shred".split())
ADMINS = frozenset("""
    sudo su doas pkexec systemctl service kill killall pkill reboot shutdown poweroff halt init mount umount useradd
    userdel usermod groupadd passwd chpasswd visudo crontab at iptables nft ufw modprobe insmod sysctl chattr setcap
    apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo go ip
""".split())
PACKAGE_MANAGERS = frozenset("apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo".split())
NETWORK = frozenset("curl wget nc ncat netcat socat ssh scp sftp ftp telnet nmap".split())
INTERPRETERS = frozenset("""bash sh dash zsh ksh fish python python2 python3 perl ruby node php lua source . awk gawk
    mawk sed tar dd find sort uniq git make xargs busybox""".split())
"""Programs whose arguments can run commands or write files (awk's system(), sed's e and w,
tar --to-command, dd of=, find -fprint, sort -o, …): exec, whatever they are asked to do."""
INTERACTIVE = frozenset("vi vim nvim nano emacs pico less more man top htop watch tmux screen mysql psql".split())
WRAPPERS = frozenset("env nice nohup time timeout stdbuf ionice command builtin setsid exec chroot".split())
"""They run the rest of their arguments as a command: every later word is tried as the program."""
SHELL_C = frozenset("bash sh dash zsh ksh".split())
KEYWORDS = frozenset("{ } ! if then else elif fi do done while until for in case esac select time coproc [[ ]]".split())
BUILTINS = frozenset("cd exit pwd pushd popd dirs umask shift wait".split())
"""Shell builtins that change only the shell itself."""
DEFINERS = frozenset("alias function declare typeset readonly export local set shopt enable trap hash history".split())
"""Builtins that change what later lines run (aliases, functions, variables, options, the
command hash): a line-based gate decides each line on what it says, so they are refused."""
SAFE_ASSIGN = frozenset()
RISKY_VARIABLES = ("PATH", "LD_", "BASH_ENV", "ENV", "IFS", "PROMPT_COMMAND", "CDPATH", "SHELLOPTS", "BASHOPTS",
                   "GLOBIGNORE", "BASH_", "PS4", "HOME")
READ_SUBCOMMANDS = {"systemctl": ("status", "show", "list-units", "is-active", "is-enabled", "cat"),
                    "apt": ("list", "show", "search", "policy"), "pip": ("list", "show", "freeze"),
                    "pip3": ("list", "show", "freeze"), "dpkg": ("-l", "-L", "-s", "--list", "--status"),
                    "ip": ("addr", "a", "address", "route", "r", "link", "l", "neigh", "n")}
IP_CHANGES = ("add", "del", "delete", "set", "change", "replace", "flush", "exec", "netns")
SEPARATORS = (";", "&&", "||", "&", "|", "|&", ";;", "(", ")", ";&", ";;&")
REDIRECTS = (">", ">>", ">|", "<", "<<", "<<<", "&>", "&>>", "<>", ">&", "<&")
NULL_SINKS = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
EXPANDING = set("*?[{~$`")
MAX_DEPTH = 3


class Unclassifiable(ValueError):
    """The gate cannot see what this line runs."""


def strip_comment(line: str) -> str:
    """The line without its comment: `#` starts one only at the start of a word, outside quotes."""
    quote, escaped = "", False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t;&|()"):
            return line[:i]
    return line


def words(line: str) -> list[str]:
    """Shell words and operators; Unclassifiable for what a line-based gate cannot see."""
    if any(ch in line for ch in "\n\r\0"):
        raise Unclassifiable("a line with a newline is several lines: send one command line at a time")
    line = strip_comment(line)
    if "`" in line or "$(" in line or "<(" in line or ">(" in line:
        raise Unclassifiable("command substitution runs commands the gateway cannot see")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
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
        if t == "()" or t in SEPARATORS:
            if t == "()" or (t == "(" and current and i + 1 < len(tokens) and tokens[i + 1] == ")"):
                raise Unclassifiable("defining a shell function would let later lines run what was not decided")
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
        elif t in KEYWORDS and not current:
            pass  # `{ sudo id; }`, `! sudo id`, `if sudo id; then …`: what follows is a command
        else:
            current.append(t)
        i += 1
    if current or redirects:
        out.append((current, redirects))
    return out


def _is_path(word: str) -> bool:
    return word.startswith(("/", "./", "../", "~")) or ("/" in word and not word.startswith("-") and "://" not in word)


def _resolve(path: str, cwd: str | None) -> str:
    """An absolute, normalised path ('..' folded as the kernel would for existing dirs);
    Unclassifiable when the shell would expand it or the directory is unknown."""
    if set(path) & EXPANDING:
        raise Unclassifiable(f"the path {path!r} is expanded by the shell; name it literally")
    if not path.startswith("/"):
        if cwd is None:
            raise Unclassifiable(f"the relative path {path!r} cannot be resolved (unknown directory)")
        path = posixpath.join(cwd, path)
    return posixpath.normpath(path).replace("//", "/")


def _option_paths(args: list[str], written: bool = False) -> list[str]:
    """Paths given as option values: --target-directory=/etc, of=/etc/passwd, -o/--output
    FILE (`written`: leave out dd's if=, which is read)."""
    out = []
    for n, a in enumerate(args):
        if "=" in a and (a.startswith("-") or a.split("=", 1)[0] in (("of",) if written else ("of", "if"))):
            value = a.split("=", 1)[1]
            if value:
                out.append(value)
        elif a in ("-o", "--output", "-t", "--target-directory", "-fprint", "-fprintf", "-fls") and n + 1 < len(args):
            out.append(args[n + 1])
    return out


def command(argv: list[str], redirects: list[tuple[str, str]], depth: int = 0, cwd: str | None = "/") -> dict[str, Any]:
    """One simple command's details. `cwd` resolves relative paths (None: unknown)."""
    out: dict[str, Any] = {"argv": argv, "command": shlex.join(argv), "sudo": False, "network": False,
                           "interactive": False, "package": False, "recursive": False, "programs": []}
    args = list(argv)
    action = READ
    while args and "=" in args[0] and not args[0].startswith("=") and args[0].split("=", 1)[0].isidentifier():
        name = args.pop(0).split("=", 1)[0]  # VAR=value prefixes
        if name.startswith(RISKY_VARIABLES):
            action = ADMIN  # PATH, LD_PRELOAD, BASH_ENV, …: what runs is no longer what the line names
    written = [t for op, t in redirects if op.startswith((">", "&>", "<>")) and not t.isdigit() and t != "-"
               and t not in NULL_SINKS]
    if any(t.startswith(("/dev/tcp/", "/dev/udp/")) for _, t in redirects):
        out["network"] = True
        action = _riskier(action, EXEC)
    named = [a for a in argv[1:] if _is_path(a)] + _option_paths(argv[1:]) + [t for _, t in redirects if not t.isdigit()]
    if not args:
        out.update(program="", action=_riskier(action, WRITE if written else READ),
                   paths=sorted({_resolve(x, cwd) for x in named}), writes=sorted({_resolve(x, cwd) for x in written}))
        return out
    program = os.path.basename(args[0])
    if set(args[0]) & EXPANDING:
        raise Unclassifiable(f"the program {args[0]!r} is expanded by the shell (a variable, a glob or braces)")
    out["program"] = program
    out["programs"] = [program]
    sub = next((a for a in args[1:] if not a.startswith("-")), "")
    inner: list[dict[str, Any]] = []
    if program in WRAPPERS or program == "xargs" or program == "busybox" or (program == "env" and len(args) > 1):
        # every later word may be the program it runs (`timeout 5s sudo id`, `env -S 'sudo id'`)
        for i in range(1, len(args)):
            if not args[i].startswith("-") and depth < MAX_DEPTH:
                inner.append(command(args[i:], [], depth + 1, cwd))
            if args[i].startswith(("-S", "--split-string")) and depth < MAX_DEPTH:
                script = args[i][2:] or (args[i + 1] if i + 1 < len(args) else "")
                inner += classify_line(script.split("=", 1)[-1] if script.startswith("=") else script, depth + 1, cwd)
        action = _riskier(action, EXEC if program in ("xargs", "busybox", "exec", "chroot") else READ)
    elif program in ("sudo", "doas", "su", "pkexec"):
        out["sudo"] = True
        action = ADMIN
        if depth < MAX_DEPTH:
            inner = [command(args[i:], [], depth + 1, cwd) for i in range(1, len(args)) if not args[i].startswith("-")]
    elif program == "eval" and depth < MAX_DEPTH:
        inner = classify_line(" ".join(args[1:]), depth + 1, cwd)
        action = _riskier(action, EXEC)
    elif program in DEFINERS or program == "alias":
        raise Unclassifiable(f"{program} changes what later lines run; a line-based gate cannot follow it")
    elif program in INTERACTIVE and not (program in ("mysql", "psql") and ("-c" in args or "-e" in args)):
        out["interactive"] = True
        action = _riskier(action, EXEC)
    elif program in SHELL_C and "-c" in args and depth < MAX_DEPTH:
        at = args.index("-c") + 1
        inner = classify_line(args[at] if at < len(args) else "", depth + 1, cwd)
        action = _riskier(action, EXEC)
    elif program in ADMINS:
        read_only = program in READ_SUBCOMMANDS and sub in READ_SUBCOMMANDS[program] and not (
            program == "ip" and any(a in IP_CHANGES for a in args))
        action = _riskier(action, READ if read_only else ADMIN)
        out["package"] = program in PACKAGE_MANAGERS and not read_only
    elif program in DELETES:
        action = _riskier(action, DELETE)
        flags = "".join(a.lstrip("-") for a in args[1:] if a.startswith("-") and not a.startswith("--"))
        out["recursive"] = program == "rm" and (bool(set(flags) & set("rRf")) or "--recursive" in args or "--force" in args)
        written += [a for a in args[1:] if not a.startswith("-")]
    elif program in WRITES:
        action = _riskier(action, WRITE)
        targets = [a for a in args[1:] if not a.startswith("-")]
        if program in ("chmod", "chown", "chgrp"):
            targets = targets[1:]  # the mode or owner
            out["recursive"] = any(a in ("-R", "--recursive") for a in args)
        written += targets + _option_paths(args[1:], written=True)
    elif program in NETWORK:
        out["network"] = True
        action = _riskier(action, EXEC)
    elif program in INTERPRETERS:
        action = _riskier(action, EXEC)
        if program == "find" and "-delete" in args:
            action, out["recursive"] = _riskier(action, DELETE), True
        for flag in ("-exec", "-execdir", "-ok", "-okdir"):
            if flag in args and depth < MAX_DEPTH:  # what find runs is classified too
                rest = args[args.index(flag) + 1:]
                end = next((n for n, a in enumerate(rest) if a in (";", "+")), len(rest))
                inner.append(command(rest[:end], [], depth + 1, cwd))
        written += _option_paths(args[1:], written=True)
    elif program not in BUILTINS and program not in READS:
        action = _riskier(action, EXEC)  # a program nobody listed could do anything
    for d in inner:
        action = _riskier(action, d["action"])
        for flag in ("sudo", "network", "package", "recursive", "interactive"):
            out[flag] = out[flag] or d[flag]
        out["programs"] += d["programs"]
    paths = {_resolve(x, cwd) for x in named} | {x for d in inner for x in d["paths"]}
    writes = {_resolve(x, cwd) for x in written} | {x for d in inner for x in d["writes"]}
    if writes:
        action = _riskier(action, WRITE)
    out.update(action=action, paths=sorted(paths | writes), writes=sorted(writes),
               programs=list(dict.fromkeys(out["programs"])))
    return out


def classify_line(line: str, depth: int = 0, cwd: str | None = "/") -> list[dict[str, Any]]:
    """Every simple command of a line, classified; `cd` moves the directory later commands
    of the line resolve their paths from."""
    try:
        out = []
        for argv, redirects in simple_commands(words(line)):
            out.append(command(argv, redirects, depth, cwd))
            if argv and argv[0] == "cd":
                target = next((a for a in argv[1:] if not a.startswith("-")), None)
                cwd = _resolve(target, cwd) if target and target != "-" and cwd is not None else None
        return out
    except Unclassifiable as e:
        return [{"argv": [], "command": line, "program": "", "programs": [], "action": UNKNOWN, "paths": [],
                 "writes": [], "sudo": False, "network": False, "interactive": False, "package": False,
                 "recursive": False, "reason": str(e)}]


def _riskier(*actions: str) -> str:
    return max(actions, key=ORDER.index)




def classify(connection: str, phase: str, line: str | None, details: dict[str, Any] | None = None,
             cwd: str | None = None, stdin: bool = False) -> Operation:
    """The Operation for one ssh_bridge request: a session step, or a command line (an
    `exec` request or a line typed into a shell), each command of it a part. `cwd` is the
    session's directory on the host (None until known: relative paths are then unknown);
    `stdin` says the command gets input, which an interpreter would run unseen."""
    extra = dict(details or {})
    if line is None:
        return Operation(protocol="ssh", connection=connection, action=READ, resource="session", risk=RISK[READ],
                         summary=f"{phase} session on {connection}", details={"phase": phase, **extra})
    commands = classify_line(line, cwd=cwd)
    for c in commands:
        if stdin and c["program"] in INTERPRETERS | SHELL_C and "-c" not in c["argv"]:
            c.update(action=UNKNOWN, reason=f"{c['program']} would run a script from standard input, unseen")
    parts = tuple(_part(connection, phase, p) for p in commands)
    if not parts:
        parts = (_part(connection, phase, {"argv": [], "command": "", "program": "", "programs": [], "action": READ,
                                           "paths": [], "writes": [], "sudo": False, "network": False,
                                           "interactive": False, "package": False, "recursive": False}),)
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
                 "sudo": any(p.details["sudo"] for p in parts), "cwd": cwd, **extra},
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
    phase = SSH.phase(method, path)
    problem = (
        "not an ssh_bridge request (POST /connect, /exec, /shell or /close)" if phase is None else
        f"no {SSH.session_header} header" if not session else
        "the body is not a JSON object" if not isinstance(body, dict) else
        "command is missing or not a string" if phase in ("exec", "shell") and not isinstance(body.get("command"), str)
        else ""
    )
    if problem:
        return Operation(protocol="ssh", connection=connection, action=UNKNOWN, resource="", risk=RISK[UNKNOWN],
                         summary=f"{method} {path} on {connection}: {problem}",
                         details={"phase": phase or "unknown", "reason": problem, "session": session})
    op = classify(connection, phase, body.get("command") if phase in ("exec", "shell") else None,
                  {"session": session, **({"user": str(body.get("user", ""))} if phase == "connect" else {})},
                  stdin=bool(body.get("stdin")))
    return dataclasses.replace(op, payload=body)


def from_request(connection: str, request: Request) -> Operation:
    body = parse_json_body(request.content, "application/json")
    return classify_request(connection, request.method, request.target, request.header(SSH.session_header), body)
