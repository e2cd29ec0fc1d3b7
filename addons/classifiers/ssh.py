"""Shell classification: what a command line sent over SSH does, in the Operation vocabulary.

A line is split into simple commands (addons/classifiers/shell.py) and every one is
classified on its own; policy decides each one (the strictest decision wins), as for SQL.
Per command: the program, resolved the way the shell will resolve it (after `VAR=x`
prefixes and wrappers such as `env`, `nice`, `timeout`, `xargs` and `sudo`, which is
noted), its arguments, the paths it names, the paths it writes (redirections, and what each
writer of addons/classifiers/programs.py writes), and an action:

    read    ls, cat, grep, ps, df, journalctl, systemctl status, … (and `find` without -delete/-exec)
    write   cp, mv, mkdir, touch, tee, chmod, ln, install, patch, xxd with an output file, … and
            any `>`/`>>` redirection
    delete  rm, rmdir, unlink, shred, find -delete
    exec    interpreters and `bash -c` (whose string is classified too), network tools, any
            program not listed, and any program the gateway cannot identify (named outside
            the system directories, or found through a PATH that leaves them): riskiest
    admin   sudo/su/doas, package managers, services, users, kill, reboot, mount, crontab, …,
            and variables that change what runs (PATH=, LD_PRELOAD=, …)
    unknown what a gate cannot see: unbalanced quotes, `$(…)`, backticks, `<(…)`, a program
            named by a variable, a writer whose targets are expansions, an interpreter or
            editor reading its code from standard input, and every builtin that changes what
            later commands run (variables, `read`, `printf -v`, `source`, `hash`, `enable`,
            traps, the umask); `cd`, `pushd` and `popd` are tracked instead

`bash -c '…'`, `bash <<< '…'` and `sh -c '…'` are classified by what they run. Interactive
programs (editors, pagers, top) cannot be governed line by line and are marked so the
planner refuses them before any decision.

The session a line runs in (`Session`) comes from the planner: the working directory, the
PATH, the home directory, whether standard input is the client's, and the host's answers
about symlinks (real paths of the files named, real locations of the programs).
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex
from dataclasses import dataclass, field
from typing import Any

from addons.classifiers import programs as P
from addons.classifiers.http import parse_json_body
from addons.classifiers.programs import ADMIN, DELETE, EXEC, READ, UNKNOWN, WRITE
from addons.classifiers.shell import Simple, Unclassifiable, simple_commands, words
from addons.engine.bridge import SSH
from addons.engine.model import Operation, Request

RISK = {READ: 10, WRITE: 40, DELETE: 70, EXEC: 80, ADMIN: 90, UNKNOWN: 100}
ORDER = (READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN)
NULL_SINKS = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
EXPANDING = set("*?[{~$`")
MAX_DEPTH = 3
MAX_WRAPPERS = 16
"""Each word that runs the rest of its command (nice, env, sudo, …) has every later word
tried as the program, nested: the cost grows with the cube of their number (80 took 1.4 s)."""
RUNNERS = frozenset({"xargs", "busybox", "parallel", "sudo", "doas", "su", "pkexec", "runuser", "eval"})
TREE = "/**"
"""A written path ending so is a whole tree (an archive extracted, a patch applied): rules
read it as every path under its directory."""


@dataclass
class Asked:
    """What the first pass of a line wants the host to resolve: paths (absolute, as the
    kernel will walk them) and program words (with the directory they are named from)."""

    paths: set[str] = field(default_factory=set)
    programs: set[tuple[str, str | None]] = field(default_factory=set)


@dataclass(frozen=True)
class Session:
    """The session a line runs in, as the planner knows it.

    `cwd` (None: unknown), `path` (the session's PATH; None: unknown), `home`, `stdin`
    (the line's standard input is the client's stream, not /dev/null); `paths` and
    `programs` are the host's answers (raw path -> real path; (program word, directory it
    is named from) -> (where the shell finds it, the file it really is)); `asked` collects
    what to ask the host."""

    cwd: str | None = "/"
    path: str | None = P.STANDARD_PATH
    system_path: bool = False
    """The host said every directory of `path` is, symlinks followed, a system directory: a
    bare program word on it is what its name says (`programs.identify`), so it is not asked
    about — the answer could not change what it is."""
    home: str | None = None
    stdin: bool = False
    paths: dict[str, str] = field(default_factory=dict)
    programs: dict[tuple[str, str | None], tuple[str, str]] = field(default_factory=dict)
    asked: Asked | None = None
    linked: tuple[str, ...] = ()
    """What earlier commands of the line wrote that may now be a symlink (`P.LINKERS`): the
    host was asked before the line ran, so a path under one cannot be placed."""

    def at(self, cwd: str | None) -> Session:
        return dataclasses.replace(self, cwd=cwd)

    def resolve(self, path: str) -> str:
        """An absolute path as the kernel resolves it: the host's answer when it gave one
        (symlinks followed), else the lexical normal form; Unclassifiable when the shell
        would expand it or the directory is unknown."""
        if set(path) & EXPANDING:
            raise Unclassifiable(f"the path {path!r} is expanded by the shell; name it literally")
        if not path.startswith("/"):
            if self.cwd is None:
                raise Unclassifiable(f"the relative path {path!r} cannot be resolved (unknown directory)")
            path = posixpath.join(self.cwd, path)
        if self.asked is not None:
            self.asked.paths.add(path)
        lexical = posixpath.normpath(path).replace("//", "/")
        if self.linked and ".." in path.split("/"):  # the kernel follows a link before its `..`
            raise Unclassifiable(f"{path!r} has '..' after a line that may have made a symlink; name it plainly")
        if under := next((w for w in self.linked if lexical.startswith(w.rstrip("/") + "/")), None):
            raise Unclassifiable(f"{path!r} is under {under!r}, which an earlier command of this line may have made "
                                 "a symlink; run them as separate lines")
        return self.paths.get(path) or lexical


def _is_path(word: str) -> bool:
    return word.startswith(("/", "./", "../", "~")) or ("/" in word and not word.startswith("-") and "://" not in word)


def _is_remote(word: str) -> bool:
    """host:path or user@host:path (rsync, scp): not a local file."""
    head = word.split("/", 1)[0]
    return ":" in head and not word.startswith("/")


def _option_paths(args: list[str]) -> list[str]:
    """Paths given as option values, for `paths` (what a command names, read or written)."""
    out = []
    for n, a in enumerate(args):
        if "=" in a and (a.startswith("-") or a.split("=", 1)[0] in ("of", "if")):
            value = a.split("=", 1)[1]
            if value and _is_path(value):
                out.append(value)
        elif a in ("-o", "--output", "-t", "--target-directory", "-fprint", "-fprintf", "-fls", "-C",
                   "--directory", "-d", "-f", "--file") and n + 1 < len(args) and _is_path(args[n + 1]):
            out.append(args[n + 1])
    return out


def _blank(text: str, action: str, reason: str = "") -> dict[str, Any]:
    return {"argv": [], "command": text, "program": "", "programs": [], "action": action, "paths": [],
            "writes": [], "sudo": False, "network": False, "interactive": False, "package": False,
            "recursive": False, **({"reason": reason} if reason else {})}


def _assignment(word: str) -> str:
    """The variable a `NAME=value` or `NAME+=value` word assigns, or ""."""
    name, eq, _ = word.partition("=")
    name = name[:-1] if name.endswith("+") else name
    return name if eq and name.isidentifier() else ""


def stdin_source(s: Simple, where: Session) -> tuple[str, str]:
    """Where a command's standard input comes from: ("client", ""), ("null", ""),
    ("pipe", ""), ("file", path), ("here", text) or ("fd", n)."""
    redirect = s.stdin()
    if redirect is not None:
        op, target = redirect
        if op == "<<<":
            return "here", target
        if op == "<<":
            return "null", ""  # a here-document needs lines: on one line it is empty
        if op == "<&":
            return ("client" if where.stdin else "null", "") if target == "0" else ("fd", target)
        return ("client" if where.stdin else "null", "") if target in P.STDIN_NAMES[1:] else ("file", target)
    if s.piped:
        return "pipe", ""
    return ("client" if where.stdin else "null"), ""


def command(s: Simple, where: Session, depth: int = 0, source: tuple[str, str] | None = None,
            args_unseen: bool = False) -> dict[str, Any]:
    """One simple command's details, in the session `where`."""
    argv, redirects = s.argv, s.redirects
    source = source or stdin_source(s, where)
    out: dict[str, Any] = {"argv": argv, "command": shlex.join(argv), "sudo": False, "network": False,
                           "interactive": False, "package": False, "recursive": False, "programs": []}
    args = list(argv)
    action = READ
    while args and (name := _assignment(args[0])):
        args.pop(0)  # VAR=value prefixes
        if name.startswith(P.RISKY_VARIABLES) or name.startswith("BASH_FUNC_"):
            action = ADMIN  # PATH, LD_PRELOAD, BASH_ENV, …: what runs is no longer what the line names
            where = dataclasses.replace(where, path=None) if name == "PATH" else where
        elif args and not name.startswith(P.PLAIN_VARIABLES):
            action = _riskier(action, EXEC)  # GREP='sh -c …' zgrep: the program's environment can name what it runs
    written = [t for op, t in redirects if op.startswith((">", "&>", "<>")) and not t.isdigit() and t != "-"
               and t not in NULL_SINKS]
    if any(t.startswith(("/dev/tcp/", "/dev/udp/")) for _, t in redirects):
        out["network"] = True
        action = _riskier(action, EXEC)
    named = ([a for a in argv[1:] if _is_path(a) and not _is_remote(a)] + _option_paths(argv[1:])
             + [t for op, t in redirects if not t.isdigit() and op != "<<<"])
    if not args:
        out.update(program="", action=_riskier(action, WRITE if written else READ),
                   paths=sorted({where.resolve(x) for x in named}), writes=sorted({where.resolve(x) for x in written}))
        return out
    word = args[0]
    if set(word) & EXPANDING:
        raise Unclassifiable(f"the program {word!r} is expanded by the shell (a variable, a glob or braces)")
    if where.asked is not None and word not in P.BUILTINS and (
            "/" in word or (where.path is not None and not where.system_path)):  # unknown PATH: no answer is its
        where.asked.programs.add((word, where.cwd))
    who = P.identify(word, where.cwd, where.path, where.programs)
    # an unidentified program is judged by the name it was given too (a copy named sudo is
    # still denied as sudo, /tmp/tee still writes its operands), and is at least exec
    program = who.name or posixpath.basename(word)
    rest = args[1:]
    out["program"] = who.name or word
    out["programs"] = [who.name or word]
    inner: list[dict[str, Any]] = []
    trees: list[str] = []
    if not who.name:
        out["unidentified"] = who.why
    if hidden := P.hidden_flags(program, rest):
        raise Unclassifiable(f"the shell would expand {hidden!r} into the arguments that decide what {program} does; "
                             "write them out")
    if program == "jobs" and any(a.startswith("-") and "x" in a for a in P.options(rest)):
        raise Unclassifiable("jobs -x runs the command after it; run that command itself")
    if change := P.session_change(program, rest):
        if change != "tracked":
            raise Unclassifiable(f"{program} changes {change} for later commands; a line-based gate decides each "
                                 "line on what it says")
    elif program in P.WRAPPERS or program in ("xargs", "busybox", "parallel"):
        inner = _wrapped(program, rest, where, depth, source)
        action = _riskier(action, EXEC if program in ("xargs", "busybox", "exec", "parallel") else READ)
    elif program in ("sudo", "doas", "su", "pkexec", "runuser"):
        out["sudo"] = True
        action = ADMIN
        chdir = P.option_value(rest, ("-D", "--chdir"))
        inside = where.at(where.resolve(chdir[-1])) if chdir else where
        if depth < MAX_DEPTH:
            inner = [command(Simple(rest[i:]), inside, depth + 1, source) for i in range(len(rest))
                     if not rest[i].startswith("-")]
    elif program == "eval" and depth < MAX_DEPTH:
        inner = classify_line(" ".join(rest), depth + 1, where)
        action = _riskier(action, EXEC)
    else:
        action, inner = _program(program, rest, where, depth, source, out, action)
    if args_unseen and (action in (WRITE, DELETE) or program in P.WRITERS or program in P.DELETES):
        raise Unclassifiable(f"{program} would get its operands from standard input, which the gateway does not see")
    if not who.name:
        action = _riskier(action, EXEC)  # what runs is not what the tables know: it could do anything
    if program in P.WRITERS:
        targets, trees = _writes(program, rest, where)
        written += targets
    elif program in P.DELETES:
        action = _riskier(action, DELETE)
        written += [a for a in rest if not a.startswith("-")]
    for d in inner:
        action = _riskier(action, d["action"])
        for flag in ("sudo", "network", "package", "recursive", "interactive"):
            out[flag] = out[flag] or d[flag]
        out["programs"] += d["programs"]
        for key in ("reason", "unidentified"):
            if d.get(key) and not out.get(key):
                out[key] = d[key]
    paths = {where.resolve(x) for x in named} | {x for d in inner for x in d["paths"]}
    writes = ({where.resolve(x) for x in written} | {x for d in inner for x in d["writes"]}
              | {_tree(where.resolve(t)) for t in trees})
    if writes:
        action = _riskier(action, WRITE)
    if out.get("unidentified") and not out.get("reason"):
        out["reason"] = out["unidentified"]
    out.update(action=action, paths=sorted(paths | writes), writes=sorted(writes),
               programs=list(dict.fromkeys(out["programs"])))
    return out


