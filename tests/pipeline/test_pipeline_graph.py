"""The graph as data: stage specs built from the per-stage sections (no Ray run needed to check the wiring)."""

from __future__ import annotations

from ray.data import ActorPoolStrategy, TaskPoolStrategy

from pipeline.config import load_config
from pipeline.decode import decode_batch
from pipeline.graph import stage_specs
from pipeline.stages import EncodeStage, FusedStage, GenerateStage

BASE = {"input": {"local_dir": "v"}, "output": {"path": "o"}, "model": {"source": "m"}}


def test_fused_specs_take_each_stage_section():
    cfg = load_config(data={**BASE, "decode": {"batch_size": 3, "num_cpus": 0.5, "memory": "1GiB", "concurrency": 6},
                            "fused": {"num_gpus": 1, "num_cpus": 2, "batch_size": 16, "max_concurrent_batches": 2}})
    decode, fused = stage_specs(cfg, 384, cluster_gpus=4)
    assert decode.fn is decode_batch and fused.fn is FusedStage
    d = decode.map_args()
    assert (d["batch_size"], d["num_cpus"], d["memory"]) == (3, 0.5, 1024**3) and "num_gpus" not in d
    assert isinstance(d["compute"], TaskPoolStrategy) and d["compute"].size == 6
    assert d["fn_kwargs"]["decode"] == cfg.decode.model_copy(update={"frame_size": 384}) and d["fn_kwargs"]["s3"] == cfg.s3
    f = fused.map_args()
    assert (f["batch_size"], f["num_cpus"], f["num_gpus"]) == (16, 2, 1) and "memory" not in f
    # and the frame size the run read (with decode.where: actor their decoder is made from it before the model loads)
    assert f["fn_constructor_kwargs"] == {"cfg": cfg, "frame_size": 384}
    pool = f["compute"]
    assert isinstance(pool, ActorPoolStrategy) and (pool.min_size, pool.max_size) == (4, 4)  # one actor per GPU
    assert pool.max_concurrent_calls_per_actor == 2  # calls of one actor feed its one engine


def test_split_specs_and_autoscaling_pools():
    cfg = load_config(data={**BASE, "mode": "split", "encode": {"num_gpus": 1, "concurrency": [1, 3]},
                            "generate": {"num_gpus": 1, "concurrency": 2}})
    specs = stage_specs(cfg, 384)
    assert [s.fn for s in specs] == [decode_batch, EncodeStage, GenerateStage]
    enc, gen = specs[1].map_args()["compute"], specs[2].map_args()["compute"]
    assert (enc.min_size, enc.max_size) == (1, 3) and (gen.min_size, gen.max_size) == (2, 2)
    assert specs[2].map_args()["batch_size"] == 32  # GPU default
    # the decode task always requests memory: its remote args never equal a model actor's (Ray Data would fuse them)
    assert all("memory" in s.map_args() and "memory" not in t.map_args() for s, t in zip(specs[:1], specs[1:]))
