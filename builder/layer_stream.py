"""One decoder layer in memory at a time: the reference decoder and a built checkpoint, run layer-major.

The whole-model path holds the reference decoder in float32 and the executor's float32 copy of the built one:
for NVLM-D-72B that is about 600 GB. Here every prompt's hidden states [L, hidden] are carried from layer to
layer instead, and each layer is read from disk, upcast, run over all prompts and freed:

    embed all prompts ─▶ for each layer: load it ─▶ run every prompt through it ─▶ free it ─▶ final norm
                       ─▶ logits in vocabulary chunks (lm_head read CHUNK_ROWS rows at a time, never whole in float32)

Two stacks speak the same small interface (`layer(i)`, `final_hidden`, `head_rows`, `vocab`, `token_rows`):
- `ReferenceStack`: the source checkpoint's decoder, each layer a one-layer transformers `Qwen2ForCausalLM`
  (`one_layer_model`) — the same modules and arithmetic as the whole reference decoder, so a layer's outputs
  are the whole model's, bit for bit, and modelopt can quantize it as it quantizes the whole model;
- `ExecutorStack`: a built TensorRT-LLM checkpoint through the reference executor's own layer math
  (runtime/executor/), one `rank_layer` at a time.

NVLM-X/H's gated cross-attention blocks run between the layers the same way, a block at a time, reading each
prompt's image keys (`CrossInput`)."""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from runtime.core import trtllm_layout as layout
from runtime.core.checkpoint import Checkpoint
from runtime.core.config import NVLMConfig
from runtime.core.errors import InputError
from runtime.core.families import family_for_trtllm
from runtime.core.llm_formats import format_for_algo, kv_round
from runtime.core.trtllm_checkpoint import embedding_rows
from runtime.cross_reference import GatedCrossAttention
from runtime.executor import KVCache, ReferenceExecutor, excluded_format, rank_layer, rms_norm, x_layer

CHUNK_ROWS = 8192  # lm_head rows upcast at a time: 8192 × 8192 × 4 B = 256 MB for NVLM-D-72B
MINI_VOCAB = 64  # the one-layer model's own (unused) embedding and lm_head


MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bounded_heap() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping, returned to the kernel when freed. glibc
    raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), after which tensors of a
    layer land in the heap, fragment it, and the next layer's peak sits on top of the holes: measured on a
    hidden-2048 decoder, 1 → 4 layers grew the peak by 216 MB with the dynamic threshold, 119 MB with this one
    (the same as MALLOC_MMAP_THRESHOLD_=1048576). Setting the threshold fixes it (no dynamic adjustment)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Free a finished layer now: collect its reference cycles (transformers' and modelopt's modules hold them)
    and hand glibc's freed heap pages back to the kernel (`malloc_trim`): tensors under glibc's mmap threshold
    live in the heap, and without a trim the resident size ratchets up layer after layer."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def blocks_after(cfg: NVLMConfig) -> dict[int, list[int]]:
    """Self-attention layer index → the gated cross-attention blocks (their indices) that follow it."""
    out: dict[int, list[int]] = {}
    for j, i in enumerate(cfg.cross_attention_layers):
        out.setdefault(i, []).append(j)
    return out


@dataclass
class CrossInput:
    """A prompt's image keys for NVLM-X/H's gated blocks: the encoder features [keys, H] (None: no image keys)
    and each prompt token's key range [L, 2]; generated tokens read the last row's range (the executor's rule;
    for an NVLM prompt, whose last token follows every image, all keys — the reference's decode range)."""

    features: torch.Tensor | None
    ranges: torch.Tensor

    @property
    def reads(self) -> bool:
        return self.features is not None and self.features.shape[0] > 0

    def decode(self) -> torch.Tensor:
        return self.ranges[-1:].clone()


def resolve_device(name: str) -> torch.device:
    """`--device auto|cpu|cuda[:N]`: auto is the first CUDA device when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA device on this host; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return device


# --------------------------------------------------------------------------- reference


def one_layer_model(cfg: NVLMConfig, state: dict[str, torch.Tensor], device: torch.device):
    """Decoder layer weights (HF names under `model.layers.0.`, float32) as a one-layer `Qwen2ForCausalLM`,
    built on the meta device and given the weights (no random init of 0.9 B parameters). Its embedding and
    lm_head are MINI_VOCAB rows of zeros that nothing reads; its final norm is never used (`run_layer`)."""
    from transformers import Qwen2ForCausalLM

    base = cfg.llm.to_transformers()
    hf = type(base)(**{**base.to_dict(), "num_hidden_layers": 1, "vocab_size": MINI_VOCAB,
                       "tie_word_embeddings": False, "layer_types": None})
    with torch.device("meta"):
        model = Qwen2ForCausalLM._from_config(hf, attn_implementation="eager")
    h = cfg.llm.hidden_size
    model.load_state_dict({**state, "model.embed_tokens.weight": torch.zeros(MINI_VOCAB, h),
                           "model.norm.weight": torch.ones(h), "lm_head.weight": torch.zeros(MINI_VOCAB, h)},
                          strict=True, assign=True)
    # rotary inverse frequencies are a buffer computed at construction: on the meta device they are empty
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf)
    return model.eval().to(device)


def run_layer(model, hidden: torch.Tensor, cache=None) -> torch.Tensor:
    """hidden [1, L, H] through the one-layer model's decoder layer (not its final norm): [1, L, H]. `cache`: a
    transformers cache holding this layer's earlier keys/values (greedy decoding), positions continuing it."""
    captured = []
    handle = model.model.layers[0].register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model.model(inputs_embeds=hidden, past_key_values=cache, use_cache=cache is not None)
    finally:
        handle.remove()
    return captured[0]