def _tree(directory: str) -> str:
    return directory.rstrip("/") + TREE


def _wrapped(program: str, rest: list[str], where: Session, depth: int, source: tuple[str, str]) -> list[dict]:
    """A wrapper's command: every later word may be the program it runs (`timeout 5s sudo
    id`, `env -S 'sudo id'`); `env -C DIR` moves the directory it runs in; xargs and
    parallel give it operands the gateway does not see."""
    inner: list[dict[str, Any]] = []
    if depth >= MAX_DEPTH:
        return inner  # every later word was already tried as the program by the wrapper outside
    unseen = program in ("xargs", "parallel")
    inner_source = ("null", "") if unseen else source
    for i in range(len(rest)):
        a = rest[i]
        if program == "env" and a not in ("-C", "-S") and not a.startswith(("-C", "-S", "--chdir", "--split-string")) \
                and (P.has_flag([a], ("-C", "-S")) or P.has_flag([a], ("--chdir", "--split-string"))):
            raise Unclassifiable(f"env {a}: -C and -S spelled in a bundle or abbreviated; write them on their own")
        if program == "env" and (value := P.option_value(rest[i:i + 2], ("-C", "--chdir"))):
            where = where.at(where.resolve(value[0]))
        if not a.startswith("-"):
            inner.append(command(Simple(rest[i:]), where, depth + 1, inner_source, args_unseen=unseen))
        if a.startswith(("-S", "--split-string")):
            if depth + 1 >= MAX_DEPTH:  # its words are only in the string: nobody outside tried them
                raise Unclassifiable(f"env -S nested more than {MAX_DEPTH} deep; run the inner command itself")
            script = a[2:] or (rest[i + 1] if i + 1 < len(rest) else "")
            inner += classify_line(script.split("=", 1)[-1] if script.startswith("=") else script, depth + 1, where)
    return inner


