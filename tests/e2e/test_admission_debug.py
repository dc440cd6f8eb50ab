"""`--log-level debug`: one `admission_refused` line per refused connection, naming the
check (`reason`) and never a header value; at `info` none of them is written."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from websockets.exceptions import InvalidStatus

from tests.e2e.harness import (
    TOKEN,
    Relay,
    binary,
    closed_with,
    phone,
    start_relay,
    upgrade_headers,
)

UA_MARKER = "UA-marker-9b2e"  # a header value: must never reach the log
EVENT = "msg=admission_refused"


async def request_from(relay: Relay, source: str, path: str, headers: Mapping[str, str]) -> int:
    """The status of one HTTP request sent from the loopback address `source`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, local_addr=(source, 0))
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{relay.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    return int(raw.split(b" ", 2)[1])


async def refusals(relay: Relay) -> None:
    """Every admission refusal but the global cap, each from its own source address (the
    rate limit and the per-IP cap count per address)."""
    b = await binary(relay, "s1")  # 127.0.0.1: token 1, slot 1
    await phone(relay, "s1")  # token 2, slot 2: the per-IP cap (2) is reached
    client_headers = upgrade_headers("client", "s1")
    assert await request_from(relay, "127.0.0.1", "/v1/client", client_headers) == 503
    assert await request_from(relay, "127.0.0.1", "/v1/client", client_headers) == 429

    second = await binary(relay, "s1", local_addr=("127.0.0.2", 0))
    assert (await closed_with(second))[0] == 4409
    extra = await phone(relay, "s1", local_addr=("127.0.0.3", 0))
    assert (await closed_with(extra))[0] == 4429
    nobody = await phone(relay, "nobody", local_addr=("127.0.0.4", 0))
    assert (await closed_with(nobody))[0] == 4404

    no_ua = upgrade_headers("client", "s1")
    del no_ua["User-Agent"]
    assert await request_from(relay, "127.0.0.5", "/v1/client", no_ua) == 400
    not_upgrade = {**upgrade_headers("server", "s1"), "User-Agent": UA_MARKER}
    del not_upgrade["Upgrade"]
    assert await request_from(relay, "127.0.0.5", "/v1/server", not_upgrade) == 426
    await b.close()


FLAGS = (
    "--rate-limit-burst=3",
    "--rate-limit-interval=1m",  # no token comes back during the test
    "--max-connections-per-ip=2",
    "--max-phones-per-server=1",
)


async def test_debug_logs_one_line_per_refusal() -> None:
    async with start_relay(*FLAGS, "--log-level=debug") as relay:
        await refusals(relay)
        assert await relay.stop() == 0
    lines = [line for line in relay.lines if EVENT in line]
    expected = [
        "path=/v1/client reason=conn_cap scope=per_ip remote=127.0.0.1",
        "path=/v1/client reason=rate_limit remote=127.0.0.1",
        "path=/v1/server reason=server_in_use server_id=s1 close_code=4409 remote=127.0.0.2",
        "path=/v1/client reason=phones_at_cap server_id=s1 close_code=4429 remote=127.0.0.3",
        "path=/v1/client reason=no_server server_id=nobody close_code=4404 remote=127.0.0.4",
        "path=/v1/client reason=missing_header header_name=user-agent remote=127.0.0.5",
        "path=/v1/server reason=bad_handshake remote=127.0.0.5",
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, tail in zip(lines, expected, strict=True):
        assert "level=DEBUG" in line and line.endswith(f"{EVENT} {tail}"), line
    assert UA_MARKER not in relay.log and TOKEN not in relay.log


async def test_debug_logs_the_global_cap() -> None:
    async with start_relay("--max-connections=1", "--log-level=debug") as relay:
        await binary(relay, "s1")
        with pytest.raises(InvalidStatus) as exc:
            await phone(relay, "s1")
        assert exc.value.response.status_code == 503
        line = await relay.wait_log(EVENT)
        assert line.endswith(
            f"{EVENT} path=/v1/client reason=conn_cap scope=global remote=127.0.0.1"
        )
        assert "level=DEBUG" in line


async def test_info_logs_none_of_them() -> None:
    async with start_relay(*FLAGS) as relay:
        await refusals(relay)
        assert await relay.stop() == 0
    # The reference's own lines for these refusals are still there; the debug ones are not.
    for needle in ("msg=conn_cap_reached", "msg=rate_limited", "msg=phone_register_at_cap"):
        assert relay.count_log(needle) == 1, relay.log
    assert "level=DEBUG" not in relay.log
    assert EVENT not in relay.log
