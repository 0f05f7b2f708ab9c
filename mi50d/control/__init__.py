"""The control plane: the Unix socket server (`server`), one handler per command (`handlers`), the
wire format shared with mi50ctl (`protocol`), and what the handlers need of the daemon (`view`).

`protocol` is a leaf: it imports only pydantic, so `mi50ctl` imports it (and this package's
empty `__init__`) and nothing else of mi50d. The rest may import `mi50d.engine`, `mi50d.host`
and `mi50d.config`; never `mi50d.daemon` or `mi50d.cli`.
"""
