"""GPU check: run the Triton tiling kernels for real, against their references, and time them.

One prepared run for a lent H100 (installs nothing; needs torch + triton with CUDA):

    scripts/gpu_check.sh            # → $OUT/gpu_check.md and gpu_check.json (or docs/gpu/)

For each test image it checks, on the GPU:
  - uint8 tiles equal Pillow's (bit for bit), fp32/fp16 tiles equal the CPU reference exactly,
    bf16 equals the reference rounded to nearest even;
and times (CUDA events, median of N after warm-up):
  - the fused GPU tiling (grid + thumbnail resizes, crop, normalize, layout), fp16 out,
  - the CPU reference (Pillow) and the CPU fast path on the same image,
  - a torch GPU baseline (F.interpolate bicubic + antialias, crop, normalize): fast but NOT
    Pillow's function — its max deviation from the reference is reported to show why,
  - the normalize-and-layout kernel (the TensorRT plugin's) vs the same computation in torch,
reporting achieved bandwidth as a fraction of the measured device-to-device copy bandwidth.

Then the reference runtime (`--runtime`, on by default) on the embedded default checkpoint: the
NVLM-D reference model (InternViT + mlp1 + transformers' Qwen2) moved to the GPU in fp32 and bf16,
checked against the CPU fp32 model on fresh random tiles — logits of a 7-tile prompt (relative to
max |logit|: ≤ 1e-3 fp32 with TF32 off, ≤ 5e-2 bf16) and greedy tokens (fp32: equal) — and timed:
vision encoder per tile count, prefill of the 7-tile prompt, decode per token, GPU vs CPU. The demo
model is tiny, so GPU times are launch-bound; the figures show the harness works on the GPU and
what the CPU reference costs, not NVLM-D-72B speed. (The TensorRT-LLM checkpoint's reference
executor is CPU code and is not moved.)

Then the gated cross-attention kernel (plugins/xattn_kernels.py, for NVLM-X/H): parity against its
definition and against scaled_dot_product_attention with a dense mask, fp16 and bf16, and times at
NVLM-X-72B shapes as a fraction of the bandwidth or FLOP bound (`check_xattn`).

`--self-test` runs the correctness parts on a tiny image under TRITON_INTERPRET=1 (CPU; the
runtime part compares CPU bf16 against CPU fp32 with 2 tiles), so the script is exercised by the
test suite and does not rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timer(device):
    import torch

    if device.type == "cuda":
        def run(fn, repeats):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats):
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def copy_bandwidth(device, timer) -> float:
    import torch

    n = 1 << 28 if device.type == "cuda" else 1 << 22
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 10)
    return 2 * n / t  # read + write bytes per second


def torch_baseline(img, cols, rows, s, mean, std):
    """GPU tiling with torch's bicubic: what one would write without Pillow-exact kernels."""
    import torch
    import torch.nn.functional as F

    x = img.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
    big = F.interpolate(x, size=(s * rows, s * cols), mode="bicubic", antialias=True, align_corners=False)
    big = big.round().clamp(0, 255)
    tiles = big.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)  # [T, 3, S, S]
    if rows * cols > 1:
        thumb = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
        tiles = torch.cat([tiles, thumb])
    m = torch.tensor(mean, device=img.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=img.device).view(1, 3, 1, 1)
    return ((tiles / 255.0 - m) / sd).half()


