"""The readiness verdict and the notify protocol's sender, in-process: check order and
names, the abstract-namespace address, a failed send reported once and never raised."""

from __future__ import annotations

import os
import socket

from pyrycode_relay.ops.readiness import Readiness
from pyrycode_relay.ops.sdnotify import SystemdNotifier, notify_address


def test_verdict_names_what_is_missing_in_order() -> None:
    readiness = Readiness()
    held = {"certificate": False, "redis": True}
    readiness.require("certificate", lambda: held["certificate"])
    readiness.require("redis", lambda: held["redis"])
    assert readiness.verdict() == (False, "not ready: listeners, certificate")
    readiness.listening()
    assert readiness.verdict() == (False, "not ready: certificate")
    held["certificate"] = True
    assert readiness.verdict() == (True, "ready")
    held["redis"] = False
    readiness.draining = True
    assert readiness.verdict() == (False, "not ready: redis, draining")


def test_notify_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@relay-notify") == b"\0relay-notify"
    assert notify_address("") is None
    assert notify_address("@") is None
    assert notify_address("vsock:2:1234") is None


def test_abstract_socket_receives_the_datagram() -> None:
    name = f"pyrycode-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready("serving insecure")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving insecure"


def test_unset_is_a_no_op_and_a_failed_send_is_reported_once() -> None:
    assert not SystemdNotifier({}).enabled
    errors: list[str] = []
    gone = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"}, errors.append)
    assert gone.enabled
    gone.ready("serving")
    gone.stopping()
    assert len(errors) == 1
    assert "nonexistent" not in errors[0]  # the address is an environment value
