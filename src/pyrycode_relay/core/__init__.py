"""Pure relay logic: no sockets, no event loop, time only through an injected clock."""
