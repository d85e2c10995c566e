"""Pure domain logic: node state transitions, batch planning, pacing decisions. No I/O here."""
