"""HoliTom outer stages (DESIGN 4.6, issue 11) against a deliberately simple per-video oracle.

The oracle follows the structure of the authors' ``holitom/llava_arch.py`` step by step with Python
loops (DP with strict '>' over the singleton then windows 2, 3, ...; per-segment static mask, mean,
DPC-KNN, saliency top-k), written here from the description; it shares no code with
:mod:`dycoke.holitom`. Where the authors leave a choice to unspecified ``topk`` ties or to random
noise, it applies the documented rule (lower position wins) with a stable Python sort.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dycoke.holitom import frame_similarity, holitom_merge, plan_segments

# --------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------


def _oracle_dpc(z: torch.Tensor, c: int, k: int, beta: float) -> list[torch.Tensor]:
    """Density-peak clustering of ``z [n, D]`` into ``c`` merged centres, in position order."""
    n, d = z.shape
    dist = torch.cdist(z[None], z[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / (d ** 0.5)
    nearest = torch.topk(dist, min(k, c), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    parent = (dist * mask + dist.max() * (1 - mask)).min(dim=-1).values
    score = (parent * density).tolist()
    centres = sorted(sorted(range(n), key=lambda i: -score[i])[:c])
    members: dict[int, list[int]] = {j: [] for j in centres}
    for i in range(n):
        if i not in members:
            members[min(centres, key=lambda j: dist[i, j].item())].append(i)
    return [beta * z[j] + (1 - beta) * z[members[j]].mean(dim=0) if members[j] else z[j] for j in centres]


def oracle(x: torch.Tensor, a: torch.Tensor, r: float, tau: float = 0.8, beta: float = 0.6, k: int = 7,
           max_window: int = 1024) -> tuple[torch.Tensor, list[tuple[int, int]], float]:
    """One video ``x [F, T, D]``, ``a [F, T]`` -> (tokens [N, D], segments, retain ratio)."""
    n_frames, t, d = x.shape
    xn = F.normalize(x.float(), p=2, dim=-1)
    above = (F.cosine_similarity(xn[:-1], xn[1:], dim=-1) > tau).tolist()  # [F-1][T]

    def static_positions(s: int, e: int) -> list[int]:
        return [p for p in range(t) if all(above[j][p] for j in range(s, e))] if e > s else []

    dp, prev = [0] * n_frames, [0] * n_frames
    for i in range(n_frames):
        best, start = (dp[i - 1] if i > 0 else 0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + len(static_positions(j + 1, i)) * (w - 1)
            if val > best:
                best, start = val, j + 1
        dp[i], prev[i] = best, start
    segments, i = [], n_frames - 1
    while i >= 0:
        segments.append((prev[i], i))
        i = prev[i] - 1
    segments.reverse()
    total = n_frames * t
    ratio = min(r / ((total - dp[-1]) / total), 1)

    out: list[torch.Tensor] = []
    for s, e in segments:
        static = static_positions(s, e)
        dynamic = [p for p in range(t) if p not in static]
        c = round(len(static) * ratio)
        if c > 0:
            out += _oracle_dpc(x[s : e + 1][:, static].mean(dim=0), c, k, beta)
        m = math.ceil(len(dynamic) * ratio)
        for f in range(s, e + 1):
            sal = a[f].tolist()
            chosen = sorted(sorted(dynamic, key=lambda p: -sal[p])[:m])
            out += [x[f, p] for p in chosen]
    tokens = torch.stack(out) if out else x.new_zeros(0, d)
    return tokens, segments, ratio


# --------------------------------------------------------------------------------------------------
# Inputs with real temporal structure
# --------------------------------------------------------------------------------------------------


def scene_video(n_frames: int, t: int, d: int, seed: int, cuts: tuple[int, ...] = (), letterbox: int = 0,
                quantized_saliency: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes separated by ``cuts``; in each scene some positions are static (tiny jitter around one of
    three prototypes, so DPC-KNN sees several clusters) and the rest change every frame. The first
    ``letterbox`` positions are one constant vector in every frame (exact duplicates). Saliency is
    quantized to 4 levels when asked, so top-k ties occur."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, d, generator=g) * 3
    x = torch.empty(n_frames, t, d)
    bounds = [0, *cuts, n_frames]
    for s, e in zip(bounds[:-1], bounds[1:]):
        static = torch.rand(t, generator=g) < 0.6
        base = protos[torch.randint(0, 3, (t,), generator=g)] + torch.randn(t, d, generator=g) * 0.5
        for f in range(s, e):
            jitter = torch.randn(t, d, generator=g)
            x[f] = torch.where(static[:, None], base + 0.02 * jitter, base + 2.0 * jitter)
    x[:, :letterbox] = protos[0] * 0.1
    a = torch.rand(n_frames, t, generator=g)
    if quantized_saliency:
        a = torch.floor(a * 4) / 4
    return x, a


def walk_video(n_frames: int, t: int, d: int, seed: int, p_change: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position keeps its exact vector from frame to frame or jumps to a new random one: few
    positions make many DP ties (equal gains) and exact duplicate static tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n_frames, t, d)
    x[0] = torch.randn(t, d, generator=g)
    for f in range(1, n_frames):
        jump = torch.rand(t, generator=g) < p_change
        x[f] = torch.where(jump[:, None], torch.randn(t, d, generator=g), x[f - 1])
    a = torch.floor(torch.rand(n_frames, t, generator=g) * 3) / 3
    return x, a


def _check(x, a, r, **kw):
    got = holitom_merge(x[None], a[None], r, **kw)[0]
    want, segments, ratio = oracle(x, a, r, **kw)
    assert got.shape == want.shape, (got.shape, want.shape, segments)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got, segments, ratio


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,tau", [(0.10, 0.65), (0.15, 0.8), (0.25, 0.8), (0.5, 0.8), (1.0, 0.8)])
def test_equals_oracle_on_scenes(r, tau):
    x, a = scene_video(32, 49, 24, seed=int(r * 100), cuts=(5, 13, 14, 27), letterbox=5)
    got, segments, _ = _check(x, a, r, tau=tau)
    assert len(segments) >= 4 and any(e - s >= 3 for s, e in segments)


@pytest.mark.parametrize("seed", range(6))
def test_equals_oracle_with_ties(seed):
    """Random walks on 5 positions: equal DP gains, exact duplicate static tokens, saliency ties."""
    x, a = walk_video(24, 5, 6, seed=seed)
    _check(x, a, 0.3, tau=0.8)
    _check(x, a, 0.6, tau=0.8, max_window=3)


@pytest.mark.parametrize("n_frames", range(1, 41))
def test_every_frame_count(n_frames):
    x, a = walk_video(n_frames, 6, 8, seed=n_frames, p_change=0.3)
    got, segments, ratio = _check(x, a, 0.2)
    assert segments[0][0] == 0 and segments[-1][1] == n_frames - 1
    assert all(e1 + 1 == s2 for (_, e1), (s2, _) in zip(segments[:-1], segments[1:]))


def test_dp_prefers_singleton_then_shortest_window():
    """Frames 0-2 identical at 2 of 4 positions, frame 1->2 identical at all 4: window [0, 1] gains 2,
    [1, 2] gains 4, [0, 2] gains 2*2 = 4 as well. The DP keeps [0], [1, 2] (found before [0, 2])."""
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(4, 8, generator=g)
    f1 = torch.cat([f0[:2], torch.randn(2, 8, generator=g)])
    x = torch.stack([f0, f1, f1])
    plan = plan_segments(frame_similarity(x[None]), 0.5)
    assert plan.seg_start[0].tolist() == [0, 1, 1] and plan.seg_end[0].tolist() == [0, 2, 2]
    assert oracle(x, torch.rand(3, 4), 0.5)[1] == [(0, 0), (1, 2)]


def test_counts_of_a_designed_video():
    """Frames 0-3 one static scene, frames 4-7 all dynamic: removed 16*3 = 48 of 128, r' = 0.25 / (80/128)
    = 0.4; static centres round(16*0.4) = 6; each singleton keeps ceil(16*0.4) = 7; total 6 + 4*7 = 34."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 32, generator=g)
    x[:4] = x[0] + 0.001 * torch.randn(4, 16, 32, generator=g)
    plan = plan_segments(frame_similarity(x[None]), 0.25)
    assert plan.removed.tolist() == [48] and plan.ratio.tolist() == [0.25 / (80 / 128)]
    assert plan.centres[0].tolist() == [6, 0, 0, 0, 0, 0, 0, 0]
    assert plan.dynamic[0].tolist() == [0, 0, 0, 0, 7, 7, 7, 7]
    out = holitom_merge(x[None], torch.rand(1, 8, 16, generator=g), 0.25)[0]
    assert out.shape == (34, 32)


