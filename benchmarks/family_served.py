"""NVLM-D, -X and -H served on CPU: time to first token at 1 and 7 tiles, same run, same machine.

    .venv/bin/python benchmarks/family_served.py [--requests 10] [--max-tokens 8] [--root DIR] [--json F]

Builds the three embedded defaults (same dimensions, random weights; bf16, reference target, fp32 vision) —
or reuses them under --root —, serves all three at once on the bundled tritonserver and sends the same
requests to each in turn, round-robin (D, X, H, D, X, H, …), so that the machine's drift falls on all three
alike: a 448×448 scene (1 tile) and a 1400×700 scene (7 tiles: 6 + thumbnail), one question, streamed,
concurrency 1. Prints TTFT median and mean per family and tile count, and each family's ratio to NVLM-D.
"""

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TILES = {1: (448, 448), 7: (1400, 700)}


def _build(root: Path, variant: str) -> Path:
    from builder.engine_build import DeploymentOptions, build_deployment
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.llm_formats import LLMBuildOptions, get_format

    out = root / f"build-{variant}"
    if not (out / "triton_repo").is_dir():
        ckpt = write_demo_checkpoint(root / f"ckpt-{variant}", variant=variant)
        build_deployment(ckpt, out, DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference",
                                                   vision_dtype="fp32", calib_size=4), force=True)
    return out


def main():
    from clients.triton_client import NVLMClient
    from runtime.scenes import synthetic_scene
    from triton_repo.server import TritonServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10, help="measured requests per family and tile count")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--root", type=Path, help="where the builds are (made there if missing)")
    ap.add_argument("--port", type=int, default=24300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp())
    families = ("d", "x", "h")
    builds = {v: _build(root, v) for v in families}
    images = {}
    for tiles, (w, h) in TILES.items():
        b = io.BytesIO()
        synthetic_scene(w, h, 11).save(b, format="PNG")
        images[tiles] = b.getvalue()
    servers, clients = [], {}
    try:
        for k, v in enumerate(families):
            port = args.port + 3 * k
            srv = TritonServer(builds[v] / "triton_repo", grpc_port=port, http_port=port + 1,
                               metrics_port=port + 2).start()
            servers.append(srv)
            clients[v] = NVLMClient(srv.grpc_url)
            clients[v].check()
        ttft = {(v, t): [] for v in families for t in TILES}
        for tiles in TILES:
            for i in range(args.warmup + args.requests):
                for v in families:
                    a = clients[v].generate("What shapes are in this picture?", [images[tiles]],
                                            max_tokens=args.max_tokens, stream=True)
                    if i >= args.warmup:
                        ttft[(v, tiles)].append(1000 * a.time_to_first_token)
    finally:
        for srv in servers:
            srv.stop()
    rows = []
    for tiles in TILES:
        base = statistics.median(ttft[("d", tiles)])
        for v in families:
            xs = ttft[(v, tiles)]
            rows.append({"family": f"nvlm-{v}", "tiles": tiles, "ttft_ms_median": statistics.median(xs),
                         "ttft_ms_mean": statistics.fmean(xs), "vs_d": statistics.median(xs) / base, "n": len(xs)})
    print(f"{'family':<8}{'tiles':>6}{'TTFT p50 ms':>13}{'mean ms':>10}{'vs D':>7}")
    for r in rows:
        print(f"{r['family']:<8}{r['tiles']:>6}{r['ttft_ms_median']:>13.1f}{r['ttft_ms_mean']:>10.1f}{r['vs_d']:>6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "family_served", "date": time.strftime("%Y-%m-%d"),
                                         "requests": args.requests, "max_tokens": args.max_tokens, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
