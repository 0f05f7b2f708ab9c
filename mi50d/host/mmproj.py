"""Whether a vision projector (`mmproj`) fits its model, from the two GGUF headers.

llama-server's multimodal library refuses a projector whose embeddings are not as wide as the
model's input ("mismatch between text model (n_embd = A) and mmproj (n_embd = B)", mtmd.cpp), so
the seed guide's Qwen3-VL-32B server with the 8B model's mmproj (4096 wide instead of 5120) can
never start. The widths are computed the way llama.cpp does, and only where it is known how:

- projector (clip.cpp, `clip_n_mmproj_embd`): for `qwen2vl_merger` and `qwen2.5vl_merger` the
  length of `mm.2.bias`; for `qwen3vl_merger` that times (1 + its deepstack layers), a deepstack
  layer being a vision layer with a `v.deepstack.N.fc1.weight` tensor. Qwen3-VL sends the main
  embedding and one per deepstack layer side by side in one vector.
- model (llama-hparams.cpp, `n_embd_inp`): `<arch>.embedding_length` times (1 + its deepstack
  layers). Only qwen3vl and qwen3vlmoe read `<arch>.n_deepstack_layers` (src/models/*.cpp); the
  granite models derive theirs from a mapping and gemma4-assistant sets its own input width, so
  those are not checked; every other architecture has none.

Other projector types are not checked (skip), rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mi50d.host.checks import Check, fail, ok, skip
from mi50d.host.ggufmeta import GGUFInfo

_MERGERS = frozenset({"qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger"})
_DEEPSTACK = re.compile(r"v\.deepstack\.(\d+)\.fc1\.weight")
_DEEPSTACK_ARCHS = frozenset({"qwen3vl", "qwen3vlmoe"})  # read <arch>.n_deepstack_layers
_OWN_INPUT_WIDTH = frozenset({"granite", "granite_swa", "gemma4-assistant"})


@dataclass(frozen=True)
class Width:
    total: int
    base: int
    deepstack: int

    def explain(self, what: str) -> str:
        return (f"{self.total} ({what} {self.base} x (1 + {self.deepstack} deepstack))"
                if self.deepstack else str(self.total))


def projector_type(mmproj: GGUFInfo) -> str | None:
    for key in ("clip.projector_type", "clip.vision.projector_type"):
        value = mmproj.metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def projector_width(mmproj: GGUFInfo) -> Width | None:
    """The width of the embeddings the projector makes, or None where mi50d does not know how
    llama.cpp computes it."""
    if projector_type(mmproj) not in _MERGERS:
        return None
    bias = next((t for t in mmproj.tensors if t.name == "mm.2.bias"), None)
    if bias is None or not bias.dims:
        return None
    blocks = mmproj.metadata.get("clip.vision.block_count")
    if not isinstance(blocks, int) or isinstance(blocks, bool):
        return None
    # clip.cpp looks for v.deepstack.N.* in each of the tower's blocks, N < block_count
    layers = sum(1 for t in mmproj.tensors
                 if (m := _DEEPSTACK.fullmatch(t.name)) and int(m.group(1)) < blocks)
    if projector_type(mmproj) != "qwen3vl_merger":
        layers = 0
    return Width(bias.dims[0] * (1 + layers), bias.dims[0], layers)


def model_width(model: GGUFInfo) -> Width | None:
    """The width of the embeddings the model takes in (llama_hparams::n_embd_inp)."""
    n_embd = model.arch_int("embedding_length")
    if not n_embd or model.architecture in _OWN_INPUT_WIDTH:
        return None
    layers = (model.arch_int("n_deepstack_layers") or 0
              if model.architecture in _DEEPSTACK_ARCHS else 0)
    return Width(n_embd * (1 + layers), n_embd, layers)


def projector_check(model: GGUFInfo, mmproj: GGUFInfo, mmproj_path: Path) -> Check:
    kind = projector_type(mmproj) or "unknown"
    made, taken = projector_width(mmproj), model_width(model)
    if made is None or taken is None:
        return skip("projector", f"{kind} projector: width not checked")
    if made.total == taken.total:
        return ok("projector", f"{kind} projector makes {made.total}-wide embeddings, as "
                  f"{model.path.name} takes")
    return fail("projector", f"{mmproj_path.name} makes {made.explain('width')}-wide "
                f"embeddings, but {model.path.name} ({model.architecture}) takes "
                f"{taken.explain('embedding_length')}: llama-server would refuse it "
                "(\"mismatch between text model and mmproj\"); a projector of another model size?",
                "set mmproj to the projector published with this model (same repository and "
                "size as the model file)")