def check_image(w, h, device, timer, repeats, copy_bw, seed):
    import numpy as np
    import torch
    from PIL import Image

    from plugins.tiling import normalize_tiles, tile_image
    from runtime.preprocess import default_config, preprocess_image, preprocess_image_fast, tile_images

    cfg = default_config()
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(a)
    ref = preprocess_image(pil)
    ref_t = torch.from_numpy(ref.pixel_values)
    img = torch.from_numpy(a).to(device)

    u8, grid = tile_image(img, cfg, "uint8")
    pillow_tiles = np.stack([np.asarray(t) for t in tile_images(pil, cfg)[0]])
    checks = {
        "grid_equal": grid == ref.grid,
        "uint8_equals_pillow": bool(np.array_equal(u8.cpu().numpy(), pillow_tiles)),
        "fp32_equals_reference": bool(torch.equal(tile_image(img, cfg, "fp32")[0].cpu(), ref_t)),
        "fp16_equals_reference": bool(torch.equal(tile_image(img, cfg, "fp16")[0].cpu(), ref_t.half())),
        "bf16_equals_reference_rne": bool(torch.equal(tile_image(img, cfg, "bf16")[0].cpu(), ref_t.bfloat16())),
        "normalize_equals_reference": bool(torch.equal(normalize_tiles(u8.contiguous(), cfg, "fp32").cpu(), ref_t)),
    }
    if device.type == "cpu":  # the interpreter truncates fp32 → bf16; only the GPU result is meaningful
        checks.pop("bf16_equals_reference_rne")
    t_tiles = ref.num_tiles
    cols, rows = grid
    base = torch_baseline(img, cols, rows, cfg.image_size, cfg.mean, cfg.std)
    torch_dev = float((base.float().cpu() - ref_t).abs().max())

    timing = {}
    if timer is not None:
        s = cfg.image_size
        t_gpu = timer(lambda: tile_image(img, cfg, "fp16"), repeats)
        t_torch = timer(lambda: torch_baseline(img, cols, rows, s, cfg.mean, cfg.std), repeats)
        t0 = time.perf_counter()
        for _ in range(3):
            preprocess_image(pil)
        t_pillow = (time.perf_counter() - t0) / 3
        t0 = time.perf_counter()
        for _ in range(3):
            preprocess_image_fast(pil)
        t_fast = (time.perf_counter() - t0) / 3
        # bytes: each of the (1 or 2) resizes reads the source once, writes + reads its uint8
        # intermediate; the output is written once in fp16.
        resizes = [(s * cols, s * rows)] + ([(s, s)] if t_tiles > 1 else [])
        moved = sum(h * w * 3 + 2 * h * ow * 3 for ow, _ in resizes) + t_tiles * 3 * s * s * 2
        u8c = u8.contiguous()
        t_norm = timer(lambda: normalize_tiles(u8c, cfg, "fp16"), repeats)
        mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        t_norm_torch = timer(lambda: ((u8c.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).half(), repeats)
        norm_bytes = u8c.numel() * (1 + 2)
        timing = {
            "gpu_tiling_ms": t_gpu * 1e3, "torch_bicubic_gpu_ms": t_torch * 1e3,
            "pillow_reference_cpu_ms": t_pillow * 1e3, "fast_path_cpu_ms": t_fast * 1e3,
            "speedup_vs_pillow": t_pillow / t_gpu, "speedup_vs_torch_gpu": t_torch / t_gpu,
            "gpu_tiling_bytes": moved, "gpu_tiling_bw_fraction_of_copy": moved / t_gpu / copy_bw,
            "normalize_kernel_us": t_norm * 1e6, "normalize_torch_us": t_norm_torch * 1e6,
            "normalize_bw_fraction_of_copy": norm_bytes / t_norm / copy_bw,
        }
    return {"size": f"{w}x{h}", "tiles": t_tiles, "grid": list(grid), "checks": checks,
            "torch_bicubic_max_abs_dev_from_reference": torch_dev, **timing}


def check_runtime(device, timer, repeats: int, seed: int, self_test: bool) -> dict:
    """The reference NVLM-D on `device` (fp32 and bf16) against the CPU fp32 model, and timings."""

    import torch

    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.families import family_for
    from runtime.prompt import build_prompt
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    tmp = Path(tempfile.mkdtemp(prefix="nvlm-gpu-check-"))
    write_demo_checkpoint(tmp / "ckpt")
    tok = NVLMTokenizer.from_dir(tmp / "ckpt")
    cpu = reference_model(tmp / "ckpt")
    cfg = cpu.cfg
    s = cfg.preprocess.image_size
    tiles = 2 if self_test else 7
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(tiles, 3, s, s, generator=gen)  # [T, 3, S, S], normalized-tile statistics
    prompt = build_prompt(tok, "<image>\nDescribe the picture.", [tiles], tokens_per_tile=cfg.preprocess.tokens_per_tile,
                          layout=family_for(cfg).prompt_layout)
    ids = torch.tensor([prompt.input_ids])  # [1, L]
    pad = tok.image_pad_id
    new_tokens = 4 if self_test else 32
    ref_logits = cpu.logits(ids, pixels, image_token_id=pad)[0]  # [L, vocab]
    ref_tokens = cpu.generate(prompt.input_ids, pixels, image_token_id=pad, max_new_tokens=new_tokens,
                              eos_token_id=None).tokens
    scale = float(ref_logits.abs().max())
    variants = {"fp32": (torch.float32, 1e-3), "bf16": (torch.bfloat16, 5e-2)}
    if self_test:  # on the CPU only the bf16 copy differs from the reference
        variants.pop("fp32")
    out = {"prompt_tokens": len(prompt.input_ids), "tiles": tiles, "new_tokens": new_tokens, "checks": {}}
    models = {}
    for name, (dtype, tol) in variants.items():
        m = reference_model(tmp / "ckpt", dtype=dtype).to(device)
        models[name] = m
        logits = m.logits(ids.to(device), pixels.to(device, dtype), image_token_id=pad)[0].float().cpu()
        err = float((logits - ref_logits).abs().max()) / scale
        out[f"{name}_max_rel_logit_err"] = err
        out["checks"][f"{name}_logits_within_{tol:g}"] = err <= tol
        toks = m.generate(prompt.input_ids, pixels.to(device, dtype), image_token_id=pad, max_new_tokens=new_tokens,
                          eos_token_id=None).tokens
        agree = sum(a == b for a, b in zip(toks, ref_tokens)) / len(ref_tokens)
        out[f"{name}_greedy_token_agreement"] = agree
        if name == "fp32":
            out["checks"]["fp32_greedy_tokens_equal"] = toks == ref_tokens
    if timer is None:
        return out
    timing = {}
    cpu_timer = _timer(torch.device("cpu"))
    for t in (1, tiles):
        px = pixels[:t]
        with torch.no_grad():
            timing[f"vision_{t}_tiles_cpu_fp32_ms"] = cpu_timer(lambda: cpu.encode_tiles(px), 3) * 1e3
            for name, m in models.items():
                pxd = px.to(device, m.dtype)
                timing[f"vision_{t}_tiles_{device.type}_{name}_ms"] = timer(lambda: m.encode_tiles(pxd), repeats) * 1e3
    timing["prefill_cpu_fp32_ms"] = cpu_timer(lambda: cpu.logits(ids, pixels, image_token_id=pad), 3) * 1e3
    gen_cpu = cpu_timer(lambda: cpu.generate(prompt.input_ids, pixels, image_token_id=pad,
                                             max_new_tokens=new_tokens, eos_token_id=None), 2)
    timing["decode_per_token_cpu_fp32_ms"] = (gen_cpu * 1e3 - timing["prefill_cpu_fp32_ms"]) / (new_tokens - 1)
    for name, m in models.items():
        idsd, pxd = ids.to(device), pixels.to(device, m.dtype)
        pre = timer(lambda: m.logits(idsd, pxd, image_token_id=pad), repeats) * 1e3
        full = timer(lambda: m.generate(prompt.input_ids, pxd, image_token_id=pad, max_new_tokens=new_tokens,
                                        eos_token_id=None), max(3, repeats // 4)) * 1e3
        timing[f"prefill_{device.type}_{name}_ms"] = pre
        timing[f"decode_per_token_{device.type}_{name}_ms"] = (full - pre) / (new_tokens - 1)
    out["timing"] = timing
    return out


def check_trt_serving(work: Path, seed: int) -> dict:
    """Where TensorRT-LLM (with trtllm-build) and NGC's tritonserver are present: for each embedded default
    (NVLM-D; NVLM-X and NVLM-H, whose LLM engines come from builder/trtllm_nvlm.py and have never been built
    before), build its engines (bf16, the trt target), serve the real trt repository and send one text and one
    image request; greedy tokens and their log-probs are compared with the reference target's in-process
    pipeline (log-probs because the random defaults' tokens hardly depend on the image). Elsewhere: skipped,
    with the reason. One family's failure is recorded and the next one still runs."""
    from runtime.core.gpu_host import detect

    cap = detect()
    server_bin = Path("/opt/tritonserver/bin/tritonserver")
    if not cap.can_build or not server_bin.is_file():
        return {"skipped": f"{cap.detail}; tritonserver {'present' if server_bin.is_file() else 'absent'}"}
    out = {}
    for variant in ("d", "x", "h"):
        try:
            out[variant] = _serve_one(work / variant, variant, seed, server_bin)
        except Exception as e:  # noqa: BLE001 — the report says what failed; the next family still runs
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:2000], "passed": False}
    out["passed"] = all(v.get("passed", False) for v in out.values())
    return out


LOG_PROB_TOLERANCE = 0.05  # bf16 engine against the float32 reference executor, per generated token


def _serve_one(work: Path, variant: str, seed: int, server_bin: Path) -> dict:
    import shutil
    import subprocess

    from clients.triton_client import NVLMClient
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.local_pipeline import LocalPipeline

    ckpt, build = work / "ckpt", work / "build"
    shutil.rmtree(work, ignore_errors=True)
    write_demo_checkpoint(ckpt, seed=seed, variant=variant)
    subprocess.run([sys.executable, "-m", "builder.cli", "engine", str(ckpt), "-o", str(build), "--quant", "bf16",
                    "--vision-dtype", "fp32", "--target", "trt", "--calib-size", "4"], check=True)
    # the entry model streams to the LLM step through the server's own gRPC port (triton_repo/llm_link.py)
    env = {**os.environ, "NVLM_TRITON_GRPC_URL": "127.0.0.1:18001"}
    proc = subprocess.Popen([str(server_bin), f"--model-repository={build / 'triton_repo'}", "--grpc-port=18001",
                             "--http-port=18000", "--metrics-port=18002", "--disable-auto-complete-config"],
                            start_new_session=True, env=env)
    try:
        client = NVLMClient("127.0.0.1:18001", timeout=300)
        deadline = time.time() + 600
        while True:
            try:
                client.check()
                break
            except Exception:  # noqa: BLE001 — loading engines
                if time.time() > deadline or proc.poll() is not None:
                    return {"error": "tritonserver did not become ready", "passed": False}
                time.sleep(2)
        local = LocalPipeline(build, max_images=1)
        image = ROOT / "assets" / "demo_scene.png"
        out = {}
        for name, prompt, images in (("text", "Write one sentence about the sea.", []),
                                     ("image", "What shapes are in this picture?", [image])):
            served = client.generate(prompt, images, max_tokens=16, return_log_probs=True)
            want = local.run(prompt, [p.read_bytes() for p in images], 16, return_log_probs=True)
            worst = max((abs(a - b) for a, b in zip(served.log_probs, want.log_probs)), default=0.0)
            out[name] = {"served": served.tokens, "reference": want.tokens, "equal": served.tokens == want.tokens,
                         "max_log_prob_diff": worst, "seconds": served.seconds}
        out["passed"] = all(v["equal"] and v["max_log_prob_diff"] <= LOG_PROB_TOLERANCE for v in out.values())
        return out
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)