def _program(program: str, rest: list[str], where: Session, depth: int, source: tuple[str, str],
             out: dict[str, Any], action: str) -> tuple[str, list[dict]]:
    """The action of an identified program that is not a builtin, wrapper or sudo, and the
    commands it runs."""
    inner: list[dict[str, Any]] = []
    sub = next((a for a in rest if not a.startswith("-")), "")
    code = P.CODE.get(program)
    if program in P.INTERACTIVE and not _batch(program, rest):
        out["interactive"] = True
        action = _riskier(action, EXEC)
    if program in P.SHELLS and "-c" in rest:
        at = rest.index("-c") + 1
        if depth < MAX_DEPTH:
            inner = classify_line(rest[at] if at < len(rest) else "", depth + 1, where)
        action = _riskier(action, EXEC)
    elif code is not None:
        action = _riskier(action, EXEC)
        kind, text = _code_source(program, code, rest, source)
        if kind == "unseen":
            action = UNKNOWN
            out["reason"] = text
        elif kind == "here" and program in P.SHELLS and depth < MAX_DEPTH:
            inner = classify_line(text, depth + 1, where)
    elif program in P.ADMINS:
        read_only = program in P.READ_SUBCOMMANDS and sub in P.READ_SUBCOMMANDS[program] and not (
            program == "ip" and any(a in P.IP_CHANGES for a in rest)) and all(
            a in P.VALUELESS for a in rest[:rest.index(sub)])
        action = _riskier(action, READ if read_only else ADMIN)
        out["package"] = program in P.PACKAGE_MANAGERS and not read_only
    elif program == "scp" and ("-t" in rest or "-f" in rest):
        action = _riskier(action, WRITE if "-t" in rest else READ)  # the host's end of `scp -O`
    elif program == "rsync" and "--server" in rest:
        action = _riskier(action, READ if "--sender" in rest else WRITE)  # the host's end of `rsync -e ssh`
    elif program in P.NETWORK or (program == "rsync" and (any(_is_remote(a) for a in rest)
                                                          or P.has_flag(rest, ("-e", "--rsh")))):
        out["network"] = True
        action = _riskier(action, EXEC)
    elif program in P.RUNNERS:
        action = _riskier(action, EXEC)
        if program == "find" and "-delete" in rest:
            action, out["recursive"] = _riskier(action, DELETE), True
        for flag in ("-exec", "-execdir", "-ok", "-okdir"):
            if flag in rest and depth < MAX_DEPTH:  # what find runs is classified too
                after = rest[rest.index(flag) + 1:]
                end = next((n for n, a in enumerate(after) if a in (";", "+")), len(after))
                inner.append(command(Simple(after[:end]), where, depth + 1, ("null", "")))
    elif _changes_system(program, rest):
        action = _riskier(action, ADMIN)
    elif program == "rg" and P.has_flag(rest, ("--pre",)):
        action = _riskier(action, EXEC)  # rg --pre runs a program on every file
    elif program in P.WRITERS:
        action = _riskier(action, WRITE if not P.WRITERS[program].when else READ)
    elif program not in P.BUILTINS and program not in P.READS and program not in P.DELETES:
        action = _riskier(action, EXEC)  # a program nobody listed could do anything
    if program in ("chmod", "chown", "chgrp"):
        out["recursive"] = any(a in ("-R", "--recursive") for a in rest)
    elif program == "rm":
        flags = "".join(a.lstrip("-") for a in rest if a.startswith("-") and not a.startswith("--"))
        out["recursive"] = bool(set(flags) & set("rRf")) or "--recursive" in rest or "--force" in rest
    return action, inner


