"""The real host, over SSH with the key only the gateway holds.

asyncssh hangs during authentication on an event loop with an eager task factory, which
mitmproxy installs; so every asyncssh call runs on an event loop of its own, in a thread
(`Loop`), and the gateway's loop awaits the results. The host key is pinned by the
connection's known_hosts: an unknown or changed key fails the connection, never learned.

A session holds one connection to the host, and on it:

- its shell: one persistent `bash` whose every line is run as `eval '<line>' </dev/null`,
  followed by markers that carry the exit status, the physical working directory and
  PATH, so `cd` persists while each line is governed on its own and no command can read
  what comes after it. The shell traps SIGINT, so an interrupt stops the line, not it.
- its probe: a second `bash` the planner asks, before a line is decided, where the
  programs it names are and what the paths it names really are (symlinks followed), in
  the directory the line runs in. Nothing the agent sends runs in it.
"""

from __future__ import annotations

import asyncio
import posixpath
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from addons.classifiers import programs as P
from addons.engine.config import Connection

SHELL = "exec bash --noprofile --norc"
SHELL_SETUP = b"trap : INT\n"
PAGERS = "export PAGER=cat SYSTEMD_PAGER=cat GIT_PAGER=cat MANPAGER=cat LESSSECURE=1; "
"""Put before a command given a terminal: programs that would page their output (systemctl,
git, man) print it instead, and a pager that still runs cannot run commands."""


class HostError(Exception):
    """The host could not be reached or refused us; the message says why."""