def test_round_half_even_and_zero_centres():
    """round(n_static * r') is Python's round: 2.5 -> 2, 0.5 -> 0 (the segment's static tokens dropped)."""
    g = torch.Generator().manual_seed(4)
    # 2 frames, 4 positions, 1 static: removed 1 of 8 -> r' = r * 8 / 7; r = 0.4375 gives r' = 0.5.
    x = torch.randn(2, 4, 8, generator=g)
    x[1, 0] = x[0, 0]
    plan = plan_segments(frame_similarity(x[None]), 0.4375)
    assert plan.ratio.tolist() == [0.5] and plan.centres[0].tolist() == [0, 0]  # round(1 * 0.5) = 0
    assert plan.dynamic[0].tolist() == [2, 2]  # ceil(3 * 0.5)
    _check(x, torch.rand(2, 4, generator=g), 0.4375)
    # 5 static positions at r' = 0.5 -> round(2.5) = 2.
    x = torch.randn(2, 8, 8, generator=g)
    x[1, :5] = x[0, :5]
    r = 0.5 * (16 - 5) / 16
    plan = plan_segments(frame_similarity(x[None]), r)
    assert plan.ratio.tolist() == [r / (11 / 16)] and plan.centres[0, 0].item() == round(5 * (r / (11 / 16)))
    _check(x, torch.rand(2, 8, generator=g), r)


