"""One timed torch.compile run, as a separate process would see it. Used by `castore demo` and the benchmarks.

    python -m castore.torch.demo_model --model transformer --mode train [--castore]

Prints one JSON line: seconds from interpreter start to the first compiled output, the compile part alone,
PyTorch's cache counters, castore's counters and how many times a C++ compiler ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

_T_START = time.time()


def build(model: str, mode: str, device: str):  # noqa: ANN201
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model == "transformer":
        layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, batch_first=True, dropout=0.0)
        net = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        example = torch.randn(4, 32, 128)
    elif model == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        example = torch.randn(8, 3, 32, 32)
    elif model == "mlp":
        net = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256)) for _ in range(3)])
        example = torch.randn(32, 256)
    else:
        raise SystemExit(f"unknown model {model!r}")
    net = net.to(device)
    example = example.to(device)
    if mode == "train":
        net.train()
    else:
        net.eval()
    return net, example


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="transformer", choices=["transformer", "cnn", "mlp"])
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--castore", action="store_true", help="serve the caches from castore (castore.torch.install())")
    args = parser.parse_args(argv)

    import torch

    session = None
    if args.castore:
        import castore.torch

        session = castore.torch.install()
    t_ready = time.time()
    net, example = build(args.model, args.mode, args.device)
    compiled = torch.compile(net)
    t_compile = time.time()
    if args.mode == "train":
        out = compiled(example)
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        digest_src = [out.detach()] + grads
    else:
        with torch.no_grad():
            out = compiled(example)
        digest_src = [out]
    if args.device != "cpu":
        torch.cuda.synchronize()
    t_first = time.time()

    from torch._dynamo.utils import counters

    h = hashlib.sha256()
    for t in digest_src:
        h.update(t.detach().float().cpu().numpy().round(4).tobytes())
    result = {
        "model": args.model,
        "mode": args.mode,
        "seconds_to_first_output": round(t_first - _T_START, 3),
        "seconds_compile": round(t_first - t_compile, 3),
        "seconds_import": round(t_ready - _T_START, 3),
        "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
        "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
        "output_digest": h.hexdigest()[:16],
    }
    if session is not None:
        import castore.torch
        from castore.torch import artifacts

        session.flush(session.config.flush_timeout)
        result["compiler_runs"] = artifacts.compiler_runs
        result["castore"] = castore.torch.stats()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