class Loop:
    """An event loop in a thread of its own, for asyncssh."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="custody-ssh", daemon=True)
        self.thread.start()

    async def run(self, coro) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def quote(word: str) -> str:
    return "'" + word.replace("'", "'\"'\"'") + "'"


@dataclass
class Host:
    """One connection to the real host (lives on the `Loop`)."""

    conn: asyncssh.SSHClientConnection
    home: str | None = None
    path: str | None = None
    """The PATH commands run with (exec commands and the shell alike: sshd's, then the
    user's shell startup)."""
    shell: asyncssh.SSHClientProcess | None = None
    cwd: str | None = None
    shell_path: str | None = None
    """The PATH the shell last reported (its lines cannot change it, but it is read, not assumed)."""
    system_paths: set[str] = field(default_factory=set)
    """PATHs whose every directory is, symlinks followed, a system directory (asked at
    connect): a program word found on one is what its name says (`system_path`)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    probe: asyncssh.SSHClientProcess | None = None
    probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def connect(cls, c: Connection) -> Host:
        try:
            key = asyncssh.import_private_key(c.credential.value)
            conn = await asyncio.wait_for(asyncssh.connect(
                c.upstream.host, c.upstream.port, username=c.upstream.database, client_keys=[key],
                known_hosts=c.known_hosts, agent_path=None, agent_forwarding=False, x11_forwarding=False,
                password=None, kbdint_auth=False, config=None), 20)
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostError(f"the host key of {c.upstream.host}:{c.upstream.port} does not match known_hosts "
                            f"({e.reason}); refusing to connect") from None
        except (OSError, asyncssh.Error, TimeoutError, ValueError) as e:
            raise HostError(f"cannot reach {c.upstream.host}:{c.upstream.port}: {getattr(e, 'reason', '') or e}") from None
        host = cls(conn)
        home, path = (await host.ask("printf '%s\\0%s\\0' \"$(pwd -P)\" \"$PATH\"") + ["", ""])[:2]
        host.home, host.path = home or None, path or None  # where exec commands start, and their PATH
        if host.path is not None and P.lexically_system(host.path):
            if all_system(await host.ask(physical_dirs_script(host.path)), host.path):
                host.system_paths.add(host.path)
        return host

    def system_path(self, path: str | None) -> bool:
        """Whether `path` is one of this host's all-system PATHs."""
        return path is not None and path in self.system_paths

    async def process(self, command: str, terminal: dict | None) -> asyncssh.SSHClientProcess:
        """A command of its own (an exec), with a terminal when the client asked for one."""
        if terminal is None:
            return await self.conn.create_process(command, encoding=None)
        return await self.conn.create_process(
            PAGERS + command, encoding=None, term_type=str(terminal.get("term") or "xterm"),
            term_size=(int(terminal.get("cols") or 80), int(terminal.get("rows") or 24)))

    async def line_shell(self) -> asyncssh.SSHClientProcess:
        """The session's persistent shell, started (in the login directory) when needed."""
        if self.shell is None:
            self.shell = await self.conn.create_process(SHELL, encoding=None)
            self.shell.stdin.write(SHELL_SETUP)
            self.cwd, self.shell_path = self.home, self.path
        return self.shell

    def shell_lost(self) -> None:
        """The shell ended or was stopped: its directory is gone with it."""
        if self.shell is not None:
            self.shell.close()
        self.shell, self.cwd, self.shell_path = None, None, None

    async def resolve(self, cwd: str | None, path: str | None, paths: list[str], programs: list[tuple[str, str | None]]
                      ) -> tuple[dict[str, str], dict[tuple[str, str | None], tuple[str, str]]]:
        """What the paths really are (`realpath -m`: symlinks followed, missing parts kept) and
        where the shell finds each program word (its directory resolved) and what file it
        really is; answers the host could not give are left out. One round trip; per program
        two subshells and one `realpath`, since every process the host starts is on the
        critical path of the line."""
        return parse_resolved(await self.ask(resolve_script(cwd, path, paths, programs)), programs)

    async def ask(self, script: str) -> list[str]:
        """Run `script` in a subshell of the probe shell (started with the connection: the
        one session a login costs on the host); its output, split at NULs."""
        mark = secrets.token_hex(8)
        async with self.probe_lock:
            if self.probe is None:
                self.probe = await self.conn.create_process(SHELL, encoding=None)
            self.probe.stdin.write(f"( {script}\n) 2>/dev/null </dev/null; printf '{mark}\\0'\n".encode())
            data = bytearray()
            while not data.endswith(f"{mark}\0".encode()):
                chunk = await self.probe.stdout.read(65536)
                if not chunk:
                    self.probe = None
                    raise HostError("the host's probe shell ended")
                data += chunk
        return bytes(data[:-len(mark) - 1]).decode(errors="surrogateescape").split("\0")

    def close(self) -> None:
        self.conn.close()


def resolve_script(cwd: str | None, path: str | None, paths: list[str], programs: list[tuple[str, str | None]]) -> str:
    """The probe's script for `Host.resolve`: per path `P`, the path, its real path; per
    program `X`, the word, the file the shell would run (`type -P`, or the word itself when
    it has a slash, from the directory it runs in), that file's directory with symlinks
    followed (`cd -P`, as the shell's own `cd` resolves it) and the file's real path; three
    empty fields where there is no such file. dirname and basename are done in bash (`_d`) and here,
    not by starting programs."""
    lines = [_DIRNAME, *([f"cd -- {quote(cwd)} 2>/dev/null || cd /"] if cwd else []),
             *([f"PATH={quote(path)}"] if path is not None else [])]  # the line's PATH, not the probe's
    for p in paths:
        lines.append(f"printf 'P\\0%s\\0' {quote(p)}; {REALPATH} -mz -- {quote(p)} || printf '\\0'")
    for word, where in programs:
        found = f"$(type -P -- {quote(word)})" if "/" not in word else quote(word)
        answer = (f"f={found}; printf 'X\\0%s\\0' {quote(word)}; if [ -n \"$f\" ] && [ -e \"$f\" ]; then "
                  "_d \"$f\"; printf '%s\\0%s\\0' \"$f\" \"$(cd -P -- \"$d\" && pwd -P)\"; "
                  f"{REALPATH} -z -- \"$f\" || printf '\\0'; else printf '\\0\\0\\0'; fi")
        if where and ("/" in word or where != cwd):  # from its own directory (a relative word, or PATH
            # entry, means another file there), in a subshell; no answer where that directory is gone
            answer = (f"( if cd -- {quote(where)} 2>/dev/null; then {answer}; "
                      f"else printf 'X\\0%s\\0\\0\\0\\0' {quote(word)}; fi )")
        lines.append(answer)
    return "\n".join(lines)


REALPATH = "command -p realpath"
"""realpath from the system's standard PATH: one found on the session's PATH could be the
agent's own, answering whatever it likes."""


def physical_dirs_script(path: str) -> str:
    """Each directory of `path`, symlinks followed (empty where it does not exist)."""
    return "; ".join(f"printf '%s\\0' \"$(cd -P -- {quote(d)} 2>/dev/null && pwd -P)\"" for d in path.split(":"))


def all_system(fields: list[str], path: str) -> bool:
    """`physical_dirs_script`'s answer: one directory per entry of `path`, each a system one."""
    dirs = fields[:-1] if fields[-1:] == [""] else fields
    return len(dirs) == len(path.split(":")) and all(posixpath.normpath(d or ".") in P.SYSTEM_DIRS for d in dirs)


_DIRNAME = ("_d() { d=$1; [[ $d == *[!/]* ]] || { d=/; return; }; d=${d%${d##*[!/]}}; "
            "[[ $d == */* ]] || { d=.; return; }; d=${d%/*}; [[ $d == *[!/]* ]] && d=${d%${d##*[!/]}}; d=${d:-/}; }")
"""`dirname` in bash: trailing slashes, then the last component, then the slashes before it."""


def parse_resolved(fields: list[str], programs: list[tuple[str, str | None]]
                   ) -> tuple[dict[str, str], dict[tuple[str, str | None], tuple[str, str]]]:
    """`resolve_script`'s answer for `programs` (the words and directories it was asked
    about, in order): a program is `(physical directory + its name, real path)`, or
    `("", "")` where the host has no such file, keyed as it was asked, by word and
    directory (`./tool` is another file in another directory). Answers stop at the first
    record that is not what was asked."""
    real: dict[str, str] = {}
    found: dict[tuple[str, str | None], tuple[str, str]] = {}
    i, asked = 0, iter(programs)
    while i + 1 < len(fields) and fields[i] in ("P", "X"):
        if fields[i] == "P" and i + 2 < len(fields):
            if fields[i + 2]:
                real[fields[i + 1]] = fields[i + 2]
            i += 3
        elif fields[i] == "X" and i + 4 < len(fields):
            word, file, directory, target = fields[i + 1:i + 5]
            key = next(asked, None)
            if key is None or key[0] != word:
                break
            found[key] = (f"{directory.removesuffix('/')}/{basename(file)}", target) if file else ("", "")
            i += 5
        else:
            break
    return real, found


def basename(path: str) -> str:
    """coreutils' `basename`: the last component, trailing slashes dropped; `/` for `/`."""
    stripped = path.rstrip("/")
    return stripped.rpartition("/")[2] if stripped else ("/" if path else "")


def line_script(line: str, mark: str) -> bytes:
    """What the session's shell is sent for one line: the line, then the markers (on
    stdout: exit status, physical directory and PATH; on stderr: the mark alone)."""
    return (f"eval {quote(line)} </dev/null\n"
            f"printf '\\n%s %d %s\\0%s\\n' {mark} $? \"$(pwd -P)\" \"$PATH\"\nprintf '%s\\n' {mark} >&2\n").encode()


def line_status(tail: bytes) -> tuple[int, str | None, str | None]:
    """(exit status, directory, PATH) from what follows the mark on stdout."""
    status, _, rest = tail.decode(errors="replace").partition(" ")
    cwd, _, path = rest.partition("\0")
    return int(status or 0), cwd or None, path or None
