"""Engine correctness on a tiny random-weight LLaVA-OneVision saved with save_pretrained and reloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dycoke import DyCokeConfig
from dycoke.engine import Engine, GenerationSettings, Request
from dycoke.llava import VideoLLM

QUESTIONS = ["Describe the video.", "What happens in this clip? Answer briefly.",
             "Which option best describes the scene? (A) cooking (B) dancing (C) driving"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def ckpt(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def llm(ckpt):
    return VideoLLM.load(str(ckpt), dtype="float32")


@pytest.fixture(scope="module")
def videos():
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 40, 50), (6, 32, 32), (13, 60, 40)]  # different frame counts -> different lengths
    return [torch.randint(0, 256, (f, h, w, 3), generator=g, dtype=torch.uint8) for f, h, w in shapes]


def _requests(vis, max_new=MAX_NEW):
    return [Request(f"r{i}", v, QUESTIONS[i % len(QUESTIONS)], GenerationSettings(max_new_tokens=max_new))
            for i, v in enumerate(vis)]


def _strip(ids, stops):
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(t)
    return out


def _hf_model(ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32,
                                                                  attn_implementation="sdpa").eval()


def test_compression_off_matches_hf_generate(ckpt, llm, videos):
    cfg = DyCokeConfig.off()
    engine = Engine(llm, cfg, max_batch_size=4)
    vis = llm.encode(videos, cfg)
    results = engine.generate(_requests(vis))
    hf = _hf_model(ckpt)
    t = llm.tokens_per_frame
    for i, (v, res) in enumerate(zip(videos, results)):
        ids = llm.prompt_ids(QUESTIONS[i % len(QUESTIONS)])
        p = ids.index(llm.video_token_id)
        expanded = ids[:p] + [llm.video_token_id] * (v.shape[0] * t + 1) + ids[p + 1 :]
        pixels = llm.preprocess(v)[None]
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
                              pixel_values_videos=pixels, max_new_tokens=MAX_NEW, do_sample=False)
        ref = _strip(out[0, len(expanded):].tolist(), engine.default_stop_ids)
        assert res.token_ids == ref, f"video {i}"
        assert res.prompt_tokens == len(expanded)
        assert res.visual_tokens == v.shape[0] * t


def test_features_equal_model_video_features(llm, videos):
    """Our [B, F, T, D] features equal the unmodified model's get_video_features (pooling adapter removed)."""
    v = videos[0]
    pixels = llm.preprocess(v)[None]
    ours = llm.video_features(pixels)
    inner = llm.model.model
    adapter = inner.__dict__.pop("apply_pooling")
    try:
        out = inner.get_video_features(pixels)
    finally:
        inner.apply_pooling = adapter
    theirs = out.pooler_output if hasattr(out, "pooler_output") else out
    theirs = theirs.reshape(1, -1, theirs.shape[-1])[:, : v.shape[0] * llm.tokens_per_frame]
    assert ours.shape == (1, v.shape[0], llm.tokens_per_frame, llm.hidden_size)
    torch.testing.assert_close(ours.flatten(1, 2), theirs, rtol=1e-5, atol=1e-5)


