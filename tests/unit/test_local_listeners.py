"""Reading who listens on a port from the kernel's /proc/net tables (the local executor's ownership check)."""

from __future__ import annotations

import pytest

from reactor.executors.local import listening_inodes

pytestmark = pytest.mark.unit

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 506026 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 506100 1 0 20 4 30 10 -1
   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1088 1 0 100 0 0 10 0
   3: 0100007F:1F90 0100007F:C351 06 00000000:00000000 03:00000D8F 00000000     0        0 0 3 0
"""
ANY6 = "0" * 32
TCP6 = (
    "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode\n"
    f"   0: {ANY6}:1F90 {ANY6}:0000 0A 00000000:00000000 00:00000000 00000000 0 0 77 1\n"
)


def test_only_listening_sockets_on_the_port_count() -> None:
    """Port 8080 (1F90): the LISTEN row counts; an established connection or a TIME_WAIT on it does not."""
    assert listening_inodes(TCP, 8080) == {"506026"}
    assert listening_inodes(TCP, 8081) == {"1088"}
    assert listening_inodes(TCP, 80) == set()


def test_ipv6_listeners_count_too() -> None:
    assert listening_inodes(TCP6, 8080) == {"77"}


def test_a_malformed_table_is_no_listener() -> None:
    assert listening_inodes("header only\n", 8080) == set()
    assert listening_inodes("h\n 0: short row\n", 8080) == set()
