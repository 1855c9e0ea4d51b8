"""Configuration: validation messages name the field; overrides; defaults; documentation."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import (
    ConfigurationError,
    FusedConfig,
    GenerateConfig,
    load_config,
    parse_override,
    to_yaml,
)
from pipeline.renames import NEW_PLACES
from tests.pipeline.configdata import NEW_FILE, OLD_FILE, leaf_fields

BASE = {"input": {"local_dir": "videos"}, "output": {"path": "out"}, "model": {"source": "some/model"}}


def _write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_minimal_file_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n"))
    assert cfg.decode.num_frames == 32 and cfg.tasks.caption_prompt and cfg.resolved_mode == "fused"
    assert cfg.compression.method == "dycoke" and cfg.compression.to_dycoke(196).frame_keep == 58


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
    with pytest.raises(ConfigurationError, match=r"input.s3_prefix: String should match pattern '\^s3://' \(got 'bucket/p'\)"):
        load_config(data={**BASE, "input": {"s3_prefix": "bucket/p"}})
    with pytest.raises(ConfigurationError, match=r"compression\.dycoke\.k: Input should be less than 1"):
        load_config(data={**BASE, "compression": {"dycoke": {"k": 1.5}}})
    with pytest.raises(ConfigurationError, match=r"compression\.dycoke\.k \(given as dycoke\.prune_ratio_k\)"):
        load_config(data={**BASE, "dycoke": {"prune_ratio_k": 1.5}})
    with pytest.raises(ConfigurationError, match="no tasks"):
        load_config(data={**BASE, "tasks": {"caption_prompt": None}})
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_config(_write(tmp_path, "input: [unclosed\n"))
    with pytest.raises(ConfigurationError, match="must hold a mapping of sections, got list"):
        load_config(_write(tmp_path, "- input\n- output\n"))
    with pytest.raises(ConfigurationError, match=r"tasks\.mcq\.0\.options"):
        load_config(data={**BASE, "tasks": {"mcq": [{"question": "q", "options": ["only one"]}]}})


def test_overrides(tmp_path):
    path = _write(tmp_path, "input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n")
    cfg = load_config(path, ["decode.num_frames=8", "tasks.questions=[a, b]", "mode=split", "run_id=nightly-1"])
    assert cfg.decode.num_frames == 8 and cfg.tasks.questions == ["a", "b"] and cfg.mode == "split"
    assert load_config(path, ["stages.mode=split"]).mode == "split"  # the old name still works
    assert cfg.run_id == "nightly-1" and cfg.effective_run_id() == "nightly-1"
    assert parse_override("model.source=s3://b/m/") == ("model.source", "s3://b/m/")
    with pytest.raises(ConfigurationError, match="section.field=value"):
        load_config(path, ["decode.num_frames"])
    with pytest.raises(ConfigurationError, match="fused.num_gpus"):
        load_config(path, ["fused.num_gpus=-1"])
    with pytest.raises(ConfigurationError, match=r"encode.num_gpus \(given as stages.gpus_per_actor\)"):
        load_config(path, ["stages.gpus_per_actor=-1"])


def test_run_id_is_deterministic():
    a = load_config(data=BASE)
    b = load_config(data={**BASE, "fused": {"concurrency": 4}, "decode": {"batch_size": 9, "memory": "1GiB"},
                          "ray": {"address": "auto"}})
    c = load_config(data={**BASE, "decode": {"num_frames": 16}})
    assert a.effective_run_id() == b.effective_run_id() != c.effective_run_id()


def test_every_field_is_documented():
    docs = leaf_fields()
    assert len(docs) > 40
    for name, desc in docs.items():
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
    cfg = load_config(data={**BASE, "compression": {"method": "holitom", "holitom": {"retain_ratio": 0.1, "tau": 0.65}}},
                      overrides=["compression.holitom.max_window=16"])
    dy = cfg.compression.to_dycoke(196)
    assert (dy.ttm_method, dy.holitom_retain_ratio, dy.holitom_tau, dy.holitom_max_window) == ("holitom", 0.1, 0.65, 16)
    assert json.loads(cfg.compression.record(196))["holitom"]["retain_ratio"] == 0.1
    assert cfg.effective_run_id() != load_config(data=BASE).effective_run_id()
    # HoliTom settings name the output folder only when HoliTom runs
    tau = {**BASE, "compression": {"holitom": {"tau": 0.5}}}
    assert load_config(data=tau).effective_run_id() == load_config(data=BASE).effective_run_id()
    holitom = {**BASE, "compression": {"method": "holitom"}}
    holitom_tau = {**BASE, "compression": {"method": "holitom", "holitom": {"tau": 0.5}}}
    assert load_config(data=holitom).effective_run_id() != load_config(data=holitom_tau).effective_run_id()
    with pytest.raises(ConfigurationError, match="compression.method"):
        load_config(data={**BASE, "compression": {"method": "fastv"}})
    with pytest.raises(ConfigurationError, match=r"compression.holitom.retain_ratio \(given as dycoke.holitom_retain_ratio\)"):
        load_config(data={**BASE, "dycoke": {"holitom_retain_ratio": 0}})
    none = load_config(data={**BASE, "compression": {"method": "none"}}).compression.to_dycoke(196)
    assert not none.ttm_enabled and none.dp_enabled  # DP on top of any method


def test_gpu_defaults_fill_the_device_and_fields_override():
    cpu, gpu = FusedConfig(), FusedConfig(num_gpus=1)
    assert (cpu.resolved_batch_size, GenerateConfig().resolved_batch_size, cpu.resolved_concurrency(8)) == (4, 8, 1)
    assert (gpu.resolved_batch_size, GenerateConfig(num_gpus=1).resolved_batch_size) == (32, 32)
    assert gpu.resolved_concurrency(8) == 8 and gpu.resolved_concurrency(0) == 1
    assert FusedConfig(num_gpus=2).resolved_concurrency(8) == 4
    fixed = FusedConfig(num_gpus=1, concurrency=2, batch_size=6, engine_max_batch_size=64)
    assert (fixed.resolved_concurrency(8), fixed.resolved_batch_size, fixed.engine_max_batch_size) == (2, 6, 64)
    assert gpu.engine_max_batch_size is None and gpu.max_concurrent_batches == 3  # rows from free memory, 3 calls in flight
    assert FusedConfig(concurrency=[1, 4]).concurrency == (1, 4) and FusedConfig(memory="2GiB").memory == 2 * 1024**3
    with pytest.raises(ValueError, match=r"\[min, max\]"):
        FusedConfig(concurrency=[4, 1])


def test_old_job_file_still_works_with_a_warning_naming_each_new_place(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.renames"):
        old = load_config(_write(tmp_path, OLD_FILE))
    assert old == load_config(_write(tmp_path, NEW_FILE))
    warned = caplog.text
    assert "dycoke.holitom_tau is now compression.holitom.tau" in warned
    assert "dycoke.ttm_method is now compression.method" in warned
    assert "stages.fused_actors is now fused.concurrency" in warned
    assert "stages.gpus_per_actor is now encode.num_gpus and generate.num_gpus and fused.num_gpus" in warned
    assert all(f"{name} is now " in warned for name in NEW_PLACES), [n for n in NEW_PLACES if f"{n} is now" not in warned]
    # the run id is the earlier release's for the same settings: a re-run after the upgrade finds its folder
    assert old.effective_run_id() == "run-55d8d72a1f9f"


def test_old_switch_ttm_enabled_false_means_method_none(caplog):
    cfg = load_config(data={**BASE, "dycoke": {"ttm_enabled": False, "ttm_method": "holitom"}})
    assert cfg.compression.method == "none"
    assert load_config(data={**BASE, "dycoke": {"ttm_enabled": True}}).compression.method == "dycoke"
    with pytest.raises(ConfigurationError, match="dycoke.ttm_method and compression.method are both set"):
        load_config(data={**BASE, "dycoke": {"ttm_method": "holitom"}, "compression": {"method": "none"}})


def test_print_config_form_round_trips(tmp_path):
    """What --print-config prints (the current names only) loads back to the same configuration."""
    cfg = load_config(_write(tmp_path, OLD_FILE), ["tasks.questions=[a, b]"])
    printed = to_yaml(cfg)
    assert "dycoke:" in printed and "stages:" not in printed and "holitom_tau" not in printed
    again = load_config(_write(tmp_path, printed))
    assert again == cfg and again.effective_run_id() == cfg.effective_run_id()
