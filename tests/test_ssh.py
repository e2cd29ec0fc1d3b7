"""SSH through ssh_bridge: a real sshd, the real gateway, the bridge process, the shipped
sample rules (rules/ssh.yaml), and real clients: OpenSSH's `ssh` (the token from
SSH_ASKPASS) and asyncssh. "Nothing reached the host" is read from sshd's own log and
from the files the commands would have touched."""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import subprocess
import threading
from pathlib import Path

import asyncssh
import pytest

from examples.samples.sshd import SshServer, keygen
from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.pgbridge import BridgeProcess
from tests.support.servers import free_port

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def sshd():
    server = SshServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, sshd):
    directory = tmp_path_factory.mktemp("ssh-gateway")
    wrong = directory / "wrong_known_hosts"  # the host "moved": a key nobody pinned
    other = keygen(directory / "other_host_key")
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {Path(str(other) + '.pub').read_text()}")
    port, approvals = free_port(), free_port()
    base = {"kind": "ssh", "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}",
            "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"},
            "listen": f"127.0.0.1:{port}", "host_key": str(directory / "bridge_host_key")}
    gateway = Gateway(
        directory,
        connections=[{"name": "prod-web", "hosts": ["web.prod.internal"], "known_hosts": str(sshd.known_hosts),
                      "max_output_bytes": 200_000, "command_timeout": "4s", **base},
                     {"name": "patient-web", "hosts": ["patient.prod.internal"], "known_hosts": str(sshd.known_hosts),
                      "command_timeout": "60s", **base},
                     {"name": "moved-web", "hosts": ["moved.internal"], "known_hosts": str(wrong), **base}],
        rules={"ssh.yaml": (ROOT / "rules" / "ssh.yaml").read_text(),
               "test.yaml": {"rules": [
                   {"id": "moved-read", "match": {"connection": "moved-web", "action": "read"}, "effect": "allow"},
                   {"id": "raw-read", "match": {"connection": "prod-web", "principal": {"groups": ["raw"]},
                                                "action": "read"}, "effect": "allow"},
                   {"id": "lab-exec", "match": {"connection": "prod-web", "principal": {"groups": ["lab"]},
                                                "action": ["read", "exec"]}, "effect": "allow", "masks": ["secrets"]},
                   {"id": "sync-files", "match": {"connection": "prod-web", "principal": {"groups": ["sync"]},
                                                  "action": ["read", "write"]}, "effect": "allow"},
                   {"id": "patient-ops", "match": {"connection": "patient-web", "principal": {"groups": ["ops"]},
                                                   "action": ["read", "write"]}, "effect": "allow",
                    "masks": ["secrets"]}]}},
        identity=standard_identity(servers.jwks),
    )
    gateway.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    gateway.config_file.write_text(__import__("yaml").safe_dump(gateway.config))
    gateway.approvals_url = f"http://127.0.0.1:{approvals}"
    gateway.start()
    wait_for(lambda: listening(gateway.approvals_url))
    gateway.bridge_port = port
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def bridge(gw, tmp_path_factory):
    process = BridgeProcess(gw, gw.bridge_port, tmp_path_factory.mktemp("ssh-bridge") / "bridge.log",
                            module="ssh_bridge")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(keys, jwks):
    def mint(sub: str, groups: list[str]) -> str:
        return keys["rsa"].token(jwks.issuer, sub=sub, groups=groups, ttl=3600)

    return {"ops": mint("crew-ops", ["ops"]), "reader": mint("crew-reader", ["ops-readers"]), "raw": mint("raw", ["raw"]), "lab": mint("lab", ["lab"]),
            "stranger": mint("nobody", []), "sre": mint("sre-1", ["sre"]), "sync": mint("sync", ["sync"])}


@pytest.fixture(scope="module")
def askpass(tmp_path_factory):
    script = tmp_path_factory.mktemp("askpass") / "askpass"
    script.write_text("#!/bin/sh\nprintf '%s\\n' \"$CUSTODY_TOKEN\"\n")
    script.chmod(0o755)
    return script


def client_env(askpass, token: str) -> dict[str, str]:
    return {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "CUSTODY_TOKEN": token,
            "DISPLAY": ":0"}


def ssh_options(gw, log_level: str = "ERROR") -> list[str]:
    return ["-p", str(gw.bridge_port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no",
            "-o", f"LogLevel={log_level}", "-o", "NumberOfPasswordPrompts=1", "-F", "/dev/null"]


def ssh(gw, askpass, token: str, *args: str, user: str = "agent+prod-web", stdin: bytes | None = None,
        timeout: float = 60, log_level: str = "ERROR") -> subprocess.CompletedProcess:
    """The real OpenSSH client, its password (the token) from SSH_ASKPASS."""
    cmd = ["ssh", *ssh_options(gw, log_level), *args[:-1], f"{user}@127.0.0.1", *args[-1:]]
    return subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True,
                          env=client_env(askpass, token), timeout=timeout)