def check_xattn(device, timer, repeats: int, seed: int, self_test: bool, copy_bw: float) -> dict:
    """The gated cross-attention kernel (plugins/xattn_kernels.py) against its float32 definition and
    against scaled_dot_product_attention with a dense mask, timed at NVLM-X-72B shapes (64 heads, 8 KV
    heads, head 128; prefill: 2,048 queries × 7 tiles of 256 keys; decode: batch 64), each as a fraction
    of its HBM-bandwidth bound (bytes / measured copy bandwidth) or bf16 FLOP bound (989 TFLOP/s dense,
    H100 SXM) — whichever is larger. The self-test runs tiny shapes under the interpreter."""
    import math

    import torch

    from plugins.xattn_kernels import gated_cross_attention, gated_cross_attention_reference

    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dim, tile, tiles = (4, 2, 16, 16, 3) if self_test else (64, 8, 128, 256, 7)
    n_prefill, batch = (24, 3) if self_test else (2048, 64)
    out = {"shapes": {"heads": hq, "kv_heads": hkv, "head": dim, "keys_per_tile": tile, "tiles": tiles,
                      "prefill_queries": n_prefill, "decode_batch": batch}, "checks": {}, "timing": {}}
    tol = {"fp16": 4e-3, "bf16": 3e-2}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        keys = tiles * tile
        # prefill: the tags of the 7 tiles see their tile, later text sees all, the first 4 tokens see none
        lo = torch.zeros(n_prefill, dtype=torch.int32)
        hi = torch.full((n_prefill,), keys, dtype=torch.int32)
        hi[:4] = 0
        for k in range(tiles):
            lo[4 + k], hi[4 + k] = k * tile, (k + 1) * tile
        q = torch.randn(n_prefill, hq, dim, generator=gen).to(dt).to(device)
        kk = torch.randn(keys, hkv, dim, generator=gen).to(dt).to(device)
        vv = torch.randn(keys, hkv, dim, generator=gen).to(dt).to(device)
        lo_d, hi_d = lo.to(device), hi.to(device)
        got = gated_cross_attention(q, kk, vv, lo_d, hi_d, 0.8, block_m=16 if self_test else None,
                                    block_n=16 if self_test else None)
        sample = torch.arange(0, n_prefill, max(1, n_prefill // 64))  # the definition is slow: every 32nd row
        ref = gated_cross_attention_reference(q[sample].cpu(), kk.cpu(), vv.cpu(), lo[sample], hi[sample], 0.8)
        out["checks"][f"prefill_{name}_vs_definition"] = (got[sample].float().cpu() - ref).abs().max().item() <= tol[name]
        out["checks"][f"prefill_{name}_empty_rows_zero"] = bool((got[:4] == 0).all())
        n = torch.arange(keys, device=device)
        mask = (n[None, :] >= lo_d[:, None]) & (n[None, :] < hi_d[:, None])
        rows = mask.any(1)
        g = hq // hkv

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None, :, rows], kk.repeat_interleave(g, 1).transpose(0, 1)[None],
                vv.repeat_interleave(g, 1).transpose(0, 1)[None], attn_mask=mask[rows])[0].transpose(0, 1)

        dense = sdpa().float() * math.tanh(0.8)
        out["checks"][f"prefill_{name}_vs_sdpa"] = (got[rows].float() - dense).abs().max().item() <= tol[name]
        # decode: one query per sequence, each with its own 7 tiles, packed
        qd = torch.randn(batch, hq, dim, generator=gen).to(dt).to(device)
        kd = torch.randn(batch * keys, hkv, dim, generator=gen).to(dt).to(device)
        vd = torch.randn(batch * keys, hkv, dim, generator=gen).to(dt).to(device)
        lod = (torch.arange(batch, dtype=torch.int32) * keys).to(device)
        hid = lod + keys
        gotd = gated_cross_attention(qd, kd, vd, lod, hid, -0.5, decode=True, block_n=16 if self_test else None)
        refd = gated_cross_attention_reference(qd[:4].cpu(), kd.cpu(), vd.cpu(), lod[:4].cpu(), hid[:4].cpu(), -0.5)
        out["checks"][f"decode_{name}_vs_definition"] = (gotd[:4].float().cpu() - refd).abs().max().item() <= tol[name]
        if timer is None:
            continue
        reps = 2 if self_test else repeats
        el = 2  # bytes per element
        t_pre = timer(lambda: gated_cross_attention(q, kk, vv, lo_d, hi_d, 0.8), reps)
        t_sdpa = timer(sdpa, reps)
        flops = 4 * int(rows.sum()) * hq * dim * keys
        bytes_pre = el * (2 * q.numel() + kk.numel() + vv.numel())
        bound_pre = max(bytes_pre / copy_bw, flops / 989e12)
        t_dec = timer(lambda: gated_cross_attention(qd, kd, vd, lod, hid, -0.5, decode=True), reps)

        def sdpa_dec():
            return torch.nn.functional.scaled_dot_product_attention(
                qd[:, :, None], kd.view(batch, keys, hkv, dim).repeat_interleave(g, 2).permute(0, 2, 1, 3),
                vd.view(batch, keys, hkv, dim).repeat_interleave(g, 2).permute(0, 2, 1, 3))

        t_sdpa_dec = timer(sdpa_dec, reps)
        bytes_dec = el * (2 * qd.numel() + kd.numel() + vd.numel())
        out["timing"].update({
            f"prefill_{name}_kernel_ms": t_pre * 1e3, f"prefill_{name}_sdpa_dense_mask_ms": t_sdpa * 1e3,
            f"prefill_{name}_fraction_of_bound": bound_pre / t_pre,
            f"decode_{name}_kernel_ms": t_dec * 1e3, f"decode_{name}_sdpa_ms": t_sdpa_dec * 1e3,
            f"decode_{name}_fraction_of_hbm_bound": bytes_dec / copy_bw / t_dec})
    return out