def _batch(program: str, rest: list[str]) -> bool:
    """Is an interactive program run without its screen (top -b, psql -c, vim -es, emacs --batch)?"""
    if program in ("mysql", "psql"):
        return "-c" in rest or "-e" in rest or any(a.startswith(("--command", "--execute")) for a in rest)
    if program == "top":
        return P.has_flag(rest, ("-b", "--batch"))
    if program in ("vi", "vim", "nvim", "ex"):
        return P.has_flag(rest, ("-e", "-E", "-s", "--headless", "-c", "--cmd")) or any(a.startswith("+") for a in rest)
    if program == "emacs":
        return P.has_flag(rest, ("--batch", "--script"))
    return False


def _code_source(program: str, code: P.Code, rest: list[str], source: tuple[str, str]) -> tuple[str, str]:
    """Where the code an interpreter runs comes from: ("line", "") when the line carries it
    or names its file, ("here", text) for a here-string, ("unseen", reason) when it is
    read from standard input that is the client's stream or a pipe."""
    inline = P.option_value(rest, code.inline) or any(a in code.inline for a in rest)
    from_file = P.option_value(rest, code.files)
    values = code.values + code.inline + code.files
    operand = P.operands(rest, values)
    reads_stdin = (P.has_flag(rest, code.stdin) or any(f in P.STDIN_NAMES for f in from_file)
                   or (operand[:1] and operand[0] in P.STDIN_NAMES and code.operand != "none"))
    reads_stdin = reads_stdin or code.always_stdin or (
        not inline and not from_file and (code.operand == "none" or not operand))
    if not reads_stdin:
        return "line", ""
    kind, text = source
    if kind in ("client", "pipe", "fd"):
        what = "the client's input" if kind == "client" else "a pipe" if kind == "pipe" else "another descriptor"
        return "unseen", (f"{program} would run code from standard input ({what}), unseen by the gateway; give it "
                          "the code on the line (-c/-e) or a file, or redirect its input (</dev/null)")
    return kind, text


