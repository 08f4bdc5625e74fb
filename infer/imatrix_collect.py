"""Importance matrices from the reference runner (`k2conv imatrix`), as llama-imatrix defines them.

Per weight matrix W the file holds Σ x² over every activation vector x that entered W (one value per
input column) and the number of such vectors (tools/imatrix/imatrix.cpp, collect_imatrix):

- 2-D weights (attention projections, dense FFN, shared expert, router): every token of the chunk,
  one count.
- merged experts `ffn_{gate,up,down}_exps`: one matrix per expert; only the tokens routed to that
  expert are summed and counted (gate/up see the FFN input, down the expert's own SwiGLU output).
- 3-D dense weights `attn_k_b` (input: q_nope of each head) and `attn_v_b` (input: each head's
  attention output in the latent space): one matrix of n_head·ne0 values (head-major), one count
  of tokens, as current llama-imatrix writes them.
- `output.weight` only with `process_output` (llama-imatrix's --process-output); token_embd is a
  lookup, not a product, and has no entry.

The text is tokenized with the model's own tokenizer (infer/tokenizer.py) and cut into chunks of
`chunk` tokens, the last partial chunk dropped; when the vocabulary adds a BOS its id replaces each
chunk's first token, as llama-imatrix does. Chunks shorter than 16 tokens are refused: llama-imatrix
skips dense products of fewer than 16 rows, so such a file would not mean what its counts say.

How the activations are caught without touching the forward pass: a torch function mode sees every
matmul/einsum the runner performs and recognises the weight operand (or the tensor it is a view
of, e.g. `W.T`) among the model's registered weights. Sums are accumulated in float64 (llama.cpp
uses float32; the file stores float32 either way).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from k2conv.errors import K2ConvError
from k2conv.infer.model import KimiModel
from k2conv.infer.weights import PROJS, FloatMatrices, WeightSource, open_weights
from k2conv.quant.imatrix import Imatrix, ImatrixEntry

MIN_CHUNK = 16  # llama-imatrix ignores dense products of fewer rows
_EXPERT_REFS = 8  # expert tensors the mode recognises at once (the MoE uses 3 right after fetching)


def _base(t: torch.Tensor) -> torch.Tensor:
    """The tensor owning the storage: a weight and its views (`W.T`, reshapes) share it."""
    return t._base if t._base is not None else t


@dataclass
class _Slot:
    """Where one weight's statistics go: entry name, matrix index, and the 3-D head layout if any."""

    name: str
    mat: int
    heads: int = 0  # >0: a 3-D dense weight (n_head, rows, ne0) used through einsum


