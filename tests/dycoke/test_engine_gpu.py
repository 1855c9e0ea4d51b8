"""The engine on CUDA (decode step captured in a CUDA graph) gives the CPU engine's tokens, fp32 tiny model."""

from __future__ import annotations

import pytest
import torch

from dycoke import DyCokeConfig
from dycoke.engine import Engine, GenerationSettings, Request
from dycoke.llava import VideoLLM
from dycoke.testing import build_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("cfg", [DyCokeConfig.off(), DyCokeConfig(tokens_per_frame=4, dp_layer=2)], ids=["off", "dycoke"])
def test_cuda_graph_engine_matches_cpu(tmp_path, cfg):
    ckpt = str(build_tiny_checkpoint(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(3)
    videos = [torch.randint(0, 256, (f, 48, 48, 3), generator=g, dtype=torch.uint8) for f in (8, 5, 12)]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = VideoLLM.load(ckpt, dtype="float32", device=device)
        vis = llm.encode(videos, cfg)
        reqs = [Request(f"r{i}", v, "Describe the video.", GenerationSettings(max_new_tokens=12)) for i, v in enumerate(vis)]
        engine = Engine(llm, cfg, max_batch_size=4, use_cuda_graph=device == "cuda")
        outs[device] = [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)]
        # replaying the captured graph for a second batch of the same shape must give the same answer
        if device == "cuda":
            assert [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)] == outs["cuda"]
    assert outs["cpu"] == outs["cuda"]


def test_compaction_under_cuda_graphs_matches_cpu(tmp_path):
    """Rows finishing at different steps: the CUDA-graph engine compacts (new graph per shape) and still gives
    the CPU engine's tokens and attended counts, for this batch and the next one."""
    cfg = DyCokeConfig(tokens_per_frame=4, dp_layer=2, dp_prune_ratio=0.5)
    ckpt = str(build_tiny_checkpoint(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(5)
    videos = [torch.randint(0, 256, (f, 48, 48, 3), generator=g, dtype=torch.uint8) for f in (8, 5, 12, 6)]
    lengths = [3, 40, 4, 36, 5, 6, 33, 2]
    outs, compactions = {}, {}
    for device in ("cpu", "cuda"):
        llm = VideoLLM.load(ckpt, dtype="float32", device=device)
        vis = llm.encode(videos, cfg)
        reqs = [Request(f"r{i}", vis[i % 4], "Describe the video.", GenerationSettings(max_new_tokens=n, ignore_eos=True))
                for i, n in enumerate(lengths)]
        engine = Engine(llm, cfg, max_batch_size=8, sync_every=2, compact_ratio=0.5 if device == "cuda" else 0.0,
                        use_cuda_graph=device == "cuda")
        outs[device] = [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)]
        if device == "cuda":
            graphs = {m: p.graphs.get((False, p.cascade)) for m, p in engine._session._prefixes.items()}
            assert [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)] == outs["cuda"]
            # the second batch replays the prefix graphs captured by the first
            assert graphs and all(g is not None for g in graphs.values())
            assert {m: p.graphs.get((False, p.cascade)) for m, p in engine._session._prefixes.items()} == graphs
        compactions[device] = engine.compactions
    assert compactions["cpu"] == 0 and compactions["cuda"] >= 2
    assert outs["cpu"] == outs["cuda"]


