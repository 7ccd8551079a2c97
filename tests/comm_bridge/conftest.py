"""Shared set-up for the bridge tests: endpoints that know each other, closed after the test."""

import pytest

from comm_bridge.channel import Endpoint

TOKEN = "test-token"


class ConnectedEndpoints:
    """Makes endpoints with each other in their address books; closes them (and anything
    else handed to `closing`, in reverse order) when the test ends, pass or fail."""

    def __init__(self):
        self._open = []

    def __call__(self, n: int = 2, token=TOKEN, **options) -> list[Endpoint]:
        endpoints = []
        for rank in range(n):
            endpoints.append(self.closing(Endpoint(rank, token, **options)))
        book = [endpoint.address() for endpoint in endpoints]
        for endpoint in endpoints:
            endpoint.add_peers(book)
        return endpoints

    def closing(self, thing):
        """Close `thing` (a socket, an endpoint, ...) at the end of the test."""
        self._open.append(thing)
        return thing

    def close_all(self) -> None:
        while self._open:
            self._open.pop().close()


@pytest.fixture
def connected_endpoints():
    """`connected_endpoints(n=2, token=TOKEN, **Endpoint options)` -> ranks 0..n-1, peered."""
    made = ConnectedEndpoints()
    yield made
    made.close_all()