class ActivationCollector(TorchFunctionMode):
    """Σx² and counts per weight matrix of every matmul/einsum whose weight operand is registered."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.fixed: dict[int, tuple[torch.Tensor, _Slot]] = {}
        self.experts: OrderedDict[int, tuple[torch.Tensor, _Slot]] = OrderedDict()
        self.sums: dict[str, torch.Tensor] = {}  # float64 [n_mat, per_mat]
        self.counts: dict[str, np.ndarray] = {}  # int64 [n_mat]

    # ---- registration -------------------------------------------------------------------------

    def _entry(self, name: str, n_mat: int, per_mat: int) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, per_mat, dtype=torch.float64, device=self.device)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)

    def add_weight(self, name: str, w: torch.Tensor) -> None:
        """A resident weight: 2-D [out, in] or 3-D (n_head, rows, ne0)."""
        if w.dim() == 3:
            self._entry(name, 1, w.shape[0] * w.shape[2])
            slot = _Slot(name, 0, heads=int(w.shape[0]))
        else:
            self._entry(name, 1, w.shape[1])
            slot = _Slot(name, 0)
        self.fixed[id(_base(w))] = (w, slot)

    def add_expert(self, name: str, e: int, n_expert: int, w: torch.Tensor) -> torch.Tensor:
        """A routed expert matrix just fetched: recognised until a few later fetches push it out."""
        self._entry(name, n_expert, w.shape[1])
        self.experts[id(_base(w))] = (w, _Slot(name, e))
        while len(self.experts) > _EXPERT_REFS:
            self.experts.popitem(last=False)
        return w

    def _slot(self, t: Any) -> tuple[torch.Tensor, _Slot] | None:
        if not isinstance(t, torch.Tensor):
            return None
        key = id(_base(t))
        return self.fixed.get(key) or self.experts.get(key)

    # ---- interception -------------------------------------------------------------------------

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("matmul", "__matmul__") and len(args) == 2:
            hit = self._slot(args[1])
            if hit is not None:
                self._matmul(hit, args[0])
        elif name == "einsum" and args and isinstance(args[0], str):
            ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            if len(ops) == 2:
                hit = self._slot(ops[1])
                if hit is not None:
                    self._einsum(hit, args[0], ops[0])
        return func(*args, **kwargs)

    def _matmul(self, hit: tuple[torch.Tensor, _Slot], x: torch.Tensor) -> None:
        _, slot = hit
        sums = self.sums[slot.name]
        if x.dim() != 2 or x.shape[1] != sums.shape[1]:
            raise RuntimeError(f"imatrix: {slot.name} met an input of shape {tuple(x.shape)}")
        sums[slot.mat] += x.detach().double().pow(2).sum(0)
        self.counts[slot.name][slot.mat] += x.shape[0]

    def _einsum(self, hit: tuple[torch.Tensor, _Slot], equation: str, x: torch.Tensor) -> None:
        """3-D weight (head, rows, ne0) in `in,w->out`: sum x² over all but the head and ne0 axes."""
        _, slot = hit
        lhs = equation.replace(" ", "").split("->")[0]
        x_sub, w_sub = lhs.split(",")
        head, col = w_sub[0], w_sub[-1]
        if not slot.heads or head not in x_sub or col not in x_sub:
            raise RuntimeError(f"imatrix: cannot read the input of {slot.name} from einsum {equation!r}")
        sq = x.detach().double().pow(2)
        other = [i for i, c in enumerate(x_sub) if c not in (head, col)]
        per = sq.sum(dim=other) if other else sq
        if x_sub.index(head) > x_sub.index(col):
            per = per.T
        tokens = int(np.prod([x.shape[i] for i in other])) if other else 1
        self.sums[slot.name][0] += per.reshape(-1)
        self.counts[slot.name][0] += tokens

    def imatrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        entries = {
            n: ImatrixEntry(s.cpu().numpy().astype(np.float32), self.counts[n].copy()) for n, s in self.sums.items()
        }
        return Imatrix(entries, datasets, chunk_count, chunk_size)


_ATTN = {"q_a": "attn_q_a", "q_b": "attn_q_b", "q": "attn_q", "kv_a": "attn_kv_a_mqa", "k_b": "attn_k_b",
         "v_b": "attn_v_b", "o": "attn_output"}  # fmt: skip


def register_model(col: ActivationCollector, model: KimiModel, process_output: bool) -> None:
    """Every resident weight matrix of the runner under its GGUF name."""
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        for attr, gname in _ATTN.items():
            if hasattr(block.attn, attr):
                col.add_weight(p + gname + ".weight", getattr(block.attn, attr))
        ffn = block.ffn
        if hasattr(ffn, "router"):
            col.add_weight(p + "ffn_gate_inp.weight", ffn.router)
            if ffn.shared is not None:
                for proj, w in zip(PROJS, ffn.shared):
                    col.add_weight(p + f"ffn_{proj}_shexp.weight", w)
        else:
            for proj in PROJS:
                col.add_weight(p + f"ffn_{proj}.weight", getattr(ffn, proj))
    if process_output and model.src.has("output.weight"):
        col.add_weight("output.weight", model.lm_head)


def chunks_of(tokens: list[int], chunk: int, bos_id: int | None) -> list[list[int]]:
    """Whole chunks of `chunk` tokens (the rest dropped), each starting with BOS when one is given."""
    out = []
    for i in range(len(tokens) // chunk):
        ids = tokens[i * chunk : (i + 1) * chunk]
        if bos_id is not None:
            ids[0] = bos_id
        out.append(ids)
    return out


def collect_imatrix(model_path: Path | str, text_path: Path | str, *, chunk: int = 512, max_chunks: int | None = None,
                    device: str = "cpu", process_output: bool = False,
                    progress: Callable[[str], None] | None = None) -> Imatrix:  # fmt: skip
    """Run the runner over `text_path` and return the importance matrix of `model_path`."""
    from k2conv.infer.tokenizer import tokenizer_for

    text_path = Path(text_path)
    if chunk < MIN_CHUNK:
        raise K2ConvError(f"--chunk {chunk}: must be at least {MIN_CHUNK} (llama-imatrix skips shorter products)")
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise K2ConvError(f"{text_path}: cannot read calibration text ({exc})") from None
    tok = tokenizer_for(model_path)
    if tok is None:
        raise K2ConvError(f"{model_path}: carries no tokenizer, so text cannot be encoded")
    tokens = tok.encode(text)
    chunks = chunks_of(tokens, chunk, tok.bos_id if tok.add_bos else None)
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    if not chunks:
        raise K2ConvError(f"{text_path}: tokenizes to {len(tokens)} tokens, fewer than one chunk of {chunk}")
    src = open_weights(model_path)
    try:
        return _collect(src, chunks, device, process_output, str(text_path), chunk, progress)
    finally:
        src.close()


def _collect(src: WeightSource, chunks: list[list[int]], device: str, process_output: bool, dataset: str,
             chunk: int, progress: Callable[[str], None] | None) -> Imatrix:  # fmt: skip
    cfg = src.config
    col: ActivationCollector

    def expert_fn(layer: int, e: int, proj: str, dev: torch.device) -> torch.Tensor:
        return col.add_expert(f"blk.{layer}.ffn_{proj}_exps.weight", e, cfg.n_routed_experts, src.expert(layer, e, proj, dev))

    model = KimiModel(FloatMatrices(src), device, expert_fn=expert_fn)  # type: ignore[arg-type]
    col = ActivationCollector(model.device)
    register_model(col, model, process_output)
    t0 = time.perf_counter()
    for i, ids in enumerate(chunks):
        with col:
            model(ids)
        if progress is not None:
            rate = (i + 1) * chunk / (time.perf_counter() - t0)
            progress(f"chunk {i + 1}/{len(chunks)} ({rate:.0f} tok/s)")
    return col.imatrix([dataset], len(chunks), chunk)