def _changes_system(program: str, rest: list[str]) -> bool:
    """A read-only program asked to change the system: `date -s`, `hostname NAME`, `dmesg -C`, …"""
    if program in P.CHANGING_FLAGS and P.has_flag(rest, P.CHANGING_FLAGS[program]):
        return True
    plain = P.operands(rest, ("-d", "--date", "-f", "--file", "-r", "--reference", "-I", "-R"))
    if program == "date":
        return any(not a.startswith("+") for a in plain)
    if program == "hostname":
        return bool(plain)
    if program == "ifconfig":  # an interface alone shows it; anything after it (`up`, `-arp`) sets it
        return len([a for a in rest if a not in ("-a", "-s", "-v")]) > 1
    return False


def _writes(program: str, rest: list[str], where: Session) -> tuple[list[str], list[str]]:
    """What a writer writes: (files, directories it writes a tree into)."""
    w = P.WRITERS[program]
    code = P.CODE.get(program)
    values = w.values + w.into + w.options + ((code.values + code.inline + code.files) if code else ())
    if w.unless and P.has_flag(rest, w.unless):
        return [], []
    if program == "rsync" and "--server" in rest and "--sender" in rest:
        return [], []
    active = not w.when or P.has_flag(rest, w.when)
    files = P.option_value(rest, w.options) if active else []
    if w.operands is not None and active:
        plain = [a for a in P.operands(rest, values) if not _is_remote(a) or program not in ("rsync", "scp")]
        chosen = w.operands
        if chosen == slice(1, None) and (P.option_value(rest, ("--reference",)) or (
                code is not None and (P.option_value(rest, code.inline + code.files)))):
            chosen = slice(None)  # chmod --reference=F FILE…, sed -e SCRIPT FILE…: no mode or script operand
        files += plain[chosen]
    trees: list[str] = []
    if w.tree and (P.has_flag(rest, w.tree_when) if w.tree_when else not files):
        into = P.option_value(rest, w.into)
        if into or where.cwd is not None or program != "mktemp":
            trees.append(into[-1] if into else ("/tmp" if program == "mktemp" else (where.cwd or ".")))
    return [f for f in files if f not in ("-", "/dev/stdout")], trees


