"""Compile a small function with castore installed and exit at once (the CI prewarm job's shape).

Prints, before it exits, ``WROTE {json}``: every (castore cache, castore key) this process queued for the store,
and PyTorch's FX / AOTAutograd cache counters. It neither flushes nor closes: the interpreter's exit must.

COMPILE_AND_EXIT_VARIANT=n sets a Triton-only Inductor setting, which PyTorch's FX and AOTAutograd keys hash and CPU
code ignores: each variant writes entries of its own, while the C++ kernel, header and ISA probes are shared.
"""

from __future__ import annotations

import json
import os

import torch
import torch._inductor.config

import castore.torch
from castore.torch.session import castore_key

torch._inductor.config.triton.spill_threshold = 16 + int(os.environ.get("COMPILE_AND_EXIT_VARIANT", "0"))
session = castore.torch.install()
queued: list[tuple[str, str]] = []
_put = session.put


def recording_put(cache: str, key: str, data: bytes, meta: dict[str, object] | None = None) -> None:
    queued.append((cache, castore_key(key)))
    _put(cache, key, data, meta)


session.put = recording_put  # type: ignore[method-assign]



def fn(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sin() + x


x = torch.randn(64, requires_grad=True)
torch.compile(fn)(x).sum().backward()

from torch._dynamo.utils import counters  # noqa: E402

print(
    "WROTE "
    + json.dumps(
        {
            "queued": queued,
            "namespace": session.namespace,
            "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_saved": counters["aot_autograd"]["autograd_cache_saved"],
        }
    ),
    flush=True,
)
