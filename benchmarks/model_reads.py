"""What one decode step of a gemma-edge file reads, and how much of the file is resident.

Shared by ``convert_memory.py`` and ``runtime_memory.py`` (import it with this folder on
``sys.path``; the scripts do).

``decode_reads(path, info)``: the bytes one ``decode`` call reads. Weights are every buffer
behind a constant tensor of the ``decode`` subgraph, each once (the tied embedding / LM head
is one buffer, read whole by the LM head), plus per-channel scales kept in the header and
constants stored inline; blockwise int4 scales are tensors over buffers of their own. A
table read *only* through EMBEDDING_LOOKUP (Gemma 4's per-layer embedding tables
``l<i>_ple_embed``) counts only the rows looked up: one row (and its scales) per id, so a
decode step reads P bytes-per-weight of each layer's table, not the table. The KV cache:
every layer attends over K and V of ``cfg.kv_source(layer)``'s cache, float32
[1, K, L, H] with L = S (the whole cache, as the rank-4 BATCH_MATMUL reads it) for global
layers and L = min(W, S) for sliding ones (their decode SLICEs the window; convert/graph.py).
Gemma 4's KV-sharing layers read an earlier layer's cache again and are counted again.

``snapshot(path, regions)``: this process's memory (/proc/self/status), the resident bytes
of every mapping of the model file and of the XNNPACK weight cache (/proc/self/smaps), and
how many bytes of ``regions`` (file offset, size) are resident in this process's mappings of
the model file, page by page (/proc/self/pagemap's present bit): what RSS counts.
"""

from __future__ import annotations

import math
import mmap
import os
import re

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def decode_reads(path: str, info) -> dict:
    """Bytes one decode step reads (see the module docstring), with the file regions of the
    tables read only by EMBEDDING_LOOKUP (``lookup_regions``: [(offset, size)], merged)."""
    from ai_edge_litert import schema_py_generated as fb

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model = fb.Model.GetRootAs(m, 0)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            codes.append(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()))
        sigs = {}
        for i in range(model.SignatureDefsLength()):
            sd = model.SignatureDefs(i)
            sigs[sd.SignatureKey().decode()] = sd.SubgraphIndex()
        sg = model.Subgraphs(sigs["decode"])
        lookup = fb.BuiltinOperator.EMBEDDING_LOOKUP
        uses: dict[int, set] = {}  # tensor -> {(builtin, input index)}
        lookups: dict[int, int] = {}  # table tensor -> ids looked up per call
        for j in range(sg.OperatorsLength()):
            op = sg.Operators(j)
            code = codes[op.OpcodeIndex()]
            ins = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
            for k, t in enumerate(ins):
                if t >= 0:
                    uses.setdefault(t, set()).add((code, k))
            if code == lookup and len(ins) == 2:
                ids = sg.Tensors(ins[0])
                n_ids = int(np.prod(ids.ShapeAsNumpy())) if ids.ShapeLength() else 1
                lookups[ins[1]] = lookups.get(ins[1], 0) + n_ids
        lookup_only = {t for t, u in uses.items() if u and all(c == lookup and k == 1 for c, k in u)}
        owner = {}  # blockwise scales tensor -> the weight tensor it scales
        for t in range(sg.TensorsLength()):
            q = sg.Tensors(t).Quantization()
            if q is not None and q.DetailsType() == fb.QuantizationDetails.BlockwiseQuantization:
                d = fb.BlockwiseQuantization()
                d.Init(q.Details().Bytes, q.Details().Pos)
                owner[d.Scales()] = t
        io = {sg.Inputs(j) for j in range(sg.InputsLength())} | {sg.Outputs(j) for j in range(sg.OutputsLength())}
        seen: set[int] = set()
        external = inline = scales = n_buffers = 0
        table_bytes = table_read = n_tables = 0
        regions = []
        for t in range(sg.TensorsLength()):
            tensor = sg.Tensors(t)
            b = tensor.Buffer()
            if t in io or b <= 0 or b in seen:
                continue
            seen.add(b)
            buf = model.Buffers(b)
            if buf.Offset() > 1:  # data after the header (offset 1 is the "no data" marker)
                size = buf.Size()
            else:
                size = buf.DataLength()
            q = tensor.Quantization()
            header_scales = 4 * q.ScaleLength() if size and q is not None else 0  # per-channel float32
            table = t if t in lookup_only else owner.get(t) if owner.get(t) in lookup_only else None
            if table is not None:  # read one row (and its scales) per id looked up
                rows = int(sg.Tensors(table).ShapeAsNumpy()[0])
                per_row = (size + header_scales) / rows
                table_bytes += size + header_scales
                table_read += math.ceil(lookups[table] * per_row)
                n_tables += t == table
                if buf.Offset() > 1:
                    regions.append((buf.Offset(), size))
                continue
            if buf.Offset() > 1:
                external += size
                n_buffers += 1
            else:
                inline += size
            scales += header_scales
    finally:  # the tables hold no exported views of the map, so it closes cleanly
        m.close()
    cfg, S = info.config, info.context_length
    W = cfg.sliding_window
    groups: dict[tuple[int, int, int], int] = {}  # (KV heads, slots read, head dim) -> layers
    kv = 0
    for i in range(cfg.num_layers):
        src = cfg.kv_source(i)
        K, H = cfg.kv_heads_for(src), cfg.head_dim_for(src)
        slots = min(W, S) if W and cfg.is_sliding(i) else S
        kv += 2 * K * slots * H * 4
        groups[(K, slots, H)] = groups.get((K, slots, H), 0) + 1
    if len({(K, H) for K, _, H in groups}) == 1:
        K, _, H = next(iter(groups))
        lengths = "/".join(str(s) for s in sorted({s for _, s, _ in groups}))
        kv_desc = f"{cfg.num_layers} layers x K,V x [1, {K}, {lengths}, {H}] fp32"
    else:
        kv_desc = f"{cfg.num_layers} layers x K,V: " + " + ".join(
            f"{n} x [1, {K}, {s}, {H}]" for (K, s, H), n in sorted(groups.items())) + " fp32"
    owners = sum(1 for i in range(cfg.num_layers) if cfg.kv_source(i) == i)
    if owners < cfg.num_layers:
        kv_desc += f"; {cfg.num_layers - owners} layers read an earlier layer's cache"
    weights = external + inline + scales + table_read
    return {"weights": weights, "weight_buffers_bytes": external, "weight_buffers": n_buffers,
            "inline_bytes": inline, "header_scales_bytes": scales,
            "lookup_tables": n_tables, "lookup_tables_bytes": table_bytes, "lookup_read_bytes": table_read,
            "lookup_regions": merge_regions(regions),
            "kv": kv, "kv_desc": kv_desc, "total": weights + kv,
            "file_size": os.path.getsize(path), "context": S, "num_layers": cfg.num_layers}


