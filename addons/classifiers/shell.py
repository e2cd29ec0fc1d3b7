"""Shell words: a command line split the way bash splits it, into simple commands.

A line is split into words (POSIX quoting: quotes and backslashes make words, never
operators) and at the operators bash runs commands at (`;`, `&&`, `||`, `&`, `|`,
parentheses). Each simple command keeps its words, its redirections, where its standard
input comes from (a pipe, or its compound command's redirection), how deep in compound
commands it is and the operator after it.
What a line-based gate cannot see raises Unclassifiable: a newline (several lines), command
substitution, unbalanced quotes, a redirection without a target, a function definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SEPARATORS = (";", "&&", "||", "&", "|", "|&", ";;", "(", ")", ";&", ";;&")
PIPES = ("|", "|&")
REDIRECTS = (">", ">>", ">|", "<", "<<", "<<<", "&>", "&>>", "<>", ">&", "<&")
STDIN_REDIRECTS = ("<", "<<", "<<<", "<&", "<>")
OPENERS = frozenset("{ ( if while until for case select".split())
CLOSERS = frozenset("} ) fi done esac".split())
KEYWORDS = frozenset("! then else elif do in time coproc".split()) | OPENERS | CLOSERS
"""Reserved words: at the start of a command they are syntax, not a program. A compound
command (a group, a loop, an if) shares the standard input it is given (`{ bash; } <<< x`,
`echo x | (cat; bash)`, `for …; done < f`) with every command inside it."""


class Unclassifiable(ValueError):
    """The gate cannot see what this line runs."""


@dataclass
class Simple:
    """One simple command: its words, its redirections (operator, target), and where its
    standard input comes from when it does not redirect it itself: a pipe, or the
    redirection of a compound command around it."""

    argv: list[str] = field(default_factory=list)
    redirects: list[tuple[str, str]] = field(default_factory=list)
    piped: bool = False
    group_stdin: tuple[str, str] | None = None
    depth: int = 0
    """How many compound commands (groups, subshells, loops) it is inside."""
    then: str = ""
    """The operator after it (`&&`, `;`, `|`, …; "" at the end of the line or of a group)."""

    def stdin(self) -> tuple[str, str] | None:
        """The redirection its standard input comes from (its own last one, else its group's)."""
        found = [(op, t) for op, t in self.redirects if op in STDIN_REDIRECTS]
        return found[-1] if found else self.group_stdin


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


class Op(str):
    """An operator the shell acts on (`;`, `&&`, `|`, `>`, `(`, …): never a quoted word."""


class Quoted(str):
    """A word written with quotes or backslashes: never a reserved word such as `{` or `fi`."""


OPERATORS = sorted((";;&", ";;", ";&", "&&", "||", "|&", "<<<", "<<", ">>", "&>>", "&>", "<&", ">&", "<>", ">|",
                    "(", ")", ";", "&", "|", "<", ">"), key=len, reverse=True)
OPERATOR_CHARS = set(";&|<>()")
PLAIN_EXPANSION = re.compile(r"\$\{#?(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-])(?=\}|:?[-+?]|[#%/^,])")
"""A `${…}` that only reads a variable: its value, its length, a default (`:-`), or a
pattern taken off it. Anything else can run code or change the session: a subscript and a
substring offset are arithmetic (`${x[PATH=7]}` assigns PATH), `=` and `:=` assign, `!`
reads a variable named by a value, and `@P` expands a value as a prompt, command
substitution included."""


QUOTES_IN_EXPANSION = set("'\"\\")


def _expansion_texts(line: str) -> str:
    """What each `${` is followed by up to its `}` (to the end of the line when none): inside
    it bash pairs quotes on its own terms, even within double quotes."""
    out, at = [], line.find("${")
    while at != -1:
        end = line.find("}", at)
        out.append(line[at + 2:] if end == -1 else line[at + 2:end])
        at = line.find("${", at + 2)
    return "".join(out)


def words(line: str) -> list[str]:
    """Shell words (str, or Quoted) and operators (Op), as bash splits them; Unclassifiable
    for what a line-based gate cannot see."""
    if any(ch in line for ch in "\n\r\0"):
        raise Unclassifiable("a line with a newline is several lines: send one command line at a time")
    line = strip_comment(line)
    if "`" in line or "$(" in line or "<(" in line or ">(" in line or "$[" in line:
        raise Unclassifiable("command substitution runs commands the gateway cannot see")
    if "$'" in line or '$"' in line:
        raise Unclassifiable("$'…' and $\"…\" quoting reads escapes and translations the gateway does not; "
                             "write the characters out in plain quotes")
    if any(ch in QUOTES_IN_EXPANSION for ch in _expansion_texts(line)):
        raise Unclassifiable("quotes or a backslash inside ${…} pair up differently there; write the value out")
    if line.count("${") != len(PLAIN_EXPANSION.findall(line)):
        raise Unclassifiable("a ${…} expansion other than a variable's value, length, default or pattern "
                             "(subscripts and offsets are arithmetic, = assigns, ! and @ expand values as code); "
                             "write the value out")
    out: list[str] = []
    word, quoted, started = [], False, False
    i, n = 0, len(line)

    def end_word() -> None:
        nonlocal word, quoted, started
        if started:
            text = "".join(word)
            out.append(Quoted(text) if quoted else text)
        word, quoted, started = [], False, False

    while i < n:
        ch = line[i]
        if ch in " \t":
            end_word()
            i += 1
        elif ch == "\\":
            if i + 1 >= n:
                raise Unclassifiable("the line does not parse: a backslash at its end")
            word.append(line[i + 1])
            quoted = started = True
            i += 2
        elif ch == "'":
            close = line.find("'", i + 1)
            if close < 0:
                raise Unclassifiable("the line does not parse: No closing quotation")
            word.append(line[i + 1:close])
            quoted = started = True
            i = close + 1
        elif ch == '"':
            i += 1
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n and line[i + 1] in '$`"\\':
                    i += 1
                word.append(line[i])
                i += 1
            if i >= n:
                raise Unclassifiable("the line does not parse: No closing quotation")
            quoted = started = True
            i += 1
        elif ch in OPERATOR_CHARS:
            op = next(o for o in OPERATORS if line.startswith(o, i))
            if op[0] in "<>" and started and not quoted:
                text = "".join(word)
                if text.isdigit():
                    word, started = [], False  # 2> file: the number is the descriptor
                elif text.startswith("{") and text.endswith("}"):
                    raise Unclassifiable("{name}> redirections assign a variable for later commands")
            end_word()
            out.append(Op(op))
            i += len(op)
        else:
            word.append(ch)
            started = True
            i += 1
    end_word()
    return out


def simple_commands(tokens: list[str]) -> list[Simple]:
    """Each simple command of a line, split at the shell's operators."""
    out: list[Simple] = []
    current = Simple()
    groups: list[tuple[int, bool]] = []  # open compound commands: (first command, piped into)
    closed: range | None = None  # the compound command that just ended, for its redirections

    def inherited() -> bool:
        return any(p for _, p in groups)

    def flush(piped: bool, then: str = "") -> Simple:
        if current.argv or current.redirects:
            current.then = then
            out.append(current)
        return Simple(piped=piped or inherited(), depth=len(groups))

    i = 0
    while i < len(tokens):
        t = tokens[i]
        op = isinstance(t, Op)
        word = not op and not isinstance(t, Quoted)  # a word bash may read as a reserved word
        if op and t == "(" and i + 1 < len(tokens) and tokens[i + 1] == "(":
            raise Unclassifiable("arithmetic commands evaluate variables as code; write the numbers out")
        if op and t == "(" and (current.argv or (i + 1 < len(tokens) and tokens[i + 1] == ")")):
            raise Unclassifiable("defining a shell function would let later lines run what was not decided")
        if word and t == "function" and not current.argv:
            raise Unclassifiable("defining a shell function would let later lines run what was not decided")
        if (op and t == "(") or (word and t in OPENERS and not current.argv and not current.redirects):
            piped = current.piped
            current = flush(False)
            groups.append((len(out), piped))
            current.piped, current.depth = current.piped or piped, len(groups)
            closed = None
        elif (op and t == ")") or (word and t in CLOSERS and not current.argv):
            current = flush(False)
            first, _ = groups.pop() if groups else (0, False)
            current.piped, current.depth = inherited(), len(groups)
            closed = range(first, len(out))
        elif op and t in SEPARATORS:
            current = flush(t in PIPES, t)
            closed = None
        elif op:  # a redirection
            target = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not target or isinstance(target, Op):
                raise Unclassifiable(f"redirection {t!r} without a target")
            current.redirects.append((t, target))
            if closed is not None and not current.argv and t in STDIN_REDIRECTS:
                for n in closed:
                    out[n].group_stdin = out[n].group_stdin or (t, target)
            i += 1
        elif word and t in KEYWORDS and not current.argv:
            pass  # `! sudo id`, `then sudo id`: what follows is a command
        else:
            current.argv.append(str(t))
            closed = None
        i += 1
    flush(False)
    return out
