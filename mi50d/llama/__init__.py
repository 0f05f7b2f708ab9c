"""llama.cpp tooling: building llama-server (`build`, behind `mi50ctl build-llama`), getting its
source from the PyPI sdist (`source`), generating tiny GGUF models for tests and the demo
(`tinymodel`), and the demo's setup (`demo`).

May import: `mi50d.host` (the KFD topology, for the GPU targets) and `mi50d.config`. Nothing in
the daemon imports this package.
"""
