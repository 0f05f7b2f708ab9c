"""The gateway's pure parts: its configuration keys, routing, API keys and token counting."""

from __future__ import annotations

from pathlib import Path

import pytest

from mi50d.config import ConfigError, listen_address, load_config
from mi50d.gateway import routing
from mi50d.gateway.app import model_of
from mi50d.gateway.errors import GatewayError
from mi50d.gateway.keys import allowed, load_keys, presented_key
from mi50d.gateway.observer import TAIL_BYTES, TokenTail
from tests.support import write_config


def _config(tmp_path: Path, gateway: dict[str, object] | None = None,
            **instances: dict[str, object]) -> Path:
    daemon: dict[str, object] = {"gateway": gateway} if gateway is not None else {}
    return write_config(tmp_path, daemon, {
        name: {"model": "/m.gguf", "port": 9000 + i, **extra}
        for i, (name, extra) in enumerate(instances.items())})


def test_defaults_and_shipped_gateway(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, a={}))
    gw = config.daemon.gateway
    assert (gw.listen, gw.max_queue, gw.swap_wait_s, gw.max_body_bytes) == ("", 64, 120.0,
                                                                             64 << 20)
    inst = config.instances["a"]
    assert inst.on_demand is False and inst.idle_unload_s is None
    argv = inst.argv(config.daemon)
    assert argv[argv.index("--alias") + 1] == "a"  # always named
    shipped = load_config(Path(__file__).parents[1] / "etc" / "mi50d")
    assert shipped.daemon.gateway.address() == ("127.0.0.1", 8070)


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:8070", ("127.0.0.1", 8070)), ("[::1]:8070", ("::1", 8070)),
    ("0.0.0.0:1", ("0.0.0.0", 1)), ("localhost:65535", ("localhost", 65535)),
    ("8070", None), (":8070", None), ("host:", None), ("host:70000", None), ("h:x1", None)])
def test_listen_address(text: str, address: tuple[str, int] | None) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize(("gateway", "instances", "problem"), [
    ({"listen": "8070"}, {"a": {}}, "mi50d.toml: gateway.listen: '8070' is not HOST:PORT"),
    ({"max_queue": -1}, {"a": {}}, "gateway.max_queue: Input should be greater than or equal"),
    ({"max_body_bytes": 10}, {"a": {}}, "gateway.max_body_bytes"),
    ({"listn": "x"}, {"a": {}}, "gateway.listn: unknown key; did you mean 'listen'?"),
    ({}, {"a": {"idle_unload_s": 5}}, "a.toml: idle_unload_s: only on_demand instances"),
    ({}, {"a": {"on_demand": True, "idle_unload_s": 0}}, "a.toml: idle_unload_s: Input should "
     "be greater than 0"),
    ({}, {"a": {"alias": "x"}, "b": {"alias": "x"}}, "b.toml: alias: 'x' already names "
     "instance a"),
    ({}, {"a": {}, "b": {"alias": "a"}}, "b.toml: alias: 'a' already names instance a"),
])
def test_bad_gateway_keys_name_file_key_and_fix(tmp_path: Path, gateway: dict[str, object],
                                                instances: dict[str, dict[str, object]],
                                                problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, gateway, **instances))
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_routing_by_name_and_alias(tmp_path: Path) -> None:
    instances = load_config(_config(tmp_path, a={"alias": "alpha"}, b={})).instances
    assert routing.names(instances) == {"a": "a", "alpha": "a", "b": "b"}
    assert routing.resolve(instances, "alpha").name == "a"
    assert routing.resolve(instances, "b").model_name == "b"
    with pytest.raises(GatewayError) as info:
        routing.resolve(instances, "Alpha")  # exact: what /v1/models lists
    assert info.value.status == 404 and "the models are: alpha, b" in info.value.message


def test_model_is_read_from_the_body(tmp_path: Path) -> None:
    instances = load_config(_config(tmp_path, a={})).instances
    assert model_of(b'{"messages": [], "model": "a"}', instances) == "a"
    for body, words in ((b"", "not JSON"), (b"[1]", "not an object"), (b"{}", 'no "model"'),
                        (b'{"model": ""}', 'no "model"'), (b"\xff", "not JSON")):
        with pytest.raises(GatewayError, match=words) as info:
            model_of(body, instances)
        assert info.value.status == 400 and "one of: a" in info.value.message


def test_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("  one \n# not a key\n\ntwo\n")
    keys = load_keys(path)
    assert keys == {"one", "two"}
    assert presented_key({"Authorization": "Bearer two"}) == "two"
    assert presented_key({"authorization": "bearer two"}.__class__(
        {"Authorization": "bearer  two"})) == "two"
    assert presented_key({"X-Api-Key": "one"}) == "one"
    assert presented_key({"Authorization": "Basic b25l"}) is None
    assert allowed(keys, "one") and not allowed(keys, "on") and not allowed(keys, None)
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_keys(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(tmp_path / "absent")


def test_token_counts_come_from_the_tail_of_the_answer() -> None:
    tail = TokenTail()
    for _ in range(1000):  # a long stream of chunks; only the end is kept
        tail.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    tail.feed(b'data: {"choices":[],"usage":{"completion_tokens":483,"prompt_tokens":29}}\n\n')
    assert tail.counts() == (29, 483)
    timings = TokenTail()
    timings.feed(b'{"timings":{"prompt_n":7,"predicted_n":12}}')
    assert timings.counts() == (7, 12)
    big = TokenTail()
    big.feed(b'{"usage":{"prompt_tokens":1}}' + b" " * (2 * TAIL_BYTES))
    assert big.counts() == (None, None)  # bounded: what fell out of the tail is not read
