"""The HTTP front door: one OpenAI-compatible endpoint for every instance.

Owns routing a request's `model` to an instance (`routing`), starting on-demand instances and
swapping them by VRAM (`plan`, pure; `ondemand`, which carries plans out), streaming proxying
(`proxy`), API keys (`keys`), the OpenAI error envelope (`errors`), the aiohttp application
(`app`) and its lifetime in the daemon (`service`), the hook metrics attach to (`observer`),
and the one adapter to the engine (`instances`).

May import: mi50d.engine, mi50d.host, mi50d.config, mi50d.control.protocol; never mi50d.daemon or
mi50d.cli (the daemon wires the gateway in, not the other way round).
"""
