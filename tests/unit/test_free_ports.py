"""Ports reserved for services started later come from below the kernel's ephemeral range, where the local end of
an outgoing connection (a worker's to Kafka or the store) cannot take one meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from reactor.demo.scenario import free_ports

pytestmark = pytest.mark.unit


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(12)
    assert len(set(ports)) == 12
    assert all(1024 <= port < low for port in ports), (ports, low)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out() -> None:
    held = [socket.socket() for _ in range(3)]
    try:
        taken = []
        for sock, port in zip(held, free_ports(3), strict=True):
            sock.bind(("127.0.0.1", port))
            sock.listen()
            taken.append(port)
        assert not set(taken) & set(free_ports(200))
    finally:
        for sock in held:
            sock.close()