class ReferenceStack:
    """The source checkpoint's decoder, a layer at a time, with its weights rounded through `stored_as` (the
    dtype a build holds them in: NVLM-D-72B's F32 q/k/v rounded to bf16) and computed in float32."""

    def __init__(self, ckpt: Checkpoint, stored_as: torch.dtype, device: torch.device = torch.device("cpu")):
        self.ckpt, self.cfg, self.stored_as, self.device = ckpt, ckpt.config, stored_as, device
        self.num_layers = self.cfg.llm.num_layers
        plan = ckpt.validate()
        self._rows = {target: source for source, target, _ in plan.rows["llm"]}
        self._xrows = plan.rows.get("xattn", [])
        self.after = blocks_after(self.cfg)

    def _get(self, target: str) -> torch.Tensor:
        return self.ckpt.get(self._rows[target]).to(self.stored_as)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        return {"model.layers.0." + t[len(prefix):]: self._get(t).float() for t in self._rows if t.startswith(prefix)}

    def layer(self, i: int):
        return one_layer_model(self.cfg, self.layer_state(i), self.device)

    def xblock(self, j: int):
        """Gated cross-attention block j (runtime/cross_reference.py's module), its weights rounded through the
        build dtype like the decoder's, float32."""
        with torch.device("meta"):
            block = GatedCrossAttention(self.cfg.llm)
        prefix = f"{j}."
        state = {t[len(prefix):]: self.ckpt.get(src).to(self.stored_as).float()
                 for src, t, _ in self._xrows if t.startswith(prefix)}
        block.load_state_dict(state, strict=True, assign=True)
        return block.eval().to(self.device)

    def token_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Embedding rows [len(ids), H], float32, read row by row from the shard."""
        ids = [int(i) for i in ids]
        uniq = sorted(set(ids))
        rows = self.ckpt.get_rows(self._rows["model.embed_tokens.weight"], uniq).to(self.stored_as).float()
        at = {t: k for k, t in enumerate(uniq)}
        return rows[torch.as_tensor([at[i] for i in ids], dtype=torch.long)]

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

        norm = Qwen2RMSNorm(self.cfg.llm.hidden_size, eps=self.cfg.llm.rms_norm_eps)
        norm.weight.data = self._get("model.norm.weight").float()
        with torch.no_grad():
            return norm(hidden.cpu().float())

    @property
    def vocab(self) -> int:
        return self.cfg.llm.vocab_size

    def head_rows(self, lo: int, hi: int) -> torch.Tensor:
        """lm_head rows lo … hi in float32 (the stored rows rounded through the build dtype)."""
        head = "model.embed_tokens.weight" if self.cfg.llm.tie_word_embeddings else "lm_head.weight"
        return self.ckpt.get_rows(self._rows[head], range(lo, hi)).to(self.stored_as).float()


def vocab_chunks(stack):
    """(lo, hi) over the stack's vocabulary, CHUNK_ROWS at a time."""
    return [(lo, min(stack.vocab, lo + CHUNK_ROWS)) for lo in range(0, stack.vocab, CHUNK_ROWS)]


def chunked_logits(hidden: Sequence[torch.Tensor], stack) -> list[torch.Tensor]:
    """x @ lm_headᵀ [L, vocab] for each final-normed x [L, H], lm_head read and upcast a chunk at a time."""
    out = [torch.empty(x.shape[0], stack.vocab) for x in hidden]
    for lo, hi in vocab_chunks(stack):
        w = stack.head_rows(lo, hi)
        for x, o in zip(hidden, out):
            o[:, lo:hi] = x @ w.T
    return out


# --------------------------------------------------------------------------- built checkpoint