def merge_regions(regions) -> list[tuple[int, int]]:
    """(offset, size) ranges sorted and merged where they touch or share a page."""
    out: list[list[int]] = []
    for off, n in sorted(regions):
        if out and off <= out[-1][0] + out[-1][1] + PAGE:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]


_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+\s*(.*)$")


def mappings() -> list[dict]:
    """Every mapping of this process: start, end, file offset, path, Rss bytes (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _VMA.match(line)
            if m:
                cur = {"start": int(m.group(1), 16), "end": int(m.group(2), 16), "offset": int(m.group(3), 16),
                       "path": m.group(4).strip(), "rss": 0}
                out.append(cur)
            elif line.startswith("Rss:") and cur is not None:
                cur["rss"] = int(line.split()[1]) * 1024
    return out


def resident_bytes(vmas: list[dict], regions) -> int:
    """Bytes of the file ``regions`` whose pages are present in this process's page tables
    through ``vmas`` (mappings of that file), counted in whole pages."""
    total = 0
    with open("/proc/self/pagemap", "rb") as pm:
        for off, n in regions:
            for v in vmas:
                lo, hi = max(off, v["offset"]), min(off + n, v["offset"] + v["end"] - v["start"])
                if lo >= hi:
                    continue
                p0 = (v["start"] + lo - v["offset"]) // PAGE
                p1 = (v["start"] + hi - v["offset"] + PAGE - 1) // PAGE
                for a in range(p0, p1, 1 << 18):  # 2 MB of pagemap entries at a time
                    b = min(p1, a + (1 << 18))
                    pm.seek(a * 8)
                    entries = np.frombuffer(pm.read((b - a) * 8), dtype="<u8")
                    total += int(np.count_nonzero(entries >> np.uint64(63))) * PAGE
    return total


def status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def snapshot(model_path: str, regions=()) -> dict:
    """This process's RSS, the resident bytes of its mappings of the model file and of XNNPACK
    weight caches (``*.xnnpack``), and the resident bytes of ``regions`` of the model file."""
    real = os.path.realpath(model_path)
    vmas = mappings()
    model = [v for v in vmas if v["path"] == real]
    cache = [v for v in vmas if v["path"].endswith(".xnnpack")]
    out = {**status(), "model_maps": len(model), "model_mapped": sum(v["end"] - v["start"] for v in model),
           "model_map_rss": sum(v["rss"] for v in model), "cache_map_rss": sum(v["rss"] for v in cache),
           "regions_bytes": sum(n for _, n in regions), "regions_resident": None}
    try:
        out["regions_resident"] = resident_bytes(model, regions) if regions else 0
    except OSError:  # no /proc/self/pagemap (not Linux, or a kernel without it)
        pass
    return out