def direct(sshd, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The same command run directly on the host (OpenSSH to the sshd, with the gateway's key)."""
    cmd = ["ssh", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
           "-o", "LogLevel=ERROR", "-F", "/dev/null", *args[:-1], f"{sshd.user}@127.0.0.1", *args[-1:]]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)


def run(coro):
    return asyncio.run(coro)


async def asyncssh_connect(gw, token: str, user: str = "agent+prod-web", **kw):
    return await asyncssh.connect("127.0.0.1", gw.bridge_port, username=user, password=token, known_hosts=None,
                                  client_keys=None, agent_path=None, config=None, **kw)


# exec


def test_exec_returns_stdout_stderr_and_the_exit_status(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["ops"], "echo hello; echo oops >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hello\n", b"oops\n")


def test_a_session_whose_switch_is_not_on_record_ends_before_any_output(bridge, gw, askpass, tokens):
    """The 101 that opens an exec's stream is not held for its audit write (Recorder.response):
    every frame of the stream waits for that write. Here the store refuses exactly that
    event (a trigger: a real SQLite error), so the command's output never reaches the
    client, the session's frames are not on record, and the next exec works."""
    import sqlite3

    db = sqlite3.connect(gw.db, isolation_level=None)
    db.execute("CREATE TRIGGER no_switch BEFORE INSERT ON events WHEN NEW.kind = 'response' AND NEW.status = 101 "
               "BEGIN SELECT RAISE(ABORT, 'the switch is not recorded'); END")
    try:
        done = ssh(gw, askpass, tokens["ops"], "echo unrecorded-output")
    finally:
        db.execute("DROP TRIGGER no_switch")
        db.close()
    assert (done.returncode, done.stdout) == (255, b""), done
    [request] = gw.events("kind = 'request' AND operation LIKE '%unrecorded-output%'")
    assert [e["kind"] for e in gw.events("flow = ?", [request["flow"]])] == ["request", "decision"]
    healed = ssh(gw, askpass, tokens["ops"], "echo healed")
    assert (healed.returncode, healed.stdout) == (0, b"healed\n")
    assert gw.custody("audit", "verify", "--full").returncode == 0


def test_exec_is_binary_safe(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["raw"], r"printf '\000\001\377abc'")  # a rule without masks
    assert (done.returncode, done.stdout) == (0, b"\x00\x01\xffabc")


def test_binary_output_that_must_be_masked_is_refused(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["reader"], r"printf '\000\001\377abc'")
    assert done.returncode == 126 and done.stdout == b""
    assert b"custody: the command's output is not text and cannot be masked" in done.stderr


def test_exec_passes_standard_input(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["reader"], "wc -c", stdin=b"x" * 5000)
    assert done.returncode == 0 and done.stdout.strip() == b"5000"


@pytest.mark.parametrize(
    "command, chunks, out",
    [
        ("echo no-input", (), b"no-input\n"),  # reads nothing: ends as the command does
        ("head -c 5", (b"hel", b"lo"), b"hello"),  # reads what comes, however it is cut
        ("head -n 2", (b"one\n", b"two\n"), b"one\ntwo\n"),
    ],
)
def test_an_exec_ends_with_its_command_while_the_client_keeps_its_input_open(bridge, gw, tokens, command, chunks,
                                                                            out):
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", gw.bridge_port, username="agent+prod-web", password=tokens["reader"],
                   allow_agent=False, look_for_keys=False)
    try:
        channel = client.get_transport().open_session()
        channel.settimeout(30)  # a command waiting for an EOF that never comes fails here
        channel.exec_command(command)
        for chunk in chunks:  # and never shutdown_write(): no EOF
            channel.sendall(chunk)
        received = b""
        while data := channel.recv(4096):
            received += data
        assert (received, channel.recv_exit_status()) == (out, 0)
    finally:
        client.close()


def test_the_openssh_client_returns_while_its_input_stays_open(bridge, gw, askpass, tokens):
    cmd = ["ssh", *ssh_options(gw), "agent+prod-web@127.0.0.1", "echo no-input"]
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=client_env(askpass, tokens["reader"]))
    try:
        assert process.wait(timeout=60) == 0  # returns although its standard input was never closed
        assert process.stdout.read() == b"no-input\n"
    finally:
        process.kill()
        process.stdin.close()


def test_large_output_is_capped_with_a_clear_message(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["ops"], "head -c 1000000 /dev/zero | tr '\\0' x")
    assert done.returncode == 255 and len(done.stdout) == 200_000
    assert b"custody: the output passed 200000 bytes; the command was stopped" in done.stderr


