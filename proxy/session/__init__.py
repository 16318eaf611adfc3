"""The parts of a client session: what it needs from the process (`host`), its states, and the
steps that run in each. `proxy.client.ClientSession` is the asyncio Protocol that ties them."""