def test_shared_prefixes_and_refills_under_cuda_graphs_match_cpu(tmp_path):
    """4 videos x 3 tasks through 4 rows: prefixes shared, rows refilled mid-flight, graphs replayed after
    each refill; tokens and attended counts equal the CPU engine's."""
    cfg = DyCokeConfig(tokens_per_frame=4, dp_layer=2, dp_prune_ratio=0.5)
    ckpt = str(build_tiny_checkpoint(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(7)
    videos = [torch.randint(0, 256, (f, 48, 48, 3), generator=g, dtype=torch.uint8) for f in (8, 5, 12, 6)]
    tasks = [("Describe the video.", 20), ("What happens? Answer briefly.", 9), ("Which option? (A) x (B) y", 3)]
    outs, prefixes = {}, {}
    for device in ("cpu", "cuda"):
        llm = VideoLLM.load(ckpt, dtype="float32", device=device)
        vis = llm.encode(videos, cfg)
        reqs = [Request(f"v{i}:{j}", v, q, GenerationSettings(max_new_tokens=n, ignore_eos=True))
                for i, v in enumerate(vis) for j, (q, n) in enumerate(tasks)]
        engine = Engine(llm, cfg, max_batch_size=4, sync_every=1, admit_fraction=0.0,
                        use_cuda_graph=device == "cuda")
        outs[device] = [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)]
        prefixes[device] = engine.stats["prefixes"]
    assert prefixes == {"cpu": 4, "cuda": 4}
    assert outs["cpu"] == outs["cuda"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_matches_sdpa(dtype):
    """The split-K decode kernel equals masked SDPA: grouped heads (G = 7, padded to 16), per-row lengths
    (slots past them hold garbage that must not be read), pruned positions, a chunk with nothing to read."""
    from dycoke.decode_attention import decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, kv_heads, groups, dim, slots = 5, 4, 7, 128, 777
    q = torch.randn(rows, kv_heads, groups, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g).to(dtype)
    lengths = torch.tensor([777, 500, 64, 1, 130], device="cuda")
    bias = torch.zeros(rows, 1, 1, slots, device="cuda", dtype=dtype)
    bias.masked_fill_(torch.rand(rows, 1, 1, slots, device="cuda", generator=g) < 0.4, float("-inf"))
    bias[..., 0] = 0
    valid = torch.arange(slots, device="cuda") < lengths[:, None]
    k.transpose(1, 2)[~valid] = float("nan")  # never read
    v.transpose(1, 2)[~valid] = float("nan")
    bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), torch.nan_to_num(k.float()), torch.nan_to_num(v.float()), attn_mask=bias.float(), scale=dim**-0.5)
    for splits in (1, 4, 16):
        out = decode_attention(q, k, v, bias, lengths, dim**-0.5, splits=splits)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_kernel_reads_a_groups_prefix_once_and_matches_sdpa(dtype):
    """Rows of a group hold the same prefix; only the leader's copy is read (the others' are NaN here), each
    row with its own mask and length; groups longer than the width split; a row that shares nothing."""
    from dycoke.decode_attention import cascade_attention, share_groups

    g = torch.Generator(device="cuda").manual_seed(1)
    rows, kv_heads, groups, dim, slots = 9, 4, 7, 128, 900
    q = torch.randn(rows, kv_heads, groups, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g).to(dtype)
    group = torch.tensor([5, 9, 5, 5, 100, 9, 5, 5, 101], device="cuda")
    prefix = {5: 700, 9: 64, 100: 0, 101: 300}
    shared = torch.tensor([prefix[int(x)] for x in group], device="cuda")
    lengths = torch.tensor([820, 70, 701, 850, 40, 190, 899, 760, 300], device="cuda")
    members = share_groups(group, 4)
    for r in range(rows):  # every member holds its leader's prefix; non-leaders' copies are never read
        lead = int((members == r).nonzero()[0, 0])
        k[r, :, : shared[r]] = k[lead, :, : shared[r]]
        v[r, :, : shared[r]] = v[lead, :, : shared[r]]
    bias = torch.zeros(rows, 1, 1, slots, device="cuda", dtype=dtype)
    bias.masked_fill_(torch.rand(rows, 1, 1, slots, device="cuda", generator=g) < 0.4, float("-inf"))
    bias[..., 0] = 0
    valid = torch.arange(slots, device="cuda") < lengths[:, None]
    bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(),
                                                           scale=dim**-0.5)
    leaders = members[:, 0] >= 0
    for r in (~leaders).nonzero().flatten():
        k[r, :, : shared[r]] = float("nan")
        v[r, :, : shared[r]] = float("nan")
    k.transpose(1, 2)[~valid] = float("nan")
    v.transpose(1, 2)[~valid] = float("nan")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for splits in (1, 3, 8):
        out = cascade_attention(q, k, v, bias, lengths, shared, members, dim**-0.5, splits=splits)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_engine_decode_kernel_and_sdpa_give_the_same_tokens(tmp_path):
    """fp32 tiny model on CUDA: the Triton decode kernel (with and without shared prefix reads) and SDPA produce
    the same greedy tokens and attended counts (DyCoke DP on; the kernel runs in every layer but L - 1); five
    tasks per video through six rows, so groups share, split past the width and are refilled."""
    cfg = DyCokeConfig(tokens_per_frame=4, dp_layer=2, dp_prune_ratio=0.5)
    ckpt = str(build_tiny_checkpoint(tmp_path / "tiny"))
    g = torch.Generator().manual_seed(7)
    videos = [torch.randint(0, 256, (f, 48, 48, 3), generator=g, dtype=torch.uint8) for f in (8, 5, 12)]
    llm = VideoLLM.load(ckpt, dtype="float32", device="cuda")
    vis = llm.encode(videos, cfg)
    tasks = [("Describe the video.", 20), ("What moves?", 7), ("Colours?", 33), ("Count the objects.", 25),
             ("Why?", 5)]
    reqs = [Request(f"v{i}:{j}", v, q, GenerationSettings(max_new_tokens=n, ignore_eos=True))
            for i, v in enumerate(vis) for j, (q, n) in enumerate(tasks)]
    outs = {}
    for kernel, share in (("sdpa", False), ("triton", False), ("triton", True)):
        engine = Engine(llm, cfg, max_batch_size=6, sync_every=1, decode_kernel=kernel)
        engine.share_decode_reads = share
        assert engine.use_decode_kernel == (kernel == "triton")
        outs[kernel, share] = [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)]
        assert engine._session.cascade == share
    assert outs["sdpa", False] == outs["triton", False] == outs["triton", True]