def test_secrets_in_output_are_masked(bridge, gw, askpass, tokens, sshd, tmp_path):
    secret = Path("/tmp") / f"custody-secret-{os.getpid()}.txt"
    secret.write_text(f"aws_access_key_id = {AWS_KEY}\nregion = eu-west-1\n")
    try:
        done = ssh(gw, askpass, tokens["reader"], f"cat {secret}")
        assert done.returncode == 0 and AWS_KEY.encode() not in done.stdout
        assert b"region = eu-west-1" in done.stdout and b"[AWS_ACCESS_KEY_ID]" in done.stdout
        assert AWS_KEY.encode() not in gw.db.read_bytes()
    finally:
        secret.unlink()


# shell


def test_a_shell_keeps_its_directory_and_variables(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["ops"], "-T", "", stdin=b"cd /tmp\nX=42\npwd\necho $X\nexit 4\n")
    assert done.returncode == 4
    assert b"/tmp\n" in done.stdout and b"42\n" in done.stdout


def test_a_shell_line_is_governed_on_its_own(bridge, gw, askpass, tokens, tmp_path):
    target = Path("/tmp") / f"custody-shell-{os.getpid()}"
    done = ssh(gw, askpass, tokens["reader"], "-T", "", stdin=f"echo before\ntouch {target}\necho after\n".encode())
    assert b"before\n" in done.stdout and b"after\n" in done.stdout
    assert b"custody: no rule matches this request" in done.stderr and not target.exists()


def test_a_relative_write_is_judged_where_the_shell_is(bridge, gw, askpass, tokens):
    """`cd /etc` on one line, a relative write on the next: the rule on /etc/** still holds."""
    done = ssh(gw, askpass, tokens["ops"], "-T", "", stdin=b"cd /etc\necho x > custody-relative\npwd\n")
    assert b"custody: Writing under /etc is not allowed for agents." in done.stderr
    assert b"/etc\n" in done.stdout and not Path("/etc/custody-relative").exists()


def test_a_script_on_standard_input_is_not_run_unseen(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["lab"], "bash", stdin=b"sudo id\n")
    assert done.returncode == 126 and b"custody: no rule matches this request" in done.stderr


def test_a_command_that_runs_too_long_is_stopped(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["reader"], "sleep 30")
    assert done.returncode == 124 and b"custody: the command ran longer than 4 s and was stopped" in done.stderr


def test_interactive_programs_are_refused_not_passed_through(bridge, gw, askpass, tokens):
    done = ssh(gw, askpass, tokens["lab"], "-T", "", stdin=b"vi /tmp/x\necho still here\n")
    assert b"vi is interactive" in done.stderr and b"still here" in done.stdout


def test_a_shell_with_a_terminal_echoes_and_edits(bridge, gw, tokens):
    async def main():
        async with await asyncssh_connect(gw, tokens["reader"]) as conn:
            process = await conn.create_process(term_type="xterm", encoding=None)
            process.stdin.write(b"echo hellx\x7fo\r")
            out = b""
            while b"hello\r\n$ " not in out.split(b"hellx\x08 \x08o", 1)[-1]:
                out += await asyncio.wait_for(process.stdout.read(1024), 10)
            process.stdin.write(b"\x04")
            await process.wait_closed()
            return out

    assert b"hellx\b \bo\r\nhello\r\n" in run(main())


# policy


@pytest.mark.parametrize(
    "token, command, message",
    [
        ("ops", "sudo id", "custody: sudo, su and doas are not allowed for agents."),
        ("ops", "echo pwned > /etc/custody-test", "custody: Writing under /etc is not allowed for agents."),
        ("ops", "curl http://example.com", "custody: Network tools"),
        ("ops", "ls; sudo -s", "custody: statement 2"),
        ("reader", "rm /tmp/anything", "custody: no rule matches this request"),
        ("ops", "echo $(id)", "custody: no rule matches this request"),
        ("ops", "bash -c 'sudo id'", "custody: sudo, su and doas are not allowed for agents."),
        ("ops", "echo 'unbalanced", "custody: no rule matches this request"),
    ],
)
def test_refused_commands_never_reach_the_host(bridge, gw, askpass, tokens, sshd, token, command, message):
    before = sshd.log().count("Starting session: command")
    done = ssh(gw, askpass, tokens[token], command)
    assert done.returncode == 126 and message in done.stderr.decode(), done.stderr
    assert done.stdout == b"" and not Path("/etc/custody-test").exists()
    assert sshd.log().count("Starting session: command") == before + 1  # the login's own `pwd`, nothing else