@dataclass
class _ExecLayer:
    stack: "ExecutorStack"
    li: int
    layer: object

    def run(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [T, H] (new tokens of one sequence) through self-attention layer li, extending `cache`."""
        ex, layer = self.stack.math, self.layer
        with torch.no_grad():
            x = x + ex._attention(layer, rms_norm(x, layer.input_norm, ex.eps), cache, self.li)
            return x + ex._mlp(layer, rms_norm(x, layer.post_norm, ex.eps))


@dataclass
class ExecutorStack:
    """A built TensorRT-LLM checkpoint, a layer at a time, through the reference executor's arithmetic."""

    directory: Path
    config: dict = field(init=False)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.config = json.loads((self.directory / "config.json").read_text())
        self.cross_layers = list(self.config.get("cross_attention_layers") or [])
        m = self.config["mapping"]
        self.tp, self.pp = m["tp_size"], m["pp_size"]
        self.table = family_for_trtllm(self.config.get("architecture")).trtllm_layout
        self.fmt = format_for_algo((self.config.get("quantization") or {}).get("quant_algo"))
        self.num_layers = self.config["num_hidden_layers"]
        # the executor's layer math with no weights of its own: layers are handed to it one at a time
        self.math = ReferenceExecutor(self.directory, self.config, [], None, None, None)

    def _open(self, rank: int):
        """A rank file, opened for one use: safetensors maps the file, and the pages a read touches stay resident
        while the mapping lives — a handle kept open would end up holding the whole checkpoint."""
        from safetensors import safe_open

        return safe_open(str(self.directory / f"rank{rank}.safetensors"), framework="pt")

    def _getter(self, rank: int):
        def get(name: str):
            with self._open(rank) as fh:
                return fh.get_tensor(name) if name in fh.keys() else None
        return get

    @contextlib.contextmanager
    def _stage_getters(self, p: int):
        """Getters of PP stage p's TP rank files, each file opened once for one layer's load and closed after."""
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(self._open(p * self.tp + t)) for t in range(self.tp)]
            yield [lambda name, fh=fh, keys=set(fh.keys()): fh.get_tensor(name) if name in keys else None
                   for fh in files]

    def layer(self, i: int) -> _ExecLayer:
        per = self.num_layers // self.pp
        p, j = divmod(i, per)
        with self._stage_getters(p) as gets:
            return _ExecLayer(self, i, rank_layer(gets, self.table, j, self.fmt, self.directory))

    @property
    def after(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, i in enumerate(self.cross_layers):
            out.setdefault(i, []).append(j)
        return out

    def xlayer(self, j: int):
        """Gated block j (global index) from the rank files of the PP stage that holds it."""
        stages = layout.xattn_stages(self.cross_layers, self.num_layers, self.pp)
        p = next(p for p, held in enumerate(stages) if j in held)
        with self._stage_getters(p) as gets:
            return x_layer(gets, self.table, stages[p].index(j), excluded_format(self.config, self.fmt),
                           f"{self.directory}: cross-attention layer {j}")

    def run_block(self, li: int, xl, x: torch.Tensor, cross: CrossInput, decoding: bool) -> torch.Tensor:
        """x [T, H] through the gated block `xl` after layer li, as the executor runs it: the image keys/values
        from the block's own k/v rows (FP8-rounded with its scale under an FP8 KV cache)."""
        if not cross.reads:
            return x
        m = self.math
        m.xattn, m._xattn_order = {li: xl}, {li: 0}  # the executor's block math, one block resident
        ck = m.cross_kv(cross.features)
        ck.decode = tuple(int(v) for v in cross.ranges[-1])
        with torch.no_grad():
            return m._cross_block(li, x, [ck], None if decoding else cross.ranges)

    def token_rows(self, ids: Sequence[int], table: torch.Tensor | None = None) -> torch.Tensor:
        """The executor's `embed`: token rows read from the rank files, prompt-table rows at ids ≥ vocab_size."""
        vocab = self.config["vocab_size"]
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        fake = ids_t >= vocab
        x = embedding_rows(self.directory, ids_t.clamp(max=vocab - 1).tolist())
        if fake.any():
            x[fake] = table[ids_t[fake] - vocab].float()
        return x

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        last = self._getter((self.pp - 1) * self.tp)
        return rms_norm(hidden, last(layout.target(self.table, "final_norm")).float(), self.math.eps)

    @property
    def vocab(self) -> int:
        return self.config["vocab_size"]

    def head_rows(self, lo: int, hi: int) -> torch.Tensor:
        """lm_head rows lo … hi in float32, from the last PP stage's TP ranks (each holds a slice of the
        vocabulary padded to a multiple of TP)."""
        name = layout.target(self.table, "lm_head")
        per = layout.vocab_rows(self.vocab, self.tp) // self.tp
        parts = []
        for t in range(lo // per, (hi - 1) // per + 1):
            a, b = max(lo, t * per) - t * per, min(hi, (t + 1) * per) - t * per
            with self._open((self.pp - 1) * self.tp + t) as fh:
                parts.append(fh.get_slice(name)[a:b].float())
        return torch.cat(parts)


# --------------------------------------------------------------------------- layer-major passes


def run_block(block, hidden: torch.Tensor, cross: CrossInput, ranges: torch.Tensor, kv_scale: float | None = None):
    """hidden [1, L, H] through a gated block reading `cross`'s image keys with `ranges` [L, 2] (a prompt reading no
    keys passes unchanged, as the reference's hook leaves it); `kv_scale`: round the image keys/values as an FP8
    KV cache with that scale holds them."""
    if not cross.reads:
        return hidden
    with torch.no_grad():
        kv = block.cross_attn.key_values(cross.features.to(hidden.device, hidden.dtype))
        if kv_scale is not None:
            kv = tuple(kv_round(t, kv_scale).to(t.dtype) for t in kv)
        return block(hidden[0], kv, ranges.to(hidden.device))[None]


def reference_pass(stack: ReferenceStack, hidden: list[torch.Tensor], caches: list | None = None,
                   crosses: list[CrossInput] | None = None, decoding: bool = False) -> list[torch.Tensor]:
    """Every prompt's hidden states [1, L, H] through every reference layer, one layer loaded at a time, and
    NVLM-X/H's gated blocks after theirs (`crosses`: each prompt's image keys; `decoding`: the tokens are generated
    ones, reading the decode range). `caches`: per prompt, one transformers cache per layer (filled here)."""
    from transformers import DynamicCache

    for i in range(stack.num_layers):
        model = stack.layer(i)
        for p, h in enumerate(hidden):
            cache = None
            if caches is not None:
                if len(caches[p]) == i:
                    caches[p].append(DynamicCache())
                cache = caches[p][i]
            hidden[p] = run_layer(model, h.to(stack.device), cache)
        del model
        for j in stack.after.get(i, []):
            block = stack.xblock(j)
            hidden = [run_block(block, h, c, c.decode() if decoding else c.ranges) for h, c in zip(hidden, crosses)]
            del block
        release_memory()  # before the next layer is read
    return hidden


def executor_pass(stack: ExecutorStack, hidden: list[torch.Tensor], caches: list[KVCache],
                  crosses: list[CrossInput] | None = None, decoding: bool = False) -> list[torch.Tensor]:
    """Every prompt's hidden states [T, H] through every layer of the built checkpoint, extending each prompt's
    KV cache (`caches[p]`), and NVLM-X/H's gated blocks after theirs."""
    after = stack.after
    for i in range(stack.num_layers):
        layer = stack.layer(i)
        hidden = [layer.run(h, c) for h, c in zip(hidden, caches)]
        del layer
        for j in after.get(i, []):
            xl = stack.xlayer(j)
            hidden = [stack.run_block(i, xl, h, c, decoding) for h, c in zip(hidden, crosses)]
            del xl
        release_memory()
    return hidden


def greedy_reference(stack: ReferenceStack, embeds: list[torch.Tensor], steps: int,
                     crosses: list[CrossInput] | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each prompt (its input embeddings [1, L, H]), layer-major: one pass over the layers for
    the prompts, then one per generated token, each layer's cache kept per prompt. Returns the tokens and the
    prompts' last hidden states [1, L, H] (the report's reference logits come from them: no second pass)."""
    caches: list[list] = [[] for _ in embeds]
    hidden = reference_pass(stack, [e.clone() for e in embeds], caches, crosses)
    prompt_hidden = list(hidden)
    tokens: list[list[int]] = [[] for _ in embeds]
    for step in range(steps):
        last = [stack.final_hidden(h[0, -1:]) for h in hidden]
        for t, lg in zip(tokens, chunked_logits(last, stack)):
            t.append(int(lg[-1].argmax()))
        if step + 1 < steps:
            rows = stack.token_rows([t[-1] for t in tokens])
            hidden = reference_pass(stack, [rows[p].reshape(1, 1, -1) for p in range(len(tokens))], caches, crosses,
                                    decoding=True)
    return tokens, prompt_hidden


def greedy_executor(stack: ExecutorStack, first: list[torch.Tensor], caches: list[KVCache], steps: int,
                    crosses: list[CrossInput] | None = None) -> list[list[int]]:
    """Greedy tokens from the prompts' final hidden states `first` ([L, H], caches already filled by
    `executor_pass`), one pass over the layers per generated token."""
    hidden, tokens = first, [[] for _ in first]
    for step in range(steps):
        for t, lg in zip(tokens, chunked_logits([stack.final_hidden(h[-1:]) for h in hidden], stack)):
            t.append(int(lg[-1].argmax()))
        if step + 1 < steps:
            rows = stack.token_rows([t[-1] for t in tokens])
            hidden = executor_pass(stack, [rows[p:p + 1] for p in range(len(tokens))], caches, crosses,
                                   decoding=True)
    return tokens


