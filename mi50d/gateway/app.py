"""The gateway's aiohttp application: its routes, the error middleware and the handlers.

Handlers only carry out what the pure parts decide: `routing.resolve` picks the instance,
`OnDemand.admit` waits for it (starting or swapping it in), `proxy.forward` streams the answer.
The body is read once, up to `max_body_bytes` (413 past it), and decoded once to find `model`;
the bytes received are what llama-server gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mi50d.config import GatewayConfig, InstanceConfig
from mi50d.engine.supervisor import UnknownInstance
from mi50d.gateway import keys as keymod
from mi50d.gateway import routing
from mi50d.gateway.errors import GatewayError, bad_request, envelope, error_response, internal_error
from mi50d.gateway.instances import Instances
from mi50d.gateway.observer import Observer
from mi50d.gateway.ondemand import OnDemand
from mi50d.gateway.proxy import CLIENT_LEFT, UPSTREAM_BROKE, Exchange, forward, upstream_headers

log = logging.getLogger("mi50d.gateway.app")
# The code a cut answer is counted under (its client already got the upstream's status):
# nginx's 499 for a client that left, 502 for an upstream that broke off mid-answer.
CUT_CODES = {CLIENT_LEFT: 499, UPSTREAM_BROKE: 502}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health"})  # answered without an API key


class Gateway:
    """The request handlers and what they share."""

    def __init__(self, settings: GatewayConfig, instances: Instances, ondemand: OnDemand,
                 session: aiohttp.ClientSession, observer: Observer,
                 keys: frozenset[str] | None) -> None:
        self.settings = settings
        self.instances = instances
        self.ondemand = ondemand
        self.session = session
        self.observer = observer
        self.keys = keys
        self._upstream_keys: dict[tuple[Path, int], str | None] = {}

    def front_state(self) -> dict[str, Any]:
        """What a front process may route itself (mi50d.gateway.front): every model name and
        alias, and the instances open to new requests (up, and not being stopped by a swap or
        an idle unload), with their address and upstream key."""
        instances = self.instances.config.instances
        opened: dict[str, dict[str, Any]] = {}
        for name, conf in routing.served(instances).items():
            try:
                up = self.instances.is_up(name)
            except UnknownInstance:
                continue
            if up and not self.ondemand.activity(name).draining:
                opened[name] = {"url": conf.endpoint(), "model": conf.model_name,
                                "key": self._upstream_key(conf)}
        return {"routes": routing.names(instances), "open": opened,
                "keys": None if self.keys is None else sorted(self.keys)}

    # ---- handlers ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """The gateway's own health (an instance's is /upstream/NAME/health)."""
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: every routable instance under the name clients use, with its state."""
        data = []
        for name, conf in sorted(routing.served(self.instances.config.instances).items()):
            try:
                state = str(self.instances.state(name))
            except UnknownInstance:
                continue
            act = self.ondemand.activity(name)
            data.append({"id": conf.model_name, "object": "model", "created": 0,
                         "owned_by": "mi50d", "instance": name, "state": state,
                         "on_demand": conf.on_demand, "in_flight": act.in_flight})
        return web.json_response({"object": "list", "data": data})

    async def by_model(self, request: web.Request) -> web.StreamResponse:
        """`POST` to an OpenAI or llama-server route: the instance named by the body's `model`."""
        body = await self._body(request)
        model = model_of(body, self.instances.config.instances)
        conf = routing.resolve(self.instances.config.instances, model)
        return await self._serve(request, conf, request.path, body)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        """`/upstream/NAME/PATH`: anything, passed to one instance (its web UI, /props, /slots,
        /metrics); an on-demand instance is started for it."""
        conf = routing.resolve(self.instances.config.instances, request.match_info["name"])
        body = await self._body(request)
        return await self._serve(request, conf, "/" + request.match_info.get("tail", ""), body)

    # ---- the shared path ---------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        return await read_body(request, self.settings.max_body_bytes)

    async def _serve(self, request: web.Request, conf: InstanceConfig, path: str,
                     body: bytes) -> web.StreamResponse:
        model = conf.model_name
        exchange = Exchange()
        code = 500
        self.observer.request_started(model)
        try:
            async with self.ondemand.admit(conf):
                url = conf.endpoint() + path + (f"?{request.query_string}"
                                                if request.query_string else "")
                headers = upstream_headers(request.headers, self.keys is not None,
                                           self._upstream_key(conf))
                response = await forward(self.session, request, url, body, headers, exchange,
                                         f"{model} ({conf.endpoint()})")
            code = CUT_CODES.get(exchange.cut or "", exchange.status)
            return response
        except GatewayError as exc:
            code = exc.status
            raise
        except UnknownInstance:
            code = 503
            raise GatewayError(503, f"{model} was removed by a reload meanwhile",
                               "model_removed") from None
        except (asyncio.CancelledError, ConnectionError):
            code = 499  # the client left (nginx's number for it)
            raise
        finally:
            prompt, generated = exchange.tail.counts()
            self.observer.request_finished(
                model, code, time.monotonic() - exchange.began,
                exchange.first_chunk_s if exchange.streamed else None, prompt, generated)

    def _upstream_key(self, conf: InstanceConfig) -> str | None:
        """The instance's own llama-server key (its api_key_file), re-read when the file
        changes."""
        path = conf.api_key_file
        if path is None:
            return None
        try:
            stamp = (path, path.stat().st_mtime_ns)
        except OSError:
            return None
        if stamp not in self._upstream_keys:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            self._upstream_keys[stamp] = lines[0] if lines else None
        return self._upstream_keys[stamp]

    # ---- middleware --------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """API keys, and every error as an OpenAI envelope; a traceback only in the journal."""
        refused = key_refusal(self.keys, request)
        if refused is not None:
            return error_response(refused)
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response(envelope(exc.status, _http_message(request, exc),
                                              _http_code(exc.status)), status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("gateway_request_crashed method=%s path=%s", request.method,
                          request.path)
            return error_response(internal_error())


def key_refusal(keys: frozenset[str] | None, request: web.Request) -> GatewayError | None:
    """The 401 for a request without one of `keys` (None: no keys, or an open path)."""
    if keys is None or request.path in OPEN_PATHS or keymod.allowed(
            keys, keymod.presented_key(request.headers)):
        return None
    return GatewayError(401, "missing or wrong API key: send `Authorization: Bearer KEY` or "
                        "`X-Api-Key: KEY` with a key from [gateway] api_key_file",
                        "invalid_api_key")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, up to `limit` bytes (the application's client_max_size); 413 past it."""
    too_large = GatewayError(413, f"the request body is over max_body_bytes={limit}; raise "
                             "[gateway] max_body_bytes in mi50d.toml", "body_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


def model_of(body: bytes, instances: dict[str, InstanceConfig]) -> str:
    """The body's `model`, from one decoding of it; 400 with what to send otherwise."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the body is not JSON ({exc}); send a JSON object with \"model\" "
                          f"naming one of: {_known(instances)}") from None
    if not isinstance(doc, dict):
        raise bad_request(f"the body is JSON but not an object; send an object with \"model\" "
                          f"naming one of: {_known(instances)}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"the body has no \"model\" string; set it to one of: "
                          f"{_known(instances)}")
    return model


def _known(instances: dict[str, InstanceConfig]) -> str:
    """The model names there are, for an error message only (not worked out per request)."""
    models = routing.served(instances).values()
    return ", ".join(sorted({c.model_name for c in models})) or "none configured"


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return (f"no route {request.method} {request.path[:200]}; the gateway serves POST "
                f"{', '.join(routing.MODEL_ROUTES)}, GET /v1/models, /upstream/NAME/PATH and "
                "GET /health")
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path[:200]}; use POST"
    return f"{exc.status} {exc.reason}"


def make_app(gateway: Gateway, extra_routes: Sequence[web.RouteDef] = ()) -> web.Application:
    """The application: gateway routes plus `extra_routes` (e.g. /metrics), all behind the
    key check and the error middleware."""
    app = web.Application(middlewares=[gateway.middleware],
                          client_max_size=gateway.settings.max_body_bytes)
    routes = [web.get("/health", gateway.health), web.get("/v1/models", gateway.models)]
    routes += [web.post(path, gateway.by_model) for path in routing.MODEL_ROUTES]
    routes += [web.route("*", "/upstream/{name}", gateway.upstream),
               web.route("*", "/upstream/{name}/{tail:.*}", gateway.upstream)]
    app.add_routes([*routes, *extra_routes])
    return app
