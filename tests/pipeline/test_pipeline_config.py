"""Configuration: validation messages name the field; overrides; defaults; documentation."""

from __future__ import annotations

import pytest

from pipeline.config import (
    ConfigurationError,
    PipelineConfig,
    field_docs,
    load_config,
    parse_override,
)

BASE = {"input": {"local_dir": "videos"}, "output": {"path": "out"}, "model": {"source": "some/model"}}


def _write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_minimal_file_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n"))
    assert cfg.decode.num_frames == 32 and cfg.tasks.caption_prompt and cfg.stages.resolved_mode == "fused"
    assert cfg.dycoke.to_dycoke(196).frame_keep == 58


def test_wrong_type_names_the_field(tmp_path):
    path = _write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\ndecode: {num_frames: many}\n")
    with pytest.raises(ConfigurationError) as exc:
        load_config(path)
    assert "decode.num_frames" in str(exc.value) and "integer" in str(exc.value) and "many" in str(exc.value)


def test_unknown_field_names_the_field(tmp_path):
    path = _write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m, revison: main}\n")
    with pytest.raises(ConfigurationError, match=r"model\.revison: unknown field"):
        load_config(path)


def test_missing_input(tmp_path):
    with pytest.raises(ConfigurationError) as exc:
        load_config(_write(tmp_path, "output: {path: o}\nmodel: {source: m}\n"))
    assert "input: required field is missing" in str(exc.value)
    with pytest.raises(ConfigurationError, match="exactly one of input.s3_prefix, input.manifest, input.local_dir"):
        load_config(data={**BASE, "input": {}})
    with pytest.raises(ConfigurationError, match="got s3_prefix, local_dir"):
        load_config(data={**BASE, "input": {"local_dir": "v", "s3_prefix": "s3://b/p/"}})


def test_other_validation(tmp_path):
    with pytest.raises(ConfigurationError, match="input.s3_prefix.*must start with s3://"):
        load_config(data={**BASE, "input": {"s3_prefix": "bucket/p"}})
    with pytest.raises(ConfigurationError, match="dycoke.prune_ratio_k"):
        load_config(data={**BASE, "dycoke": {"prune_ratio_k": 1.5}})
    with pytest.raises(ConfigurationError, match="no tasks"):
        load_config(data={**BASE, "tasks": {"caption_prompt": None}})
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_config(_write(tmp_path, "input: [unclosed\n"))
    with pytest.raises(ConfigurationError, match=r"tasks\.mcq\.0\.options"):
        load_config(data={**BASE, "tasks": {"mcq": [{"question": "q", "options": ["only one"]}]}})


def test_overrides(tmp_path):
    path = _write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n")
    cfg = load_config(path, ["decode.num_frames=8", "tasks.questions=[a, b]", "stages.mode=split", "run_id=nightly-1"])
    assert cfg.decode.num_frames == 8 and cfg.tasks.questions == ["a", "b"] and cfg.stages.mode == "split"
    assert cfg.run_id == "nightly-1" and cfg.effective_run_id() == "nightly-1"
    assert parse_override("model.source=s3://b/m/") == ("model.source", "s3://b/m/")
    with pytest.raises(ConfigurationError, match="section.field=value"):
        load_config(path, ["decode.num_frames"])
    with pytest.raises(ConfigurationError, match="stages.gpus_per_actor"):
        load_config(path, ["stages.gpus_per_actor=-1"])


def test_run_id_is_deterministic():
    a = load_config(data=BASE)
    b = load_config(data={**BASE, "stages": {"fused_actors": 4}, "ray": {"address": "auto"}})
    c = load_config(data={**BASE, "decode": {"num_frames": 16}})
    assert a.effective_run_id() == b.effective_run_id() != c.effective_run_id()


def test_every_field_is_documented():
    docs = field_docs(PipelineConfig)
    assert len(docs) > 40
    for name, _type, _default, desc in docs:
        assert desc, f"{name} has no description"


def test_task_ids_are_unique_and_output_path_not_empty():
    from pipeline.config import ConfigurationError, load_config

    base = {"input": {"local_dir": "v"}, "output": {"path": "o"}, "model": {"source": "m"}}
    two = [{"question": "a?", "options": ["x", "y"], "id": "k"}, {"question": "b?", "options": ["x", "y"], "id": "k"}]
    for mcq in (two, [{"question": "a?", "options": ["x", "y"], "id": "caption"}],
                [{"question": "a?", "options": ["x", "y"], "id": "vq:0"}]):
        with pytest.raises(ConfigurationError, match="task ids must be unique"):
            load_config(data={**base, "tasks": {"mcq": mcq}})
    with pytest.raises(ConfigurationError, match="output.path"):
        load_config(data={**base, "output": {"path": ""}})


def test_holitom_section_reaches_the_compressor():
    cfg = load_config(data={**BASE, "dycoke": {"ttm_method": "holitom", "holitom_retain_ratio": 0.1, "holitom_tau": 0.65}},
                      overrides=["dycoke.holitom_max_window=16"])
    dy = cfg.dycoke.to_dycoke(196)
    assert (dy.ttm_method, dy.holitom_retain_ratio, dy.holitom_tau, dy.holitom_max_window) == ("holitom", 0.1, 0.65, 16)
    assert '"ttm_method":"holitom"' in dy.to_json()
    assert cfg.effective_run_id() != load_config(data=BASE).effective_run_id()
    # HoliTom settings name the output folder only when HoliTom runs
    tau = {**BASE, "dycoke": {"holitom_tau": 0.5}}
    assert load_config(data=tau).effective_run_id() == load_config(data=BASE).effective_run_id()
    holitom = {**BASE, "dycoke": {"ttm_method": "holitom"}}
    holitom_tau = {**BASE, "dycoke": {"ttm_method": "holitom", "holitom_tau": 0.5}}
    assert load_config(data=holitom).effective_run_id() != load_config(data=holitom_tau).effective_run_id()
    with pytest.raises(ConfigurationError, match="dycoke.ttm_method"):
        load_config(data={**BASE, "dycoke": {"ttm_method": "fastv"}})
    with pytest.raises(ConfigurationError, match="dycoke.holitom_retain_ratio"):
        load_config(data={**BASE, "dycoke": {"holitom_retain_ratio": 0}})


def test_gpu_defaults_fill_the_device_and_fields_override():
    from pipeline.config import StagesConfig

    cpu, gpu = StagesConfig(), StagesConfig(gpus_per_actor=1)
    assert (cpu.resolved_fused_batch_size, cpu.resolved_generate_batch_size, cpu.resolved_fused_actors(8)) == (4, 8, 1)
    assert (gpu.resolved_fused_batch_size, gpu.resolved_generate_batch_size) == (32, 32)
    assert gpu.resolved_fused_actors(8) == 8 and gpu.resolved_fused_actors(0) == 1
    assert StagesConfig(gpus_per_actor=2).resolved_fused_actors(8) == 4
    fixed = StagesConfig(gpus_per_actor=1, fused_actors=2, fused_batch_size=6, engine_max_batch_size=64)
    assert (fixed.resolved_fused_actors(8), fixed.resolved_fused_batch_size, fixed.engine_max_batch_size) == (2, 6, 64)
    assert gpu.engine_max_batch_size is None and gpu.actor_concurrency == 3  # rows from free memory, 3 calls in flight