def test_single_centre_is_the_first_static_position():
    """c == 1: all densities are exp(0); the documented rule picks the first static position."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 10, 8, generator=g)
    x[1:, :6] = x[0, :6]  # 6 static positions over 4 frames: removed 18 of 40
    r = 0.1
    plan = plan_segments(frame_similarity(x[None]), r)
    assert plan.centres[0, 0].item() == round(6 * r / (22 / 40)) == 1
    got, _, _ = _check(x, torch.rand(4, 10, generator=g), r)
    want_centre = 0.6 * x[0, 0] + 0.4 * x[0, 1:6].mean(0)
    torch.testing.assert_close(got[0], want_centre)


def test_batch_equals_per_video_and_does_not_compound_the_ratio():
    videos = [scene_video(16, 49, 24, seed=s, cuts=c, letterbox=lb)
              for s, c, lb in [(10, (4,), 3), (11, (), 0), (12, (2, 3, 9), 7), (13, (8,), 0)]]
    x = torch.stack([v[0] for v in videos])
    a = torch.stack([v[1] for v in videos])
    batch = holitom_merge(x, a, 0.15)
    plan = plan_segments(frame_similarity(x), 0.15)
    for i in range(len(videos)):
        alone = holitom_merge(x[i : i + 1], a[i : i + 1], 0.15)[0]
        assert torch.equal(batch[i], alone), i
        assert plan.ratio[i].item() == oracle(x[i], a[i], 0.15)[2]
    # The authors' loop reassigns retain_ratio per video: video 1 would see r' of video 0 as its r.
    assert len({round(v, 12) for v in plan.ratio.tolist()}) > 1


def test_max_window_one_is_per_frame_saliency_pruning():
    x, a = scene_video(8, 16, 8, seed=7, cuts=(3,))
    out = holitom_merge(x[None], a[None], 0.25, max_window=1)[0]
    assert out.shape[0] == 8 * math.ceil(16 * 0.25)
    _check(x, a, 0.25, max_window=1)


def test_bfloat16_keeps_dtype_and_dynamic_tokens_exactly():
    x, a = scene_video(12, 16, 16, seed=8, cuts=(6,))
    out = holitom_merge(x[None].bfloat16(), a[None], 0.2)[0]
    ref = holitom_merge(x[None].bfloat16().float(), a[None], 0.2)[0]
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_noise_only_changes_tie_breaks():
    x, a = scene_video(16, 49, 24, seed=9, cuts=(7,))
    base = holitom_merge(x[None], a[None], 0.15)[0]
    noisy = holitom_merge(x[None], a[None], 0.15, noise=1e-6)[0]
    assert noisy.shape == base.shape


def test_rejects_bad_inputs():
    x = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="saliency"):
        holitom_merge(x, torch.rand(1, 4, 5), 0.2)
    with pytest.raises(ValueError, match="retain_ratio"):
        holitom_merge(x, torch.rand(1, 4, 4), 0.0)
    assert holitom_merge(x[:0], torch.rand(0, 4, 4), 0.2) == []


def test_static_test_is_strict():
    """cos((1,0,0,0), (1,1,1,1)) is exactly 0.5 in fp32: at tau = 0.5 the position is NOT static."""
    x = torch.zeros(2, 3, 4)
    x[0, :, 0] = 1.0
    x[1, :] = 1.0
    x[1, 2, 1:] = 0.0  # position 2 identical in both frames (cos 1)
    sim = frame_similarity(x[None])
    assert sim[0, 0].tolist() == [0.5, 0.5, 1.0]
    assert plan_segments(sim, 0.5, tau=0.5).static[0].sum().item() == 2  # position 2, in both frames
    assert plan_segments(sim, 0.5, tau=0.4999).static[0].sum().item() == 6
    a = torch.rand(2, 3)
    _check(x, a, 0.5, tau=0.5)


# --------------------------------------------------------------------------------------------------
# Model wiring: saliency from the vision tower, encode, engine end to end (tiny random checkpoint)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model):
    from dycoke.llava import VideoLLM

    return VideoLLM.load(tiny_model, dtype="float32")


def _static_video(seed: int, n_frames: int = 8, side: int = 56) -> torch.Tensor:
    """Two shots: frame A for the first 5 frames, frame B after; one corner of the frame changes in
    every frame of the second shot (dynamic positions next to static ones)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8) for _ in range(2))
    video = torch.stack([a] * 5 + [b] * (n_frames - 5))
    video[5:, : side // 2, : side // 2] = torch.randint(0, 256, (n_frames - 5, side // 2, side // 2, 3), generator=g,
                                                        dtype=torch.uint8)
    return video