def test_bilinear_pooling_adapter_equals_interpolate(llm):
    inner = llm.model.model
    grid = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
    x = torch.randn(6, grid * grid, 24)
    original = type(inner).apply_pooling(inner, x)
    torch.testing.assert_close(inner.apply_pooling(x), original, rtol=1e-5, atol=1e-6)
    for n_in in (27, 8, 5):  # the real 27x27 grid, even and odd sizes
        y = torch.randn(3, 7, n_in, n_in, dtype=torch.float64)
        ref = F.interpolate(y, size=(-(-n_in // 2),) * 2, mode="bilinear", align_corners=False)
        from dycoke.llava import BilinearPooling

        pooled = BilinearPooling(n_in)(y.permute(0, 2, 3, 1).reshape(3, n_in * n_in, 7))
        torch.testing.assert_close(pooled, ref.permute(0, 2, 3, 1).reshape(3, -1, 7))


def test_ttm_only_matches_generate_on_same_embeddings(ckpt, llm, videos):
    cfg = DyCokeConfig(dp_enabled=False, tokens_per_frame=llm.tokens_per_frame)
    engine = Engine(llm, cfg, max_batch_size=4)
    vis = llm.encode(videos, cfg)
    assert all(x.num_kept < x.num_full for x in vis)
    reqs = _requests(vis)
    results = engine.generate(reqs)
    hf = _hf_model(ckpt)
    for req, res in zip(reqs, results):
        prepared = engine._prepare(0, req)
        with torch.no_grad():
            out = hf.generate(inputs_embeds=prepared.embeds[None],
                              attention_mask=torch.ones(1, prepared.length, dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False)
        assert res.token_ids == _strip(out[0].tolist(), engine.default_stop_ids)


# ---------------------------------------------------------------- an independent, naive DP
_NAIVE = {}


def _naive_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention; rows of layers >= L get the extra per-query mask in _NAIVE['extra'] ([S, S])."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    s = query.shape[2]
    scores = query @ k.transpose(-1, -2) * scaling
    scores = scores + torch.full((s, s), float("-inf")).triu(1)
    if module.layer_idx >= _NAIVE["L"]:
        scores = scores + _NAIVE["extra"][:s, :s]
    probs = scores.softmax(-1)
    if module.layer_idx == _NAIVE["L"] - 1:
        _NAIVE["probs"] = probs
    return (probs @ v).transpose(1, 2).contiguous(), None


def _naive_dp_generate(lm, lm_head, embed, prompt, start, n_vis, L, P, thr, max_new, stops):
    """Full recompute at every step; step t's query row masks its unselected visual tokens at layers >= L."""
    _NAIVE["L"] = L
    seq = prompt.clone()
    cap = prompt.shape[0] + max_new
    _NAIVE["extra"] = torch.zeros(cap, cap)
    prev, out = None, []
    h = lm(inputs_embeds=seq[None]).last_hidden_state
    tok = int(lm_head(h[0, -1]).argmax())
    for _ in range(max_new - 1):
        out.append(tok)
        if tok in stops:
            return out
        seq = torch.cat([seq, embed(torch.tensor([tok]))])
        lm(inputs_embeds=seq[None])  # layers < L do not depend on the masks: gives layer L-1's attention
        vec = _NAIVE["probs"][0, :, -1].mean(0)[start : start + n_vis - 1]
        row = seq.shape[0] - 1
        if prev is None or F.cosine_similarity(vec, prev, dim=0) < thr:
            keep = vec.topk(int((n_vis - 1) * (1 - P))).indices + start
            dropped = torch.ones(n_vis - 1, dtype=torch.bool)
            dropped[keep - start] = False
            _NAIVE["extra"][row, start : start + n_vis - 1][dropped] = float("-inf")
        prev = vec
        h = lm(inputs_embeds=seq[None]).last_hidden_state
        tok = int(lm_head(h[0, -1]).argmax())
    out.append(tok)
    return out


@pytest.fixture(scope="module")
def naive_model(ckpt):
    from transformers import AttentionInterface, LlavaOnevisionForConditionalGeneration

    AttentionInterface.register("naive_dp_test", _naive_attention)
    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(ckpt), dtype=torch.float32, attn_implementation="naive_dp_test").eval()


@pytest.mark.parametrize("prune_ratio,threshold", [(0.7, 0.9), (0.5, 0.999), (0.8, -1.0)])
def test_dp_matches_naive_implementation(llm, naive_model, videos, prune_ratio, threshold):
    cfg = DyCokeConfig(dp_layer=2, dp_prune_ratio=prune_ratio, dp_threshold=threshold,
                       tokens_per_frame=llm.tokens_per_frame)
    vis = llm.encode(videos, cfg)
    reqs = _requests(vis)
    engine = Engine(llm, cfg, max_batch_size=4)
    batched = engine.generate(reqs)
    single = Engine(llm, cfg, max_batch_size=1).generate(reqs[:1])
    lm = naive_model.model.language_model
    with torch.no_grad():
        for req, res in zip(reqs, batched):
            p = engine._prepare(0, req)
            ref = _naive_dp_generate(lm, naive_model.lm_head, lm.embed_tokens, p.embeds, p.vis_start, p.vis_len,
                                     cfg.dp_layer, prune_ratio, threshold, MAX_NEW, engine.default_stop_ids)
            assert res.token_ids == _strip(ref, engine.default_stop_ids)
    assert single[0].token_ids == batched[0].token_ids


def test_dp_zero_ratio_equals_dp_off(llm, videos):
    base = DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_enabled=False)
    vis = llm.encode(videos, base)
    off = Engine(llm, base).generate(_requests(vis))
    p0 = Engine(llm, DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_layer=1, dp_prune_ratio=0.0)
                ).generate(_requests(vis))
    assert [r.token_ids for r in off] == [r.token_ids for r in p0]
    assert [r.visual_tokens_attended for r in off] == [float(v.num_kept) for v in vis]


def test_batch_composition_does_not_change_results(llm, videos):
    cfg = DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_layer=2)
    vis = llm.encode(videos, cfg)
    reqs = _requests(vis)
    together = Engine(llm, cfg, max_batch_size=8).generate(reqs + reqs[::-1])
    for i, req in enumerate(reqs):
        alone = Engine(llm, cfg, max_batch_size=1).generate([req])[0]
        assert alone.token_ids == together[i].token_ids
        assert alone.visual_tokens_attended == pytest.approx(together[i].visual_tokens_attended)


