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
            graphs = {m: p.graphs.get(False) for m, p in engine._session._prefixes.items()}
            assert [(r.token_ids, round(r.visual_tokens_attended, 4)) for r in engine.generate(reqs)] == outs["cuda"]
            # the second batch replays the prefix graphs captured by the first
            assert graphs and all(g is not None for g in graphs.values())
            assert {m: p.graphs.get(False) for m, p in engine._session._prefixes.items()} == graphs
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
