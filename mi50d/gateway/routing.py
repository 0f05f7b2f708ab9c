"""Which instance a request is for: a pure function of the configured instances.

A request's `model` names an instance by its name or its `alias` (config.load_config refuses an
alias that names two instances). Matching is exact: clients echo back what `/v1/models` lists.
"""

from __future__ import annotations

from collections.abc import Mapping

from mi50d.config import InstanceConfig
from mi50d.gateway.errors import GatewayError

# The routes whose JSON body names the model (llama-server's own and the OpenAI/Anthropic ones).
MODEL_ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/v1/rerank", "/completion", "/infill", "/tokenize", "/detokenize",
    "/apply-template",
)


def served(instances: Mapping[str, InstanceConfig]) -> dict[str, InstanceConfig]:
    """The instances that serve a model: every one but the rpc-workers (which serve devices to
    llama-server, not requests to clients)."""
    return {name: inst for name, inst in instances.items() if not inst.is_worker}


def names(instances: Mapping[str, InstanceConfig]) -> dict[str, str]:
    """{model name or alias: instance name} for every instance that serves a model."""
    models = served(instances)
    table = {name: name for name in models}
    for name, inst in models.items():
        if inst.alias:
            table.setdefault(inst.alias, name)
    return table


def resolve(instances: Mapping[str, InstanceConfig], model: str) -> InstanceConfig:
    """The instance `model` names; a 404 naming the models there are otherwise."""
    name = names(instances).get(model)
    if name is None:
        known = ", ".join(sorted({i.model_name for i in served(instances).values()})) or "none"
        raise GatewayError(404, f"model {model[:200]!r} is not served here; the models are: "
                           f"{known} (GET /v1/models lists them)", "model_not_found")
    return instances[name]
