"""A byte-budgeted cache of routed experts on the compute device, and the model loader that sizes it.

What is cached (`store`, default "auto" = raw on a GPU, packed on the CPU):
- raw: an expert's three matrices as the file's GGML bytes, in one uint8 tensor on the device,
  dequantized on use (on that device) by infer/dequant.py. On a GPU this is the right trade: a Q4_0
  expert is 4.5 bits per weight against 32 for float32, so the same VRAM holds ~7x more experts, a
  miss costs one host→device copy of exactly the file's bytes, and dequantizing on the GPU is cheap
  next to that copy.
- packed: int8 quants plus float32 group scales (infer/qmatmul.py, 9–10 bits per weight), multiplied
  without expanding them. On the CPU expanding is the expensive part (torch's elementwise Q4_0 kernel:
  ~0.2 s per 2048x7168 matrix on one core, against ~4 ms for the matrix-vector product), so a raw hit
  would cost nearly what a miss costs; a packed hit costs only the product, which streams 3.5x fewer
  bytes than float32. A miss costs the read plus one unpacking.
- float: the dequantized float32 matrices (the only choice for sources without raw bytes, the HF
  checkpoint; on request otherwise).

Policies, evicting until the new entry fits the budget:
- `lru`: least recently used first.
- `lfu`: least frequently used first, ties broken by least recent use. Counts age: every
  `aging_period` accesses all counts are halved, so experts hot long ago give way to today's (plain
  LFU would keep them forever). Routing of MoE models is skewed per layer and stable over text,
  which is what LFU exploits; LRU adapts faster to a change of topic.

Accesses: the MoE asks for gate, up, down of one expert in a row through `expert_fn(layer, e, proj,
device)`; a request for `gate` (or for another expert than the one in flight) starts an access, and
the in-flight expert serves the other two projections even when the budget is 0 and it was never
stored. The budget bounds what is stored; the one expert being computed is transient.

Counters (`CacheStats`): accesses, hits, misses, file reads and bytes read, per-layer expert usage.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from k2conv.errors import K2ConvError
from k2conv.infer.dequant import dequantize
from k2conv.infer.qmatmul import PackedMatrix, pack, packable
from k2conv.infer.weights import PROJS, WeightSource

POLICIES = ("lru", "lfu")


@dataclass
class CacheStats:
    """Counters since the last reset; per-token figures divide by the tokens the caller ran."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    reads: int = 0  # file reads (GGUF: 3 per expert miss, relayout: 1)
    bytes_read: int = 0  # bytes of expert data read from the files
    evictions: int = 0
    fetch_s: float = 0.0  # wall time of the misses' reads and copies to the device (sync copies: exact)
    per_layer_use: dict[int, dict[int, int]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"accesses": self.accesses, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "reads": self.reads, "bytes_read": self.bytes_read, "evictions": self.evictions,
                "fetch_s": self.fetch_s}


@dataclass
class _Entry:
    nbytes: int
    tensors: dict[str, torch.Tensor | PackedMatrix]  # proj → matrix (store="float" or "packed")
    data: torch.Tensor | None = None  # uint8 raw record (store="raw")
    parts: dict[str, tuple] | None = None
    count: int = 0
    last: int = 0

    def matrix(self, proj: str) -> torch.Tensor | PackedMatrix:
        if self.data is None:
            return self.tensors[proj]
        off, n, qtype, (rows, _) = self.parts[proj]
        return dequantize(self.data[off : off + n].view(rows, -1), qtype)