def test_saliency_equals_eager_attentions_of_the_feature_layer(tiny_model, llm):
    """Our hooked saliency == the eager model's output_attentions of the selected layer, mean over heads
    then queries, pooled with the model's own bilinear interpolation."""
    from transformers import LlavaOnevisionForConditionalGeneration

    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    pixels = torch.stack([llm.preprocess(_static_video(s)) for s in (1, 2)])  # [2, 8, 3, S, S]
    attn = llm.saliency_probe.attention
    feats, sal = llm.video_features(pixels, saliency=True)
    with torch.no_grad():
        out = eager.model.vision_tower(pixels.flatten(0, 1), output_attentions=True, output_hidden_states=True)
    layer = llm.model.config.vision_feature_layer
    index = layer % (len(out.hidden_states)) - 1  # attentions[i] belongs to hidden_states[i + 1]
    att = out.attentions[index].mean(dim=1).mean(dim=1)  # [N, P]
    grid = int(att.shape[-1] ** 0.5)
    pooled = F.interpolate(att.view(-1, 1, grid, grid), size=(math.ceil(grid / 2),) * 2, mode="bilinear")
    assert sal.shape == feats.shape[:3] and sal.dtype == torch.float32
    torch.testing.assert_close(sal, pooled.flatten(1).view(sal.shape), rtol=1e-5, atol=1e-6)
    # the hooks are gone afterwards and plain features are unchanged
    ours = [h for m in (attn, attn.q_proj, attn.k_proj) for h in m._forward_hooks.values()
            if h.__module__ == "dycoke.saliency"]
    assert not ours
    torch.testing.assert_close(llm.video_features(pixels), feats)


def test_encode_holitom_matches_holitom_merge(llm):
    from dycoke import DyCokeConfig

    cfg = DyCokeConfig(ttm_method="holitom", holitom_retain_ratio=0.2, holitom_tau=0.8)
    videos = [_static_video(3), _static_video(4, n_frames=11)]
    vis = llm.encode(videos, cfg)
    for v, out in zip(videos, vis):
        feats, sal = llm.video_features(llm.preprocess(v)[None], saliency=True)
        want = holitom_merge(feats, sal, 0.2, tau=0.8)[0]
        assert out.num_kept == want.shape[0] < out.num_full == v.shape[0] * llm.tokens_per_frame
        torch.testing.assert_close(out.tokens[:-1], want)
        torch.testing.assert_close(out.tokens[-1], llm.model.model.image_newline)