def classify_line(line: str, depth: int = 0, where: Session | None = None) -> list[dict[str, Any]]:
    """Every simple command of a line, classified. `cd`, `pushd` and `popd` move the
    directory later commands resolve their paths from, when it is certain: a `cd` whose
    failure would leave the old directory (not followed by `&&`), or that a subshell or
    group ends, leaves it unknown."""
    where = where or Session()
    try:
        out = []
        moved_at: int | None = None
        tokens = words(line)
        if sum(1 for t in tokens if t in P.WRAPPERS or t in RUNNERS) > MAX_WRAPPERS:
            raise Unclassifiable(f"more than {MAX_WRAPPERS} words that run the rest of a command; split the line")
        for s in simple_commands(tokens):
            if moved_at is not None and s.depth < moved_at:
                where, moved_at = where.at(None), None
            part = command(s, where, depth, None)
            out.append(part)
            where = _unanswered(where, part["writes"])
            if part["writes"] and P.LINKERS & set(part["programs"]):
                made = [w.removesuffix("/**") for w in part["writes"]]
                if "ln" in part["programs"] and where.cwd:  # `ln -s /etc/cron.d` makes ./cron.d
                    made += [posixpath.join(where.cwd, posixpath.basename(w)) for w in made]
                where = dataclasses.replace(where, linked=where.linked + tuple(made))
            if part["program"] in ("cd", "pushd", "popd") and not part.get("unidentified"):
                where = where.at(_moved(part["program"], s.argv[1:], where) if s.then == "&&" else None)
                moved_at = s.depth if s.depth else None
        return out
    except Unclassifiable as e:
        return [_blank(line, UNKNOWN, str(e))]


