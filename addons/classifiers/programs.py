"""What programs are, for the shell classifier: the tables a gate judges a command by.

- Where a program lives decides whether its name means anything: a name is trusted only
  as a file in a system directory (root owns them), found there by the session's PATH or
  named there by its path. `/tmp/ls`, `./cat` or `ls` with `~/bin` early in PATH could be
  anything, and are `exec` and riskiest (`identify`).
- Every program that can write files is a `Writer`: which of its operands it writes, which
  options name a written file or the directory it writes a whole tree into, and the flags
  that make it write at all (`sed -i`, `tar -x`, `xxd` with an output file).
- Interpreters and editors run code; `Code` says where they take it from: an option
  (`-c`, `-e`), a script file, or standard input, which the gate does not read as commands.
- Builtins that change what later commands run (variables, the working directory, the
  command hash, sourced files, traps, the umask) are session state: the directory is
  tracked, the rest refused.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN = "read", "write", "delete", "exec", "admin", "unknown"

SYSTEM_DIRS = frozenset("/usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin /usr/games /usr/local/games".split())
"""Directories only root can change: a program found in one is what its name says."""
STANDARD_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
"""sshd's PATH for a user session (Debian's default), when the planner knows no better."""

READS = frozenset("""
    ls cat head tail grep egrep fgrep zgrep rg wc cut tr echo printf pwd id whoami hostname uname
    uptime date df du free ps pgrep stat file which whereis type printenv locate diff cmp md5sum sha1sum
    sha256sum sha512sum basename dirname realpath readlink test [ [[ true false sleep seq yes journalctl dmesg
    lsblk lscpu lsof netstat ss ifconfig getent groups last w who jq column nl od hexdump xxd strings tac base64
    base32 zcat top : help jobs times caller wait dirs
""".split())
DELETES = frozenset("rm rmdir unlink shred".split())
ADMINS = frozenset("""
    sudo su doas pkexec runuser setpriv capsh systemctl service kill killall pkill reboot shutdown poweroff halt
    init mount umount useradd userdel usermod groupadd groupdel gpasswd adduser deluser passwd chpasswd chsh chfn
    visudo vipw crontab at batch iptables ip6tables nft ufw firewall-cmd modprobe insmod rmmod sysctl chattr setcap
    apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo go ip chroot unshare
    nsenter systemd-run hostnamectl timedatectl loginctl mkfs mkswap swapon swapoff fdisk parted sfdisk wipefs
    losetup cryptsetup tc ethtool route ldconfig update-alternatives hwclock
""".split())
PACKAGE_MANAGERS = frozenset("apt apt-get aptitude dpkg yum dnf rpm apk zypper pacman snap pip pip3 npm yarn gem cargo".split())
NETWORK = frozenset("curl wget nc ncat netcat socat ssh scp sftp ftp telnet nmap".split())
RUNNERS = frozenset("""awk gawk mawk nawk sed tar dd find sort uniq git make xargs busybox perl ruby node php lua
    python python2 python3 tclsh expect gdb dc sqlite3 script parallel watch""".split())
"""Programs whose arguments can run commands or write files (awk's system(), sed's e and w,
tar --to-command, find -exec, sort --compress-program, …): exec, whatever they are asked."""
SHELLS = frozenset("bash sh dash zsh ksh mksh fish rbash".split())
INTERACTIVE = frozenset("vi vim nvim nano emacs pico joe micro mcedit less more most man top htop atop watch tmux "
                        "screen mysql psql ftp".split())
EDITORS = frozenset("vi vim nvim ex ed emacs nano pico".split())
WRAPPERS = frozenset("""env nice nohup time timeout stdbuf ionice command builtin setsid exec taskset numactl chrt
    flock strace ltrace valgrind fakeroot faketime xvfb-run dbus-run-session unbuffer""".split())
"""They run the rest of their arguments as a command: every later word is tried as the program."""
READ_SUBCOMMANDS = {"systemctl": ("status", "show", "list-units", "is-active", "is-enabled", "cat"),
                    "apt": ("list", "show", "search", "policy"), "pip": ("list", "show", "freeze"),
                    "pip3": ("list", "show", "freeze"), "dpkg": ("-l", "-L", "-s", "--list", "--status"),
                    "ip": ("addr", "a", "address", "route", "r", "link", "l", "neigh", "n"),
                    "timedatectl": ("status", "show", "list-timezones"), "hostnamectl": ("status",),
                    "loginctl": ("list-sessions", "list-users", "show-session", "session-status")}
VALUELESS = frozenset("--no-pager --user --system --full --all --no-legend -a -l -4 -6 -br -j".split())
"""Options that take no value, so a word after one is still the subcommand (`systemctl
--no-pager status`); after any other option it may be the option's value (`systemctl -p
status restart nginx` restarts)."""
IP_CHANGES = ("add", "del", "delete", "set", "change", "replace", "flush", "exec", "netns")
CHANGING_FLAGS = {
    "date": ("-s", "--set"), "dmesg": ("-c", "-C", "-D", "-E", "-n", "--clear", "--read-clear", "--console-off",
                                       "--console-on", "--console-level"),
    "journalctl": ("--vacuum-size", "--vacuum-time", "--vacuum-files", "--rotate", "--flush", "--sync",
                   "--relinquish-var", "--setup-keys", "--update-catalog"),
    "ss": ("-K", "--kill"), "hostname": ("-F", "--file", "-b", "--boot"), "top": (),
}
"""Read-only programs that change the system with these flags: admin."""

SESSION_STATE = {
    "cd": "tracked", "pushd": "tracked", "popd": "tracked",
    "export": "variables", "declare": "variables", "typeset": "variables", "local": "variables",
    "readonly": "variables", "unset": "variables", "read": "variables", "mapfile": "variables",
    "readarray": "variables", "getopts": "variables", "let": "variables", "set": "shell options",
    "shopt": "shell options", "alias": "aliases", "unalias": "aliases", "function": "functions",
    "hash": "the command hash", "enable": "builtins", "source": "sourced code", ".": "sourced code",
    "trap": "traps", "umask": "the file mode mask", "ulimit": "limits", "bind": "key bindings",
    "complete": "completions", "compopt": "completions", "history": "history", "fc": "history",
}
"""Builtins that change what later commands run. The directory is tracked; everything else
is refused, because the gate decides each line on what it says (printf -v and umask with
an argument count too; see `session_change`)."""
BUILTINS = frozenset(SESSION_STATE) | frozenset(
    ": [ [[ test true false echo printf pwd type help jobs times caller wait dirs exit logout return break "
    "continue shift eval exec command builtin kill bg fg disown suspend".split())
"""Bash builtins: found before any PATH lookup, so their names need no resolving."""
RISKY_VARIABLES = ("PATH", "LD_", "BASH_ENV", "ENV", "IFS", "PROMPT_COMMAND", "CDPATH", "SHELLOPTS", "BASHOPTS",
                   "GLOBIGNORE", "BASH_", "PS4", "HOME", "PYTHON", "PERL5", "RUBY", "NODE_", "GCONV_PATH", "LESS",
                   "PAGER", "EDITOR", "VISUAL", "GIT_", "TMPDIR", "SYSTEMD_", "MANPAGER", "XDG_", "EXECIGNORE",
                   "SHELL")
"""Variables that change which program runs or what it loads: setting them is admin."""
LINKERS = frozenset("ln cp mv tar bsdtar unzip cpio rsync git patch 7z 7za busybox".split())
"""Programs that can leave a symlink where they write (ln -s; cp -r and mv carry links;
archives, checkouts and patches hold them)."""
PLAIN_VARIABLES = ("LANG", "LANGUAGE", "LC_", "TZ", "COLUMNS", "LINES", "NO_COLOR", "CLICOLOR", "TERM", "TIME_STYLE",
                   "LS_COLORS", "GREP_COLORS")
"""Variables a program only formats its output by. Any other in a command's environment
may name what it runs (zgrep evals $GREP, many programs run $PAGER-like helpers): exec."""
STDIN_NAMES = ("-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")


@dataclass(frozen=True)
class Writer:
    """How a program names what it writes.

    `operands`: which operands (words that are not options) are written, as a slice;
    `options`: options whose value is a written file (`-o F`, `--output=F`, `of=F`);
    `values`: options that take a value, so that value is no operand; `when`: the operands
    are written only with one of these flags; `unless`: never with one of these;
    `tree`: the program writes a tree of names it reads from somewhere the gate cannot see
    (an archive, a patch, the network), into the directory an `into` option names or the
    working directory; `tree_when`: only with one of these flags."""

    operands: slice | None = slice(None)
    options: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    when: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    tree: bool = False
    tree_when: tuple[str, ...] = ()
    into: tuple[str, ...] = ()


ALL = slice(None)
NONE = None
COMPRESSORS = Writer(ALL, unless=("-c", "--stdout", "--to-stdout", "-l", "--list", "-t", "--test", "-h", "--help"))
WRITERS: dict[str, Writer] = {
    "cp": Writer(ALL, options=("-t", "--target-directory"), values=("-S", "--suffix")),
    "mv": Writer(ALL, options=("-t", "--target-directory"), values=("-S", "--suffix")),
    "install": Writer(ALL, options=("-t", "--target-directory"), values=("-m", "--mode", "-o", "--owner", "-g",
                                                                          "--group", "-S", "--suffix")),
    "ln": Writer(ALL, options=("-t", "--target-directory"), values=("-S", "--suffix")),
    "link": Writer(ALL),
    "mkdir": Writer(ALL, values=("-m", "--mode", "-Z", "--context")),
    "touch": Writer(ALL, values=("-d", "--date", "-t", "-r", "--reference")),
    "truncate": Writer(ALL, values=("-s", "--size", "-r", "--reference")),
    "tee": Writer(ALL),
    "sponge": Writer(ALL),
    "mkfifo": Writer(ALL, values=("-m", "--mode")),
    "mknod": Writer(slice(0, 1), values=("-m", "--mode")),
    "fallocate": Writer(ALL, values=("-l", "--length", "-o", "--offset")),
    "mktemp": Writer(NONE, options=("-p", "--tmpdir"), tree=True),
    "chmod": Writer(slice(1, None)),  # the mode first (see `written_operands` for --reference)
    "chown": Writer(slice(1, None)),
    "chgrp": Writer(slice(1, None)),
    "setfacl": Writer(slice(1, None), values=("-M", "--modify-file", "-X", "--remove-file")),
    "setfattr": Writer(ALL, values=("-n", "--name", "-v", "--value", "-x", "--remove", "--restore")),
    "dos2unix": Writer(ALL),
    "unix2dos": Writer(ALL),
    "rsync": Writer(slice(-1, None), values=("-e", "--rsh", "--rsync-path", "--exclude", "--include", "--filter",
                                             "-f", "--files-from", "--exclude-from", "--include-from", "--port",
                                             "--timeout", "--chmod", "--log-file-format", "-M", "--remote-option")),
    "scp": Writer(slice(-1, None), unless=("-f",), values=("-c", "-F", "-i", "-J", "-l", "-o", "-P", "-S", "-D", "-X")),
    "patch": Writer(slice(0, 1), options=("-o", "--output", "-r", "--reject-file", "-B", "--prefix"),
                    values=("-p", "--strip", "-i", "--input", "-F", "--fuzz", "-z", "--suffix", "-V", "-D", "--ifdef"),
                    tree=True, into=("-d", "--directory")),
    "tar": Writer(NONE, options=("-f", "--file"), when=("-c", "--create", "-r", "--append", "-u", "--update", "-A",
                                                       "--catenate", "--concatenate", "--delete"),
                  values=("-C", "--directory", "-b", "--blocking-factor", "-T", "--files-from", "-X",
                          "--exclude-from", "-H", "--format", "-I", "--use-compress-program", "-K", "-N", "-V"),
                  tree=True, tree_when=("-x", "--extract", "--get"), into=("-C", "--directory")),
    "cpio": Writer(NONE, options=("-O", "-F", "--file"), values=("-H", "--format", "-E", "--pattern-file"),
                   tree=True, tree_when=("-i", "--extract", "-p", "--pass-through"), into=("-D", "--directory")),
    "unzip": Writer(NONE, values=("-x", "-P"), tree=True, into=("-d",)),
    "zip": Writer(slice(0, 1), values=("-b", "-n", "-t", "-tt", "-P", "-x", "-i")),
    "gzip": COMPRESSORS, "gunzip": COMPRESSORS, "bzip2": COMPRESSORS, "bunzip2": COMPRESSORS, "xz": COMPRESSORS,
    "unxz": COMPRESSORS, "zstd": Writer(ALL, options=("-o",), unless=COMPRESSORS.unless), "lz4": COMPRESSORS,
    "uncompress": COMPRESSORS, "compress": COMPRESSORS,
    "dd": Writer(NONE, options=("of=",)),
    "sort": Writer(NONE, options=("-o", "--output"), values=("-k", "--key", "-t", "--field-separator", "-S",
                                                             "--buffer-size", "-T", "--temporary-directory",
                                                             "--compress-program", "--parallel", "--files0-from")),
    "shuf": Writer(NONE, options=("-o", "--output")),
    "uniq": Writer(slice(1, 2), values=("-f", "--skip-fields", "-s", "--skip-chars", "-w", "--check-chars")),
    "xxd": Writer(slice(1, 2), values=("-c", "-cols", "-g", "-groupsize", "-l", "-len", "-o", "-offset", "-s",
                                       "-seek", "-n", "-name")),
    "base64": Writer(NONE, options=("-o", "--output"), values=("-w", "--wrap")),
    "base32": Writer(NONE, options=("-o", "--output"), values=("-w", "--wrap")),
    "iconv": Writer(NONE, options=("-o", "--output"), values=("-f", "--from-code", "-t", "--to-code")),
    "sdiff": Writer(NONE, options=("-o", "--output")),
    "split": Writer(slice(1, 2), values=("-a", "-b", "-C", "-l", "-n", "-t", "--additional-suffix", "--filter")),
    "csplit": Writer(NONE, options=("-f", "--prefix"), values=("-b", "--suffix-format", "-n", "--digits"), tree=True),
    "sed": Writer(slice(1, None), when=("-i", "--in-place"), values=("-l", "--line-length")),
    "perl": Writer(slice(1, None), when=("-i",)),
    "ruby": Writer(slice(1, None), when=("-i",)),
    "gawk": Writer(slice(1, None), when=("inplace",)),
    "awk": Writer(slice(1, None), when=("inplace",)),
    "find": Writer(NONE, options=("-fprint", "-fprint0", "-fprintf", "-fls")),
    "curl": Writer(NONE, options=("-o", "--output", "-D", "--dump-header", "-c", "--cookie-jar", "--trace",
                                  "--trace-ascii", "--stderr", "--etag-save", "--libcurl", "--hsts", "--alt-svc"),
                   tree=True, tree_when=("-O", "--remote-name", "--remote-name-all", "-J"), into=("--output-dir",)),
    "wget": Writer(NONE, options=("-O", "--output-document", "-o", "--output-file", "-a", "--append-output"),
                   tree=True, into=("-P", "--directory-prefix")),
    "gpg": Writer(NONE, options=("-o", "--output")),
    "openssl": Writer(NONE, options=("-out", "-keyout")),
    "script": Writer(slice(0, 1), values=("-c", "--command", "-T", "--log-timing", "-E", "--echo")),
    "git": Writer(NONE, tree=True, into=("-C",)),
    "make": Writer(NONE, tree=True, into=("-C", "--directory")),
    "file": Writer(NONE, tree=True, tree_when=("-C", "--compile")),
    "ssh-keygen": Writer(NONE, options=("-f",)),
    "vi": Writer(ALL), "vim": Writer(ALL), "nvim": Writer(ALL), "ex": Writer(ALL), "ed": Writer(slice(0, 1)),
    "emacs": Writer(ALL, values=("-l", "--load", "--eval", "-f", "--funcall")),
}
"""What each program writes. A program not listed here writes nothing but its redirections."""


@dataclass(frozen=True)
class Code:
    """Where an interpreter or editor takes the code it runs from: `inline` options carry
    it on the line (`-c CODE`); `operand`: the first operand is code (awk, sed) or a script
    file (python, bash); `files`: options naming a script file; `stdin`: flags that make it
    read code from standard input; `always_stdin`: it reads commands from standard input
    unless an inline option is given (editors, ed, gdb, dc)."""

    inline: tuple[str, ...] = ()
    operand: str = "script"  # "script" | "code" | "none"
    files: tuple[str, ...] = ()
    stdin: tuple[str, ...] = ()
    always_stdin: bool = False
    values: tuple[str, ...] = ()


SHELL_CODE = Code(inline=("-c",), stdin=("-s", "-i"), values=("-o", "+o", "-O", "+O", "--rcfile", "--init-file"))
CODE: dict[str, Code] = {
    **{s: SHELL_CODE for s in SHELLS},
    "python": Code(inline=("-c", "-m"), values=("-W", "-X", "-Q")),
    "python2": Code(inline=("-c", "-m"), values=("-W", "-X", "-Q")),
    "python3": Code(inline=("-c", "-m"), values=("-W", "-X")),
    "perl": Code(inline=("-e", "-E"), values=("-I", "-M", "-m", "-x", "-C", "-0", "-l")),
    "ruby": Code(inline=("-e",), values=("-I", "-r", "-C", "-E", "-x")),
    "node": Code(inline=("-e", "--eval", "-p", "--print"), values=("-r", "--require", "--import")),
    "php": Code(inline=("-r", "-B", "-R", "-E"), files=("-f", "-F"), values=("-c", "-d", "-z")),
    "lua": Code(inline=("-e",), values=("-l",)),
    "tclsh": Code(), "expect": Code(inline=("-c",), files=("-f",)),
    "awk": Code(inline=(), operand="code", files=("-f", "--file", "-E", "--exec"), values=("-v", "--assign", "-F",
                                                                                           "--field-separator", "-i",
                                                                                           "--include", "-l", "--load")),
    "sed": Code(inline=("-e", "--expression"), operand="code", files=("-f", "--file"), values=("-l", "--line-length")),
    "gdb": Code(inline=("-ex", "--eval-command"), files=("-x", "--command"), always_stdin=True, operand="none"),
    "dc": Code(inline=("-e", "--expression"), files=("-f", "--file")),
    "sqlite3": Code(operand="none", always_stdin=True, inline=("-cmd",)),
    "ed": Code(operand="none", always_stdin=True),
    "ex": Code(inline=("-c", "--cmd"), operand="none", always_stdin=True, files=("-S", "-s")),
    "vi": Code(inline=("-c", "--cmd"), operand="none", always_stdin=True, files=("-S",)),
    "vim": Code(inline=("-c", "--cmd"), operand="none", always_stdin=True, files=("-S",)),
    "nvim": Code(inline=("-c", "--cmd"), operand="none", always_stdin=True, files=("-S",)),
    "emacs": Code(inline=("--eval", "-f", "--funcall"), operand="none", files=("-l", "--load", "--script")),
}
for _alias in ("gawk", "mawk", "nawk"):
    CODE[_alias] = CODE["awk"]


def option_value(args: list[str], names: tuple[str, ...]) -> list[str]:
    """Values of the options `names` in their spellings: `-o F`, `-oF`, `--output F`,
    `--output=F`, and `key=F` for a name ending in `=` (dd)."""
    out = []
    for n, a in enumerate(args):
        for name in names:
            if name.endswith("="):
                if a.startswith(name) and len(a) > len(name):
                    out.append(a[len(name):])
            elif a == name and n + 1 < len(args):
                out.append(args[n + 1])
            elif name.startswith("--") and a.startswith(name + "="):
                out.append(a[len(name) + 1:])
            elif len(name) == 2 and name[0] == "-" and a.startswith(name) and len(a) > 2 and not a.startswith("--"):
                out.append(a[2:])
            elif (len(name) == 2 and name[0] == "-" and n + 1 < len(args) and a[1:].isalpha()
                  and (a.startswith("-") and not a.startswith("--") or n == 0) and a.endswith(name[1])):
                out.append(args[n + 1])  # the last of a bundle takes the next word: tar -czf out.tgz, tar cf x
    return out


def has_flag(args: list[str], flags: tuple[str, ...]) -> bool:
    """Is any of `flags` given, long (`--x`, `--x=v`, or abbreviated as GNU getopt_long allows:
    `--vacuum-ti`), short alone or in a bundle (`-ni` for -i), or as a bare word (tar's
    `xf`, gawk's `-i inplace`)?"""
    for n, a in enumerate(args):
        if a == "--":
            break
        name = a.split("=", 1)[0]
        for f in flags:
            if a == f or (f.startswith("--") and name.startswith("--") and len(name) > 2 and f.startswith(name)):
                return True  # getopt_long takes any unambiguous prefix: `date --se=…` is --set
            short = len(f) == 2 and f[0] == "-"
            if short and a.startswith("-") and not a.startswith("--") and f[1] in a[1:]:
                return True
            if short and n == 0 and a.isalpha() and f[1] in a:
                return True  # tar's old style: the first word is a bundle of flags
    return False


def operands(args: list[str], values: tuple[str, ...]) -> list[str]:
    """The words that are not options, nor the values of options in `values`."""
    out, skip, ended = [], False, False
    for a in args:
        if skip:
            skip = False
        elif ended or a == "-" or not a.startswith("-"):
            out.append(a)
        elif a == "--":
            ended = True
        elif a in values:
            skip = True
    return out


SHOWN_BY = {"set": ("-o", "+o"), "umask": ("-S", "-p"), "ulimit": ("-S", "-H", "-a"), "trap": ("-l", "-p"),
            "hash": ("-l",), "history": ()}
"""The options with which each of these builtins only shows its state (`set -o`); any other
argument changes it (`set -a` exports every later assignment)."""
FLAG_BUILTINS = frozenset({"printf", "wait", "jobs", *SHOWN_BY})
"""Builtins whose leading options decide whether they change the session or run a command."""
EXPANDS = frozenset("$`{}*?[~")


def hidden_flags(program: str, args: list[str]) -> str:
    """A word the shell would expand into what decides what `program` does, or "": any word
    of an external program whose flags change it (GNU options go anywhere), of `test`
    (positional: `test $x` may become `-v 'a[PATH=7]'`), and the leading words of the
    builtins that read options first. `{-v,PATH}`, `$x`, `-?` are flags only once expanded."""
    if program in CHANGING_FLAGS or program in READ_SUBCOMMANDS or program in ("test", "ifconfig", "rg"):
        return next((a for a in args if EXPANDS & set(a)), "")
    if program in FLAG_BUILTINS:
        for a in args:
            if EXPANDS & set(a):
                return a
            if a == "--" or not a.startswith(("-", "+")):
                return ""
    return ""


def session_change(program: str, args: list[str]) -> str:
    """What a builtin changes that later commands depend on ("" for nothing)."""
    if program == "printf":
        return "variables" if any(a == "-v" or (a.startswith("-v") and len(a) > 2) for a in args) else ""
    if program == "wait":  # -p NAME: the job's id into a variable (PATH, say)
        return "variables" if any(a.startswith("-") and "p" in a for a in options(args)) else ""
    if program == "test":  # -v 'x[PATH=7]': the subscript is arithmetic, and arithmetic assigns
        return "variables" if any("[" in a for a in args) and any(a in ("-v", "-R") for a in args) else ""
    if program in SHOWN_BY:
        shows = not args or all(a in SHOWN_BY[program] for a in args)
        return "" if shows else SESSION_STATE[program]
    return SESSION_STATE.get(program, "")


def options(args: list[str]) -> list[str]:
    """A builtin's option words: those before `--` or its first operand."""
    out = []
    for a in args:
        if a == "--" or not a.startswith("-") or a == "-":
            break
        out.append(a)
    return out


@dataclass(frozen=True)
class Identity:
    """A program word resolved: `name` is what the tables know it by, or "" when the gate
    cannot tell what will run (then `why` says so)."""

    name: str
    why: str = ""


def identify(word: str, cwd: str | None, path: str | None,
             resolved: dict[tuple[str, str | None], tuple[str, str]] | None = None) -> Identity:
    """What the shell will run for `word`, named the way the tables know it.

    A name with a slash is that file: trusted when it is in a system directory. A bare name
    is a builtin, or the first match on PATH: trusted only when every directory of the
    session's PATH is a system directory. When the planner asked the host, `resolved` maps
    the word, named from `cwd`, to where the shell finds it (its directory's symlinks
    resolved) and the file it really is, and that answer decides.
    """
    answer = (resolved or {}).get((word, cwd), ("", ""))
    if "/" not in word:
        if word in BUILTINS:
            return Identity(word)
        if answer[0]:
            return _by_location(word, *answer)
        if path is None:  # not found on the host (then nothing runs), or not asked: by the PATH
            return Identity("", f"the session's PATH is unknown, so {word!r} could be any program")
        outside = _outside(path)
        if outside:
            return Identity("", f"the session's PATH includes {outside[0] or '.'!r}, so {word!r} could be any program")
        return Identity(word)
    if not word.startswith("/") and cwd is None:
        return Identity("", f"{word!r} is relative to a directory the gateway does not know")
    full = word if word.startswith("/") else posixpath.join(cwd, word)
    if answer[0]:
        return _by_location(word, *answer)
    parts = full.split("/")
    if ".." in parts or "." in parts[1:-1] or posixpath.dirname(posixpath.normpath(full)) not in SYSTEM_DIRS:
        return Identity("", f"{word} is not in a system directory, so the gateway cannot tell what it is")
    return Identity(posixpath.basename(full))


def lexically_system(path: str) -> bool:
    """Every directory of a PATH is, as written, a system directory."""
    return not _outside(path)


def _outside(path: str) -> list[str]:
    """The directories of a PATH not written as a system directory (a trailing slash aside):
    not normalised, since `/home/u/l/../../usr/bin` is wherever the link `l` points when
    the shell looks, and the empty entry is the working directory."""
    return [d for d in path.split(":") if (d.rstrip("/") or d) not in SYSTEM_DIRS]


def _by_location(word: str, location: str, real: str) -> Identity:
    """Named by where the host found it: a name in a system directory keeps the name it was
    called by (root chose it: /usr/bin/awk -> mawk is awk); a file anywhere else is named by
    what it really is when that is a system file (/tmp/l/cat -> /usr/bin/bash is bash)."""
    if posixpath.dirname(location) in SYSTEM_DIRS:
        return Identity(posixpath.basename(location))
    if real and posixpath.dirname(real) in SYSTEM_DIRS:
        return Identity(posixpath.basename(real))
    return Identity("", f"{word} is {real or location}, not in a system directory, so the gateway cannot tell "
                        "what it is")