def test_engine_generates_with_a_holitom_span(tiny_model, llm):
    """DP off: the engine on a HoliTom span equals HF generate fed the same embeddings. DP on: it runs
    on the shorter span and attends to fewer visual tokens than it holds."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from dycoke import DyCokeConfig
    from dycoke.engine import Engine, GenerationSettings, Request

    videos = [_static_video(5), _static_video(6, n_frames=11), _static_video(7, n_frames=6)]
    question = "Describe the video."
    no_dp = DyCokeConfig(ttm_method="holitom", holitom_retain_ratio=0.2, dp_enabled=False)
    vis = llm.encode(videos, no_dp)
    reqs = [Request(f"r{i}", v, question, GenerationSettings(max_new_tokens=8)) for i, v in enumerate(vis)]
    engine = Engine(llm, no_dp, max_batch_size=4)
    results = engine.generate(reqs)
    stops = set(engine.default_stop_ids)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    ids = llm.prompt_ids(question)
    p = ids.index(llm.video_token_id)
    for v, res in zip(vis, results):
        assert res.error is None and res.visual_tokens == v.num_kept
        emb = hf.get_input_embeddings()(torch.tensor(ids))
        embeds = torch.cat([emb[:p], v.tokens, emb[p + 1 :]])[None]
        with torch.no_grad():
            out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=8, do_sample=False)
        want = out[0].tolist()
        stop = next((i for i, t in enumerate(want) if t in stops), len(want))
        assert res.token_ids == want[:stop]

    with_dp = DyCokeConfig(ttm_method="holitom", holitom_retain_ratio=0.2, dp_enabled=True, dp_layer=1,
                           dp_prune_ratio=0.7)
    reqs = [Request(f"d{i}", v, question, GenerationSettings(max_new_tokens=6, ignore_eos=True))
            for i, v in enumerate(llm.encode(videos, with_dp))]
    for v, res in zip(reqs, Engine(llm, with_dp, max_batch_size=4).generate(reqs)):
        assert res.error is None and res.output_tokens == 6 and res.visual_tokens == v.visual.num_kept
        assert res.visual_tokens_attended < v.visual.num_kept


def test_config_validates_holitom_settings():
    from dycoke import ConfigError, DyCokeConfig

    cfg = DyCokeConfig(ttm_method="holitom", holitom_retain_ratio=0.1, holitom_tau=0.65)
    assert '"ttm_method":"holitom"' in cfg.to_json() and '"holitom_retain_ratio":0.1' in cfg.to_json()
    for bad, message in [({"ttm_method": "fastv"}, "ttm_method must be one of"),
                         ({"holitom_retain_ratio": 0.0}, "holitom_retain_ratio"),
                         ({"holitom_retain_ratio": 1.5}, "holitom_retain_ratio"),
                         ({"holitom_tau": 1.2}, "holitom_tau"),
                         ({"holitom_max_window": 0}, "holitom_max_window"),
                         ({"holitom_k": 0}, "holitom_k"),
                         ({"holitom_k": 7.0}, "holitom_k must be an integer"),
                         ({"holitom_beta": -0.1}, "holitom_beta")]:
        with pytest.raises(ConfigError, match=message):
            DyCokeConfig(**bad)


def test_bench_smoke_cpu():
    """The benchmark's tiny CPU path (bench/bench_holitom.py --shape tiny), so it cannot rot."""
    from bench.bench_holitom import run

    report = run("tiny", videos=2, frames=8, reps=1, warmup=0, cpu=True, profile=False)
    assert report["ok"] and len(report["holitom"]) == 3
    for row in report["holitom"]:
        assert 0 < row["tokens_kept_min"] <= row["tokens_kept_max"] < row["tokens_full"] == 8 * 16


@pytest.mark.gpu
def test_cuda_equals_cpu():
    """On the GPU: same segments and counts as the CPU fp32 run, raw tokens identical, centres to 1e-5;
    bf16 input gives the same counts; the batch equals per-video calls."""
    videos = [scene_video(32, 196, 256, seed=20 + s, cuts=(3 + s, 19), letterbox=s) for s in range(4)]
    x = torch.stack([v[0] for v in videos])
    a = torch.stack([v[1] for v in videos])
    for r, tau in [(0.10, 0.65), (0.15, 0.8), (0.25, 0.8)]:
        cpu = holitom_merge(x, a, r, tau=tau)
        gpu = holitom_merge(x.cuda(), a.cuda(), r, tau=tau)
        bf16 = holitom_merge(x.cuda().bfloat16(), a.cuda(), r, tau=tau)
        ref16 = holitom_merge(x.bfloat16(), a, r, tau=tau)
        for i, (want, got) in enumerate(zip(cpu, gpu)):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
            assert bf16[i].shape == ref16[i].shape
            alone = holitom_merge(x[i : i + 1].cuda(), a[i : i + 1].cuda(), r, tau=tau)[0]
            torch.testing.assert_close(alone, got, rtol=1e-6, atol=1e-6)


def test_similarity_in_chunks_of_videos_changes_nothing(monkeypatch):
    import dycoke.holitom as holitom

    videos = [scene_video(8, 16, 8, seed=30 + s, cuts=(3,)) for s in range(5)]
    x = torch.stack([v[0] for v in videos])
    a = torch.stack([v[1] for v in videos])
    whole = holitom_merge(x, a, 0.2)
    monkeypatch.setattr(holitom, "_SIMILARITY_CHUNK", 2 * 8 * 16 * 8)  # two videos per call
    for got, want in zip(holitom_merge(x, a, 0.2), whole):
        assert torch.equal(got, want)