def test_a_recursive_rm_waits_for_an_sre(bridge, gw, askpass, tokens):
    target = Path("/tmp") / f"custody-doomed-{os.getpid()}"
    (target / "inner").mkdir(parents=True)
    sre = Approver(gw.approvals_url, tokens["sre"])
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(done=ssh(gw, askpass, tokens["ops"], f"rm -r {target}")))
    thread.start()
    approval = wait_for(lambda: [a for a in sre.list() if str(target) in a["operation"]["summary"]])[0]
    assert approval["rules"] == ["ssh-recursive-rm-reviewed"] and target.exists()
    assert sre.vote(approval["id"], "approve", "cleanup").status_code == 200
    thread.join(30)
    assert outcome["done"].returncode == 0 and not target.exists()


# what is refused outright


def test_port_forwarding_is_refused(bridge, gw, tokens, sshd):
    async def main():
        async with await asyncssh_connect(gw, tokens["ops"]) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", sshd.port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", free_port(), "127.0.0.1", 22)

    run(main())


def test_sftp_is_refused(bridge, gw, tokens):
    async def main():
        async with await asyncssh_connect(gw, tokens["ops"]) as conn:
            with pytest.raises((asyncssh.SFTPError, asyncssh.ChannelOpenError, asyncssh.ProcessError, OSError)):
                async with conn.start_sftp_client() as sftp:
                    await sftp.listdir("/")

    run(main())


# identity and the host key