def _unanswered(where: Session, writes: list[str]) -> Session:
    """The session without the host's answers a write may have made untrue: the host was
    asked before the line ran, so after `cp /bin/bash ~/bin/cat` its answer that `cat` is
    /usr/bin/cat no longer holds. An answer goes when a write reaches where its word is
    looked up (the file, a directory on the way, a directory of PATH) or what it found;
    the program is then judged as if the host had not been asked."""
    if not writes or not where.programs:
        return where
    written = [w.removesuffix("/**") for w in writes]

    def touched(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in written)

    kept = {}
    for (word, cwd), answer in where.programs.items():
        places = [word] if "/" in word else [posixpath.join(d or ".", word) for d in (where.path or "").split(":")]
        if cwd is None and not all(x.startswith("/") for x in places):
            continue  # looked up from a directory the gateway does not know: any write may have reached it
        looked = [posixpath.normpath(posixpath.join(cwd or "/", x)) for x in places]
        if not any(touched(x) for x in [*looked, *answer] if x):
            kept[(word, cwd)] = answer
    return dataclasses.replace(where, programs=kept)


def _moved(program: str, rest: list[str], where: Session) -> str | None:
    """Where cd/pushd/popd leave the shell (None: the gateway cannot tell)."""
    target = P.operands(rest, ())
    if program == "popd" or (program == "pushd" and not target):
        return None
    if not target:
        return where.home
    if target[0] == "-" or target[0].startswith(("+", "-")):
        return None
    if where.cwd is None and not target[0].startswith("/"):
        return None
    return where.resolve(target[0])


def _riskier(*actions: str) -> str:
    return max(actions, key=ORDER.index)


def classify(connection: str, phase: str, line: str | None, details: dict[str, Any] | None = None,
             cwd: str | None = None, stdin: bool = False, session: Session | None = None) -> Operation:
    """The Operation for one ssh_bridge request: a session step, or a command line (an
    `exec` request or a line typed into a shell), each command of it a part. `session` is
    what the planner knows of where it runs (default: directory `cwd`, None until known, so
    relative paths are then unknown; the standard PATH; `stdin`: the client's input is the
    line's standard input, which an interpreter would run unseen)."""
    extra = dict(details or {})
    if line is None:
        return Operation(protocol="ssh", connection=connection, action=READ, resource="session", risk=RISK[READ],
                         summary=f"{phase} session on {connection}", details={"phase": phase, **extra})
    where = session or Session(cwd=cwd, stdin=stdin)
    parts = tuple(_part(connection, phase, p) for p in classify_line(line, where=where)) or (
        _part(connection, phase, _blank("", READ)),)
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
                 "sudo": any(p.details["sudo"] for p in parts),
                 "interactive": sorted({p.details["program"] for p in parts if p.details["interactive"]}),
                 "cwd": where.cwd, **extra},
        parts=parts,
    )


def _part(connection: str, phase: str, details: dict[str, Any]) -> Operation:
    action = details["action"]
    risk = 100 if details.get("unidentified") else RISK[action] + (10 if details["sudo"] and action != UNKNOWN else 0)
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
                  stdin=phase == "exec")
    return dataclasses.replace(op, payload=body)


def from_request(connection: str, request: Request) -> Operation:
    body = parse_json_body(request.content, "application/json")
    return classify_request(connection, request.method, request.target, request.header(SSH.session_header), body)