def write_report(result, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"# GPU check — {result['device']} — {result['date']}", "",
             f"device-to-device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s", "",
             "| image | tiles | checks | GPU tiling ms | Pillow CPU ms | fast CPU ms | torch-bicubic GPU ms | "
             "×Pillow | BW / copy | normalize µs (torch µs) | torch bicubic max dev |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["images"]:
        ok = "all pass" if all(r["checks"].values()) else ", ".join(k for k, v in r["checks"].items() if not v)
        if "gpu_tiling_ms" in r:
            lines.append(
                f"| {r['size']} | {r['tiles']} | {ok} | {r['gpu_tiling_ms']:.3f} | {r['pillow_reference_cpu_ms']:.1f} | "
                f"{r['fast_path_cpu_ms']:.1f} | {r['torch_bicubic_gpu_ms']:.3f} | {r['speedup_vs_pillow']:.0f}× | "
                f"{r['gpu_tiling_bw_fraction_of_copy']:.2f} | {r['normalize_kernel_us']:.1f} ({r['normalize_torch_us']:.1f}) | "
                f"{r['torch_bicubic_max_abs_dev_from_reference']:.3f} |")
        else:
            lines.append(f"| {r['size']} | {r['tiles']} | {ok} | – | – | – | – | – | – | – | "
                         f"{r['torch_bicubic_max_abs_dev_from_reference']:.3f} |")
    rt = result.get("runtime")
    if rt:
        ok = "all pass" if all(rt["checks"].values()) else ", ".join(k for k, v in rt["checks"].items() if not v)
        lines += ["", f"## Reference runtime (embedded default, {rt['tiles']}-tile prompt of {rt['prompt_tokens']} tokens, "
                      f"{rt['new_tokens']} new tokens): {ok}", "",
                  "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in rt.items() if k.endswith(("_err", "_agreement"))]
        lines += [f"| {k} | {v:.3f} |" for k, v in rt.get("timing", {}).items()]
    xa = result.get("xattn")
    if xa:
        ok = "all pass" if all(xa["checks"].values()) else ", ".join(k for k, v in xa["checks"].items() if not v)
        lines += ["", f"## Gated cross-attention kernel ({xa['shapes']}): {ok}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in xa["timing"].items()]
    trt = result.get("trt_serving")
    if trt:
        lines += ["", "## trt target served by NGC tritonserver (embedded defaults D, X, H; bf16 engines)", "",
                  f"```\n{json.dumps(trt, indent=1)[:3000]}\n```"]
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "docs" / "gpu")))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-test", action="store_true", help="CPU + interpreter, tiny image, no timing")
    ap.add_argument("--no-runtime", dest="runtime", action="store_false", help="skip the reference-runtime part")
    ap.add_argument("--no-trt-serving", dest="trt_serving", action="store_false",
                    help="skip building engines and serving the trt repository (needs TensorRT-LLM + NGC tritonserver)")
    args = ap.parse_args(argv)
    if args.self_test:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.self_test:
        device, sizes, timer, copy_bw = torch.device("cpu"), [(90, 60)], None, 1.0
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --self-test on CPU, or on a GPU host", file=sys.stderr)
            return 2
        device, sizes = torch.device("cuda"), [(1920, 1080), (4000, 3000), (640, 480)]
        timer = _timer(device)
        copy_bw = copy_bandwidth(device, timer)
    images = [check_image(w, h, device, timer, args.repeats, copy_bw, args.seed) for w, h in sizes]
    # the self-test times the runtime on the CPU too (2 repeats), so the timing code cannot rot either
    rt_timer, rt_repeats = (_timer(device), 2) if args.self_test else (timer, args.repeats)
    runtime = check_runtime(device, rt_timer, rt_repeats, args.seed, args.self_test) if args.runtime else None
    xattn = check_xattn(device, rt_timer, rt_repeats, args.seed, args.self_test, copy_bw)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter self-test)",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "platform": platform.platform(),
              "copy_bandwidth_gbs": copy_bw / 1e9, "repeats": args.repeats, "images": images, "runtime": runtime,
              "xattn": xattn}
    trt = None
    if args.trt_serving and not args.self_test:
        trt = result["trt_serving"] = check_trt_serving(Path(tempfile.mkdtemp(prefix="nvlm-gpu-")), args.seed)
    write_report(result, args.out)
    ok = all(all(r["checks"].values()) for r in images) and (runtime is None or all(runtime["checks"].values()))
    ok = ok and (trt is None or trt.get("passed", True)) and all(xattn["checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
