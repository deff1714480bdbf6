"""The HAProxy wrapper that adds the per-client connection cap (`apps.edge.connection_guard`): where
the rules go, that Ray's bundled HAProxy accepts them, and what it leaves alone. The cap itself
is tested on the real stack in tests/test_hostile_clients.py."""

from __future__ import annotations

import subprocess

import pytest

from apps.edge.connection_guard import (
    FrontendNotFound,
    Guards,
    guard_config_file,
    guarded_config,
    haproxy_binary,
)

# The shape of what Ray 2.60 writes (ray/serve/_private/haproxy_templates.py), cut down.
CONFIG = """global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client 15s
    timeout server 60s
frontend prometheus
    bind :18998
    mode http
    no log
frontend http_frontend
    bind 127.0.0.1:18999
    log global
    acl routes path -i /-/routes
    http-request return status 200 content-type text/plain string "ok" if routes
    default_backend app
backend app
    server a 127.0.0.1:1
"""


def test_the_cap_goes_right_after_the_http_frontends_bind_line_and_the_buffers_in_global():
    lines = guarded_config(CONFIG, Guards(7, 4096)).splitlines()
    assert lines[0] == "global" and lines[3:5] == ["    tune.sndbuf.client 4096", "    tune.rcvbuf.server 4096"]
    bind = lines.index("    bind 127.0.0.1:18999 proto h1")  # HTTP/1 only: one request per connection
    assert lines[bind - 1] == "frontend http_frontend"
    assert lines[bind + 2 : bind + 5] == [
        "    stick-table type ipv6 size 1m expire 60s store conn_cur",
        "    tcp-request connection track-sc0 src",
        "    tcp-request connection reject if { sc0_conn_cur gt 7 }",
    ]
    assert lines.count("    bind :18998") == 1 and "sc0" not in "\n".join(lines[: bind - 1]), "prometheus untouched"
    assert lines[bind + 6] == "    timeout http-request 10s", "a header sender that drips is bounded"
    assert "timeout http-request" not in guarded_config(CONFIG, Guards(7, 4096, 0)), "0: off"


def test_rays_bundled_haproxy_accepts_the_guarded_config(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(guarded_config(CONFIG, Guards()))
    checked = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_config_without_the_frontend_is_left_alone(tmp_path, capsys):
    other = CONFIG.replace("frontend http_frontend", "frontend other")
    with pytest.raises(FrontendNotFound):
        guarded_config(other, Guards())
    path = tmp_path / "haproxy.cfg"
    path.write_text(other)
    guard_config_file(["-db", "-f", str(path), "-sf", "123"], Guards())
    assert path.read_text() == other
    assert "no guards" in capsys.readouterr().err


def test_the_file_haproxy_is_started_on_is_guarded_in_place_once(tmp_path):
    """In place: Ray finds its HAProxy processes by the config path in their command line."""
    path = tmp_path / "haproxy.cfg"
    path.write_text(CONFIG)
    args = ["-db", "-f", str(path), "-sf", "123", "-x", "/tmp/admin.sock"]
    guard_config_file(args, Guards(7, 0))
    guarded = path.read_text()
    assert "sc0_conn_cur gt 7" in guarded and "tune." not in guarded, "a buffer bound of 0: the kernel's"
    guard_config_file(args, Guards(7, 0))
    assert path.read_text() == guarded, "started again on the same file: guarded once"
    path.write_text(CONFIG)
    guard_config_file(args, Guards(0, 0, 0))
    assert path.read_text() == CONFIG, "all off: untouched"


def test_the_guards_come_from_the_environment():
    assert Guards.from_env({}) == Guards(256, 262144, 10)
    environ = {
        "LLM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "0",
        "LLM_GATEWAY_CONNECTION_BUFFER_BYTES": "65536",
        "LLM_GATEWAY_HEADER_TIMEOUT_S": "5",
    }
    assert Guards.from_env(environ) == Guards(0, 65536, 5)


@pytest.mark.parametrize("raw", ["-1", "many", "2.5"])
def test_a_wrong_value_stops_haproxy_with_a_message(raw):
    with pytest.raises(SystemExit, match="LLM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT"):
        Guards.from_env({"LLM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": raw})