class ExpertCache:
    """Routed experts of `src` on `device` within `budget` bytes (None: unbounded); an ExpertFn."""

    def __init__(self, src: WeightSource, device: torch.device | str, budget: int | None = None,
                 policy: str = "lru", store: str = "auto", aging_period: int = 4096):  # fmt: skip
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        if store not in ("auto", "raw", "packed", "float"):
            raise ValueError(f"cache store {store!r} is not auto, raw, packed or float")
        on_cpu = torch.device(device).type == "cpu"
        if store == "auto":
            store = "packed" if on_cpu else "raw"
        if store == "packed" and not on_cpu:
            raise ValueError("cache store 'packed' is for the CPU (a GPU dequantizes raw blocks)")
        if budget is not None and budget < 0:
            raise ValueError("cache budget must be >= 0")
        self.src, self.device, self.budget, self.policy = src, torch.device(device), budget, policy
        self.store = store if hasattr(src, "expert_record") else "float"
        self.aging_period = max(1, aging_period)
        self.entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # LRU order: oldest first
        self.used = 0
        self.peak_used = 0
        self.stats = CacheStats()
        self._tick = 0
        self._current: tuple[tuple[int, int], _Entry] | None = None

    # ---- the ExpertFn ----

    def __call__(self, layer: int, e: int, proj: str, device: torch.device | str | None = None) -> torch.Tensor | PackedMatrix:
        key = (layer, e)
        if proj == PROJS[0] or self._current is None or self._current[0] != key:
            self._current = (key, self.access(layer, e))
        return self._current[1].matrix(proj)

    def access(self, layer: int, e: int) -> _Entry:
        """Count one use of (layer, e); return its entry, fetched (and stored if it fits) on a miss."""
        key = (layer, e)
        self._tick += 1
        st = self.stats
        st.accesses += 1
        use = st.per_layer_use.setdefault(layer, {})
        use[e] = use.get(e, 0) + 1
        if self.policy == "lfu" and self._tick % self.aging_period == 0:
            for ent in self.entries.values():
                ent.count //= 2
        entry = self.entries.get(key)
        if entry is not None:
            st.hits += 1
            self.entries.move_to_end(key)
        else:
            st.misses += 1
            t0 = time.perf_counter()
            entry = self._fetch(layer, e)
            st.fetch_s += time.perf_counter() - t0
            self._insert(key, entry)
        entry.count += 1
        entry.last = self._tick
        return entry

    # ---- fetching and storing ----

    def _fetch(self, layer: int, e: int) -> _Entry:
        if self.store == "float" and not hasattr(self.src, "expert_record"):
            before = self.src.stats.expert_bytes
            tensors = {p: self.src.expert(layer, e, p, self.device) for p in PROJS}
            self.stats.reads += len(PROJS)
            self.stats.bytes_read += self.src.stats.expert_bytes - before
            return _Entry(sum(t.nbytes for t in tensors.values()), tensors)
        rec = self.src.expert_record(layer, e)
        self.stats.reads += rec.reads
        self.stats.bytes_read += sum(n for _, n, _, _ in rec.parts.values())
        host = torch.from_numpy(rec.data)
        if self.device.type == "cpu":
            data = host.clone() if rec.borrowed else host
        else:
            data = host.to(self.device)  # from a pinned buffer under --io direct: a DMA copy
        if self.store == "packed" and all(packable(qtype) for _, _, qtype, _ in rec.parts.values()):
            tensors = {p: pack(data[off : off + n], qtype, shape) for p, (off, n, qtype, shape) in rec.parts.items()}
            return _Entry(sum(t.nbytes for t in tensors.values()), tensors)
        if self.store != "raw":  # float, or packed with a type that has no groups (F32/F16/BF16, IQ2…)
            probe = _Entry(0, {}, data, rec.parts)
            tensors = {p: probe.matrix(p) for p in PROJS}
            return _Entry(sum(t.nbytes for t in tensors.values()), tensors)
        return _Entry(int(data.nbytes), {}, data, rec.parts)

    def _insert(self, key: tuple[int, int], entry: _Entry) -> None:
        if self.budget is not None and entry.nbytes > self.budget:
            return  # never fits: served once, not stored
        while self.budget is not None and self.used + entry.nbytes > self.budget:
            self._evict()
        self.entries[key] = entry
        self.used += entry.nbytes
        self.peak_used = max(self.peak_used, self.used)

    def victim(self) -> tuple[int, int]:
        """The key the policy evicts next."""
        if self.policy == "lru":
            return next(iter(self.entries))
        return min(self.entries, key=lambda k: (self.entries[k].count, self.entries[k].last))

    def _evict(self) -> None:
        key = self.victim()
        self.used -= self.entries.pop(key).nbytes
        self.stats.evictions += 1

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Accesses inside the block change the cache but not `stats` (e.g. the prefill before a timed decode)."""
        kept, self.stats = self.stats, CacheStats()
        try:
            yield
        finally:
            self.stats = kept


# ---- placement: resident weights first, the rest of the budget is the expert cache ----------------------


def default_budget(device: torch.device) -> int:
    """No --vram-budget: 90% of the GPU's free memory, or half of the RAM the kernel calls available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


class _BudgetedSource:
    """Passes a source through, adding up the resident tensors it hands out and stopping at the budget."""

    def __init__(self, src: WeightSource, budget: int | None, device: torch.device):
        self._src, self._budget, self._device, self.resident = src, budget, device, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._src, name)

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._count(name, self._src.tensor(name, device))

    def matrix(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | PackedMatrix:
        return self._count(name, self._src.matrix(name, device))

    def _count(self, name: str, t: Any) -> Any:
        self.resident += t.nbytes
        if self._budget is not None and self.resident > self._budget:
            where = getattr(self._src, "path", "model")
            raise K2ConvError(f"{where}: resident (non-expert) weights need more than {self._budget:,} bytes "
                              f"(--vram-budget) on {self._device}; got to {self.resident:,} at {name}")
        return t


def load_model(src: WeightSource, device: str | torch.device = "auto", *, budget: int | None = None,
               policy: str = "lru", io: str = "mmap", store: str = "auto",
               qa_norm_eps: float | None = None) -> tuple[Any, ExpertCache, list[str]]:  # fmt: skip
    """KimiModel with non-expert weights resident on `device` and an expert cache in what is left of `budget`.

    budget None → default_budget(device). Returns (model, cache, notes); raises K2ConvError (naming the
    file) when the resident weights alone exceed the budget.
    """
    from k2conv.infer.model import KimiModel, resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise K2ConvError(f"{getattr(src, 'path', 'model')}: --device cuda asked for, but torch sees no CUDA device")
    total = default_budget(dev) if budget is None else int(budget)
    notes: list[str] = []
    if io not in ("mmap", "direct"):
        raise K2ConvError(f"--io {io!r} is not mmap or direct")
    if hasattr(src, "set_io"):  # pinned staging for the copies to a GPU, in both modes
        notes += src.set_io(io, pin=dev.type == "cuda")
    elif io == "direct":
        notes.append(f"{getattr(src, 'path', 'model')}: --io direct applies to GGUF files; read through mmap")
    cache = ExpertCache(src, dev, 0, policy=policy, store=store)
    counted = _BudgetedSource(src, total, dev)
    model = KimiModel(counted, dev, qa_norm_eps=qa_norm_eps, expert_fn=cache)  # type: ignore[arg-type]
    model.src = src
    model.resident_bytes = counted.resident
    model.expert_cache = cache
    cache.budget = total - counted.resident
    return model, cache, notes