@pytest.mark.parametrize("password", ["not-a-jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                                      "eyJh bGciOiJub25lIn0.e30.c2ln", "eyJ\u00e9.e30.c2ln"])  # a space; not ASCII
def test_bad_tokens_are_refused_before_the_host(bridge, gw, askpass, sshd, password):
    before = sshd.accepted()
    done = ssh(gw, askpass, password, "id")
    assert done.returncode == 255 and b"Permission denied" in done.stderr
    assert sshd.accepted() == before


def test_a_principal_without_rules_cannot_log_in(bridge, gw, askpass, tokens, sshd):
    done = ssh(gw, askpass, tokens["stranger"], "id")
    assert done.returncode == 255 and b"Permission denied" in done.stderr


def test_keyboard_interactive_and_the_connection_in_the_user_name(bridge, gw, tokens):
    class Answers(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(self, name, instructions, lang, prompts):
            return [tokens["reader"] for _ in prompts]

    async def main():
        conn, _ = await asyncssh.create_connection(
            Answers, "127.0.0.1", gw.bridge_port, username="agent+prod-web", known_hosts=None, client_keys=None,
            agent_path=None, config=None, preferred_auth="keyboard-interactive")
        async with conn:
            return await conn.run("echo via kbdint", check=False)

    assert run(main()).stdout == "via kbdint\n"


def test_a_changed_host_key_is_refused(bridge, gw, tokens, sshd):
    before = sshd.accepted()

    async def main():
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh_connect(gw, tokens["ops"], user="agent+moved-web")

    run(main())
    assert sshd.accepted() == before
    refusal = gw.wait_events("kind = 'response' AND connection = 'moved-web'")[-1]
    assert b"does not match known_hosts" in refusal["body"]


def test_the_bridge_holds_no_key_and_keeps_its_own(bridge, gw, sshd):
    assert sshd.client_key.read_bytes() not in bridge.environ()
    key = Path(gw.config["connections"][0]["host_key"])
    assert key.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600


# stream fidelity: every value read through the gateway is compared with the same command run directly


def scratch(name: str) -> Path:
    path = Path("/tmp") / f"custody-{name}-{os.getpid()}"
    path.unlink(missing_ok=True)
    return path


def piped(gw, askpass, token: str, producer: str, command: str, user: str = "agent+prod-web"):
    """`producer | ssh … command` through a real shell, as an agent would type it."""
    line = " ".join(["ssh", *ssh_options(gw), f"{user}@127.0.0.1", shlex.quote(command)])
    return subprocess.run(["bash", "-c", f"{producer} | {line}"], capture_output=True, env=client_env(askpass, token),
                          timeout=90)


@pytest.mark.parametrize(
    "producer, user",
    [
        ("(sleep 0.5; echo hello)", "agent+prod-web"),  # input that starts late
        ("(echo first; sleep 11; echo after-a-long-pause)", "agent+patient-web"),  # a pause longer than any wait
        ("head -c 3000000 /dev/urandom | base64 -w 100", "agent+patient-web"),  # past 1 MiB
    ],
)
def test_standard_input_reaches_the_command_whole(bridge, gw, askpass, tokens, sshd, producer, user):
    target = scratch("stdin")
    try:
        done = piped(gw, askpass, tokens["ops"], f"{producer} | tee {target}.sent", f"cat > {target}", user=user)
        assert done.returncode == 0, done.stderr
        sent = Path(f"{target}.sent").read_bytes()
        assert target.read_bytes() == sent and sent
        again = direct(sshd, f"cat {target}")
        through = ssh(gw, askpass, tokens["ops"], f"cat {target}", user=user)
        assert through.stdout == again.stdout == sent
    finally:
        target.unlink(missing_ok=True)
        Path(f"{target}.sent").unlink(missing_ok=True)


def test_output_flows_while_the_command_runs(bridge, gw, tokens, sshd):
    command = "echo line 1; sleep 1; echo line 2; sleep 1; echo line 3"

    async def main():
        async with await asyncssh_connect(gw, tokens["ops"], user="agent+patient-web") as conn:
            process = await conn.create_process(command, encoding=None)
            first = await asyncio.wait_for(process.stdout.readline(), 30)
            running = process.exit_status is None and not process.stdout.at_eof()
            rest = await process.stdout.read()
            await process.wait_closed()
            return first, running, first + rest

    first, running, whole = run(main())
    assert (first, running) == (b"line 1\n", True)  # the first line came before the command ended
    assert whole == direct(sshd, command).stdout


def test_a_requested_terminal_is_given(bridge, gw, askpass, tokens, sshd):
    command = "test -t 0 && test -t 1 && echo terminal"
    through = ssh(gw, askpass, tokens["ops"], "-tt", command, user="agent+patient-web")
    again = direct(sshd, "-tt", command)
    assert through.returncode == again.returncode == 0
    assert through.stdout.splitlines()[0] == again.stdout.splitlines()[0] == b"terminal"


def test_a_paramiko_shell_sees_refusals_on_its_terminal(bridge, gw, tokens, sshd):
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", gw.bridge_port, username="agent+prod-web", password=tokens["reader"],
                   allow_agent=False, look_for_keys=False)
    try:
        shell = client.invoke_shell()
        shell.settimeout(30)  # a hang fails here, with what was seen, not at the suite's timeout
        shell.send(b'touch /tmp/custody-paramiko\recho through-4"2"\r')  # the output differs from the echo
        seen = b""
        while b"through-42" not in seen.split(b"echo through-", 1)[-1]:
            seen += shell.recv(4096)
        assert b"custody: no rule matches this request" in seen  # on the terminal, as a shell prints it
        assert not shell.recv_stderr_ready()
    finally:
        client.close()
    assert not Path("/tmp/custody-paramiko").exists()


def test_rsync_over_ssh_writes_and_reads_as_governed_commands(bridge, gw, askpass, tokens, sshd, tmp_path):
    source = tmp_path / "payload.txt"
    source.write_bytes(b"governed rsync\n" * 100)
    target = scratch("rsync")
    rsh = " ".join(["ssh", *ssh_options(gw)])
    env = client_env(askpass, tokens["sync"])
    try:
        up = subprocess.run(["rsync", "-e", rsh, str(source), f"agent+prod-web@127.0.0.1:{target}"],
                            capture_output=True, env=env, timeout=60)
        assert up.returncode == 0, up.stderr
        assert direct(sshd, f"cat {target}").stdout == source.read_bytes()
        back = tmp_path / "back.txt"
        down = subprocess.run(["rsync", "-e", rsh, f"agent+prod-web@127.0.0.1:{target}", str(back)],
                              capture_output=True, env=env, timeout=60)
        assert down.returncode == 0 and back.read_bytes() == source.read_bytes()
        masked = subprocess.run(["rsync", "-e", " ".join(["ssh", *ssh_options(gw)]), str(source),
                                 f"agent+prod-web@127.0.0.1:{target}.masked"], capture_output=True,
                                env=client_env(askpass, tokens["ops"]), timeout=60)
        assert masked.returncode != 0 and b"custody: " in masked.stderr  # its rules mask: binary is refused
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "client, expected",
    [
        (["scp"], b"custody: the sftp subsystem is not governed"),  # scp speaks sftp by default
        (["sftp"], b"custody: the sftp subsystem is not governed"),
    ],
)
def test_sftp_is_refused_with_a_message_the_client_prints(bridge, gw, askpass, tokens, tmp_path, client, expected):
    source = tmp_path / "f.txt"
    source.write_text("x")
    options = [o.replace("-p", "-P") if o == "-p" else o for o in ssh_options(gw)]
    target = "agent+prod-web@127.0.0.1:" + ("/tmp/custody-scp" if client == ["scp"] else "")
    args = [*client, *options, *([str(source)] if client == ["scp"] else []), target]
    done = subprocess.run(args, input=b"ls\n", capture_output=True, env=client_env(askpass, tokens["ops"]), timeout=60)
    assert done.returncode != 0 and expected in done.stderr, done.stderr
    assert not Path("/tmp/custody-scp").exists()


def test_scp_in_its_legacy_protocol_is_a_governed_write(bridge, gw, askpass, tokens, sshd, tmp_path):
    source = tmp_path / "f.txt"
    source.write_bytes(b"legacy scp\n")
    target = scratch("scp")
    options = ["-P" if o == "-p" else o for o in ssh_options(gw)]
    try:
        done = subprocess.run(["scp", "-O", *options, str(source), f"agent+prod-web@127.0.0.1:{target}"],
                              capture_output=True, env=client_env(askpass, tokens["sync"]), timeout=60)
        assert done.returncode == 0, done.stderr
        assert direct(sshd, f"cat {target}").stdout == source.read_bytes()
        refused = subprocess.run(["scp", "-O", *options, str(source), "agent+prod-web@127.0.0.1:/etc/custody-scp"],
                                 capture_output=True, env=client_env(askpass, tokens["ops"]), timeout=60)
        assert refused.returncode != 0 and not Path("/etc/custody-scp").exists()
    finally:
        target.unlink(missing_ok=True)


# refusals say why, before anything is held


@pytest.mark.parametrize(
    "token, user, message",
    [
        ("stranger", "agent+prod-web", b"custody: no rule matches this request"),
        ("not-a-jwt", "agent+prod-web", b"custody: "),
        ("ops", "agent+nowhere", b"no ssh connection is named by the user"),
    ],
)
def test_a_refused_login_tells_the_agent_why(bridge, gw, askpass, tokens, token, user, message):
    done = ssh(gw, askpass, tokens.get(token, token), "id", user=user, log_level="INFO")
    assert done.returncode == 255 and message in done.stderr and b"Permission denied" in done.stderr
    if token == "stranger":
        assert b"audit event: " in done.stderr


@pytest.mark.parametrize("command", ["vi /tmp/custody-vi", "top", "less /etc/hostname", "nano x", "watch ls"])
def test_interactive_programs_are_refused_before_any_approval(bridge, gw, askpass, tokens, command):
    sre = Approver(gw.approvals_url, tokens["sre"])
    done = ssh(gw, askpass, tokens["ops"], command)
    assert done.returncode == 126 and b"is interactive" in done.stderr
    assert not [a for a in sre.list() if command in a["operation"]["summary"]]


def test_ctrl_c_on_a_held_shell_line_withdraws_it(bridge, gw, tokens):
    target = Path("/tmp") / f"custody-held-line-{os.getpid()}"
    (target / "inner").mkdir(parents=True, exist_ok=True)
    sre = Approver(gw.approvals_url, tokens["sre"])

    async def main():
        async with await asyncssh_connect(gw, tokens["ops"]) as conn:
            process = await conn.create_process(term_type="xterm", encoding=None)
            process.stdin.write(f"rm -r {target}\r".encode())
            held = wait_for(lambda: [a for a in sre.list() if str(target) in a["operation"]["summary"]])[0]
            process.stdin.write(b"\x03")
            out = b""
            while b"custody: withdrawn" not in out:
                out += await asyncio.wait_for(process.stdout.read(1024), 10)
            process.stdin.write(b"\x04")
            return held, out

    held, out = run(main())
    assert b"custody: withdrawn" in out
    state = wait_for(lambda: [a for a in sre.list(state="abandoned") if a["id"] == held["id"]])
    assert state and target.exists()


# the attacker's classes, end to end: each of these reached the host before, none does now

CANARY = Path("/tmp") / "custody-canary"


@pytest.fixture
def planted():
    """A copy of sh named ls outside the system directories, a symlink to it, and a symlink to /etc."""
    bin_dir, link, etc = Path("/tmp/custody-bin"), Path("/tmp/custody-link"), Path("/tmp/custody-etc")
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ls").write_bytes(Path("/bin/sh").read_bytes())
    (bin_dir / "ls").chmod(0o755)
    for path, to in ((link, bin_dir), (etc, Path("/etc"))):
        path.unlink(missing_ok=True)
        path.symlink_to(to)
    CANARY.unlink(missing_ok=True)
    yield
    for path in (link, etc, bin_dir / "ls", CANARY, Path("/etc/custody-test")):
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "token, lines",
    [
        ("raw", ["/tmp/custody-bin/ls -c 'touch /tmp/custody-canary'"]),  # a program is what it is
        ("raw", ["cd /tmp/custody-bin && ./ls -c 'touch /tmp/custody-canary'"]),
        ("raw", ["/tmp/custody-link/ls -c 'touch /tmp/custody-canary'"]),  # through a symlink
        ("raw", ["nice /tmp/custody-bin/ls -c 'touch /tmp/custody-canary'"]),
        ("raw", ["env /tmp/custody-bin/../custody-bin/ls -c 'touch /tmp/custody-canary'"]),
        ("raw", ["printf -v PATH %s /tmp/custody-bin", "ls -c 'touch /tmp/custody-canary'"]),  # session state
        ("raw", ["umask 000"]),
        ("raw", ["jobs -x touch /tmp/custody-canary"]),  # a builtin that runs its command
        ("raw", ["x='$'; y='(touch /tmp/custody-canary)'; z=$x$y; echo ${z@P}"]),  # a prompt expansion runs it
        ("raw", ["cd /tmp/custody-bin && echo $'\\' '; touch ../custody-canary; #'"]),  # $'…' pairs quotes its way
        ("raw", ["cd /tmp/custody-bin && echo \"${x:-'\"; echo hi '}\"; touch ../custody-canary; #'"]),  # so does ${…}
        ("ops", ["echo x > /tmp/custody-etc/custody-test"]),  # a writer's target, symlinks followed
        ("ops", ["cd /tmp/custody-etc && echo x > custody-test"]),
        ("ops", ["printf 78 > /tmp/custody-hex", "xxd -r -p /tmp/custody-hex /etc/custody-test"]),  # every writer
        ("ops", ["base64 -d -o /etc/custody-test /tmp/custody-hex"]),
        ("ops", ["cp /tmp/custody-hex /tmp/custody-etc/custody-test"]),
        ("lab", ["bash <<< 'echo x > /etc/custody-test'"]),  # code given to a shell on its input is classified
        ("lab", ["{ bash; } <<< 'echo x > /etc/custody-test'"]),
        ("lab", ["echo 'touch /tmp/custody-canary' | (cat >/dev/null; bash)"]),
    ],
)
def test_the_attackers_spellings_do_not_reach_the_host(bridge, gw, askpass, tokens, planted, token, lines):
    done = ssh(gw, askpass, tokens[token], "-T", "", stdin="".join(f"{x}\n" for x in lines).encode())
    assert b"custody: " in done.stderr, done.stderr
    assert not CANARY.exists() and not Path("/etc/custody-test").exists()
    marks = ",".join("?" * len(lines))
    assert gw.wait_events(f"kind = 'decision' AND effect = 'deny' AND resource IN ({marks})", list(lines))