def test_result_accounting_and_errors(llm, videos):
    cfg = DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_layer=2, dp_prune_ratio=0.5)
    vis = llm.encode(videos[:1], cfg)[0]
    too_long = Request("long", vis, "word " * 9000, GenerationSettings(max_new_tokens=4))
    ok = Request("ok", vis, "Describe.", GenerationSettings(max_new_tokens=6, ignore_eos=True))
    r_long, r_ok = Engine(llm, cfg).generate([too_long, ok])
    assert r_long.finish_reason == "error" and "context" in r_long.error
    assert r_ok.finish_reason == "length" and r_ok.output_tokens == 6 and len(r_ok.token_ids) == 6
    assert r_ok.visual_tokens == vis.num_kept
    budget = int((vis.num_kept - 1) * 0.5) + 1
    assert budget <= r_ok.visual_tokens_attended <= vis.num_kept


def test_sampling_is_reproducible_and_differs_from_greedy(llm, videos):
    cfg = DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_layer=2)
    vis = llm.encode(videos[:1], cfg)[0]
    req = Request("s", vis, "Describe.", GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.95,
                                                             ignore_eos=True))
    torch.manual_seed(0)
    a = Engine(llm, cfg).generate([req])[0]
    torch.manual_seed(0)
    b = Engine(llm, cfg).generate([req])[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    greedy = Engine(llm, cfg).generate([Request("g", vis, "Describe.", GenerationSettings(max_new_tokens=12,
                                                                                        ignore_eos=True))])[0]
    assert greedy.token_ids != a.token_ids


def test_invalid_settings_fail_clearly(llm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="dp_layer"):
        Engine(llm, DyCokeConfig(dp_layer=99))


def test_compaction_keeps_results_and_happens(llm, videos):
    """Rows that finish early are compacted out (KV cache, prune state and per-row buffers moved in place);
    every row's tokens, finish reason and attended count equal those of an engine that never compacts and
    of the request decoded alone."""
    cfg = DyCokeConfig(tokens_per_frame=llm.tokens_per_frame, dp_layer=2, dp_prune_ratio=0.5)
    vis = llm.encode(videos, cfg)
    lengths = [2, 30, 3, 4, 28, 5, 6, 26]
    reqs = [Request(f"r{i}", vis[i % len(vis)], QUESTIONS[i % len(QUESTIONS)],
                    GenerationSettings(max_new_tokens=n, ignore_eos=True)) for i, n in enumerate(lengths)]
    compacting = Engine(llm, cfg, max_batch_size=8, sync_every=1, compact_ratio=0.5)
    got = compacting.generate(reqs)
    assert compacting.compactions >= 2  # 8 -> 3 live rows, then -> 1
    plain = Engine(llm, cfg, max_batch_size=8, sync_every=1, compact_ratio=0.0)
    want = plain.generate(reqs)
    assert plain.compactions == 0
    for g, w, n in zip(got, want, lengths):
        assert g.token_ids == w.token_ids and len(g.token_ids) == n and g.finish_reason == w.finish_reason == "length"
        assert g.visual_tokens_attended == pytest.approx(w.visual_tokens_attended)
    for req, g in zip(reqs[:3], got[:3]):
        assert Engine(llm, cfg, max_batch_size=1).generate([req])[0].token_ids == g.token_ids
    # the engine stays usable for the next batch after compacting (the cached session was permuted), and the
    # prefix sessions (power-of-two row counts) are reused, not rebuilt
    prefixes = dict(compacting._session._prefixes)
    assert sorted(prefixes) == [1, 2, 4]
    assert [r.token_ids for r in compacting.generate(reqs)] == [r.token_ids for r in got]
    assert compacting._session._prefixes == prefixes
    # no reference cycle keeps a dropped engine's KV cache alive (it is freed by reference counting alone)
    import gc
    import weakref

    gc.disable()
    try:
        cache = weakref.ref(compacting._session.cache.k[0])
        del compacting, prefixes
        assert cache() is None
    finally:
        gc.enable()
    with pytest.raises(ValueError, match="compact_ratio"):
        Engine(llm, cfg, compact_ratio=1.0)