# what the planner asks the host: the probe's script run in a real bash, as sshd runs it

@pytest.fixture
def tree(tmp_path):
    """bin/tool (a program), link -> bin, odd dir/ (spaces), a symlinked tool, a non-program."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "bin" / "tool").chmod(0o755)
    (tmp_path / "link").symlink_to(tmp_path / "bin")
    (tmp_path / "odd dir").mkdir()
    (tmp_path / "odd dir" / "sh").symlink_to("/bin/sh")
    (tmp_path / "odd dir" / "sh").parent.joinpath("plain").write_text("")
    (tmp_path / "fake").mkdir()  # a realpath of the agent's, early on PATH, that lies
    (tmp_path / "fake" / "realpath").write_text("#!/bin/sh\nprintf '/usr/bin/cat\\0'\n")
    (tmp_path / "fake" / "realpath").chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(
    "word, where, path, expected",
    [
        ("tool", None, "{t}/link", ("{t}/bin/tool", "{t}/bin/tool")),  # found on PATH, its directory resolved
        ("tool", None, "/nonexistent:{t}/bin", ("{t}/bin/tool", "{t}/bin/tool")),
        ("tool", None, "/nonexistent", ("", "")),  # not found: nothing runs
        ("ls", None, "", ("/usr/bin/ls", os.path.realpath("/usr/bin/ls"))),
        ("./tool", "{t}/bin", "", ("{t}/bin/tool", "{t}/bin/tool")),  # relative to where it runs
        ("./tool", "{t}/link", "", ("{t}/bin/tool", "{t}/bin/tool")),
        ("../bin/tool", "{t}/link", "", ("{t}/bin/tool", "{t}/bin/tool")),  # cd -P: physical ..
        ("{t}/link/tool", None, "", ("{t}/bin/tool", "{t}/bin/tool")),
        ("{t}/link//tool", None, "", ("{t}/bin/tool", "{t}/bin/tool")),
        ("{t}/odd dir/sh", None, "", ("{t}/odd dir/sh", os.path.realpath("/bin/sh"))),  # named where, is sh
        ("{t}/odd dir/plain", None, "", ("{t}/odd dir/plain", "{t}/odd dir/plain")),
        ("{t}/bin/", None, "", ("{t}/bin", "{t}/bin")),  # a directory with a trailing slash: basename's rule
        ("{t}/missing/tool", None, "", ("", "")),
        ("/", None, "", ("//", "/")),
        ("./bin/tool", "{t}/gone", "", ("", "")),  # its directory is gone: not looked up from elsewhere
        ("{t}/bin/tool", None, "{t}/fake", ("{t}/bin/tool", "{t}/bin/tool")),  # the system's realpath answers
    ],
)
def test_the_probe_says_where_a_program_is_and_what_it_really_is(tree, word, where, path, expected):
    from ssh_bridge.terminal.backend import parse_resolved, resolve_script

    t = str(tree)
    word, where = word.format(t=t), where and where.format(t=t)
    script = resolve_script(t, ":".join(filter(None, [path.format(t=t), "/usr/bin:/bin"])), [], [(word, where)])
    done = subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", script], capture_output=True, timeout=10,
                          env={"PATH": f"{t}/fake"})  # the probe's own PATH: not the line's
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    real, found = parse_resolved(done.stdout.decode(errors="surrogateescape").split("\0"), [(word, where)])
    assert (real, found) == ({}, {(word, where): tuple(x.format(t=t) for x in expected)})


def test_the_probe_resolves_paths_and_programs_in_one_answer(tree):
    from ssh_bridge.terminal.backend import parse_resolved, resolve_script

    t = str(tree)
    script = resolve_script(f"{t}/link", f"{t}/fake:{t}/bin:/usr/bin:/bin", ["tool", f"{t}/link/new/file", "../odd dir"],
                            [("tool", None), ("nope", None)])
    done = subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", script], capture_output=True, timeout=10,
                          env={"PATH": "/nonexistent"})
    assert parse_resolved(done.stdout.decode().split("\0"), [("tool", None), ("nope", None)]) == (
        {"tool": f"{t}/bin/tool", f"{t}/link/new/file": f"{t}/bin/new/file", "../odd dir": f"{t}/odd dir"},
        {("tool", None): (f"{t}/bin/tool", f"{t}/bin/tool"), ("nope", None): ("", "")})


@pytest.mark.parametrize(
    "path, system",
    [
        ("/usr/local/bin:/usr/bin:/bin:/usr/games", True),  # sshd's own (/bin may be a link to /usr/bin)
        ("/usr/bin", True),
        ("{t}/link", False),  # not a system directory
        ("/usr/bin:{t}/usr/bin", False),
        ("/usr/bin:/nonexistent", False),  # cannot be placed: not trusted
        ("/usr/bin:", False),  # the empty entry is the working directory
    ],
)
def test_the_host_says_whether_a_path_is_all_system_directories(tree, path, system):
    from ssh_bridge.terminal.backend import all_system, physical_dirs_script

    path = path.format(t=tree)
    (tree / "usr" / "bin").mkdir(parents=True)
    done = subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", physical_dirs_script(path)],
                          capture_output=True, timeout=10)
    assert all_system(done.stdout.decode().split("\0"), path) is system


def test_a_system_directory_that_is_a_link_elsewhere_is_not_trusted():
    from ssh_bridge.terminal.backend import all_system

    assert all_system(["/usr/bin", "/tmp/evil", ""], "/usr/bin:/usr/local/bin") is False
    assert all_system(["/usr/bin", ""], "/usr/bin:/usr/local/bin") is False  # an answer short of a directory
    assert all_system(["/usr/bin", "/usr/local/bin", ""], "/usr/bin:/usr/local/bin") is True


def test_the_probe_answers_each_word_from_its_own_directory(tree):
    from ssh_bridge.terminal.backend import parse_resolved, resolve_script

    t = str(tree)
    asked = [("./tool", f"{t}/bin"), ("./tool", f"{t}/odd dir"), ("plain", f"{t}/odd dir"), ("plain", t)]
    done = subprocess.run(["/bin/bash", "--noprofile", "--norc", "-c", resolve_script(t, ".:/usr/bin:/bin", [], asked)],
                          capture_output=True, timeout=10)  # "." is where it runs
    assert parse_resolved(done.stdout.decode().split("\0"), asked) == ({}, {
        ("./tool", f"{t}/bin"): (f"{t}/bin/tool", f"{t}/bin/tool"), ("./tool", f"{t}/odd dir"): ("", ""),
        ("plain", f"{t}/odd dir"): (f"{t}/odd dir/plain", f"{t}/odd dir/plain"), ("plain", t): ("", "")})


def test_an_answer_that_is_not_what_was_asked_ends_the_answers():
    from ssh_bridge.terminal.backend import parse_resolved

    fields = ["X", "cat", "/usr/bin/cat", "/usr/bin", "/usr/bin/cat", "X", "ls", "/usr/bin/ls", "/usr/bin", "/usr/bin/ls", ""]
    assert parse_resolved(fields, [("cat", None), ("sh", None)]) == ({}, {("cat", None): ("/usr/bin/cat", "/usr/bin/cat")})
