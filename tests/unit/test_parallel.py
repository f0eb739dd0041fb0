"""N-D parallelism without processes: the setting, its launcher and config forms, size resolution, the
checks made before any process group exists, tensor-parallel plans and pipeline splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from distrib import ParallelismOptions, Settings, distributed
from distrib._cli.main import cli
from distrib._environment import launcher_settings
from distrib._launch import config_file
from distrib._launch.plan import MachineFacts, Target, build_plan
from distrib.errors import DistribWarning, PrepareError, SettingsError, TrainingError
from distrib.parallel import ParallelDims, resolve_dims
from distrib.parallel._mesh import check_combination
from distrib.parallel._plans import matches, resolve
from distrib.parallel._split import SkippedModule, split_model
from tests._support.parallel import PLAN, BlockNet

# -- the setting ------------------------------------------------------------------------------------


def test_defaults_and_the_dict_form():
    assert ParallelismOptions().sizes() == {"dp_replicate": 1, "dp_shard": -1, "tp": 1, "cp": 1, "pp": 1}
    settings = Settings.from_mapping({"parallelism": {"tp": 2, "tp_plan": {"layers.*.up": "colwise"}}})
    assert settings.parallelism == ParallelismOptions(tp=2, tp_plan={"layers.*.up": "colwise"})
    assert Settings(parallelism={"pp": 2}).parallelism.pp == 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tp": 0}, r"tp=0 must be >= 1, or -1"),
        ({"pp": -2}, r"pp=-2 must be >= 1, or -1"),
        ({"tp": -1}, r"dp_shard and tp to -1 \(dp_shard is -1 unless given\); only one size.*dp_shard=1"),
        ({"tp": "2"}, r"tp='2' is not valid: expected int"),
        ({"tp_plan": {"a": "columnwise"}}, r"'columnwise' is not a style; use one of 'colwise'"),
        ({"tp_plan": {"a": 3}}, r"is a int; give a style name"),
        ({"tp_plan": "everything"}, r"tp_plan='everything' is not valid: give 'auto'"),
        ({"tp_plan": "{broken"}, r"is not valid JSON"),
        ({"pp_schedule": "zero_bubble"}, r"expected one of 'gpipe', '1f1b'"),
        ({"pp_microbatches": 0}, r"pp_microbatches=0 must be >= 1"),
        ({"tensor": 2}, r"unknown setting 'tensor' for ParallelismOptions"),
    ],
)
def test_invalid_options_name_the_field_and_the_fix(values, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_mapping({"parallelism": values})


def test_a_plan_may_be_json_text_and_style_objects():
    from torch.distributed.tensor.parallel import ColwiseParallel

    assert ParallelismOptions(tp_plan='{"a.*": "rowwise"}').tp_plan == {"a.*": "rowwise"}
    style = ColwiseParallel()
    assert ParallelismOptions(tp_plan={"a": style, "b": None}).tp_plan == {"a": style, "b": None}
    assert ParallelismOptions(pp_split_points="layers.2, layers.4").pp_split_points == (
        "layers.2",
        "layers.4",
    )  # type: ignore[arg-type]


def test_the_launcher_variable_carries_the_setting():
    found = launcher_settings({"DISTRIB_PARALLELISM": '{"tp": 2, "tp_plan": {"x": "colwise"}}'})
    assert found["parallelism"] == ParallelismOptions(tp=2, tp_plan={"x": "colwise"})


# -- launcher flags and config keys ------------------------------------------------------------------


def test_launch_flags_become_one_parallelism_variable():
    values = {"num_processes": 8, "parallelism.tp": 2, "parallelism.pp": 2, "parallelism.pp_schedule": "gpipe",
              "parallelism.tp_plan": '{"layers.*.up": "colwise"}'}  # fmt: skip
    plan = build_plan(
        values, target=Target("t.py", "script", ()), machine=MachineFacts(cpu_count=8, gpu_count=0)
    )
    assert "strategy" not in dict(plan.settings)  # parallelism is no strategy's section
    sent = json.loads(plan.env["DISTRIB_PARALLELISM"])
    assert sent == {"tp": 2, "pp": 2, "pp_schedule": "gpipe", "tp_plan": {"layers.*.up": "colwise"}}
    assert launcher_settings(plan.env)["parallelism"] == ParallelismOptions(
        tp=2, pp=2, pp_schedule="gpipe", tp_plan={"layers.*.up": "colwise"}
    )


def test_the_cli_has_a_flag_per_size(tmp_path: Path):
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    flags = ["--dp-replicate-size", "1", "--dp-shard-size", "2", "--tp-size", "2", "--cp-size", "1",
             "--pp-size", "1", "--pp-microbatches", "4", "--pp-schedule", "1f1b"]  # fmt: skip
    result = CliRunner().invoke(
        cli, ["launch", "--dry-run", "--cpu", "--num-processes", "4", *flags, str(script)]
    )
    assert result.exit_code == 0, result.output
    assert 'DISTRIB_PARALLELISM={"dp_shard": 2, "tp": 2, "pp_microbatches": 4}' in result.output
    bad = CliRunner().invoke(cli, ["launch", "--dry-run", "--tp-size", "0", str(script)])
    assert bad.exit_code != 0 and "tp=0 must be >= 1" in bad.output


def test_config_file_keys(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("version: 1\nparallelism:\n  tp: 2\n  dp_shard: -1\n  tp_plan: {layers.*.up: colwise}\n")
    assert config_file.load(path).values == {
        "parallelism.tp": 2,
        "parallelism.dp_shard": -1,
        "parallelism.tp_plan": {"layers.*.up": "colwise"},
    }
    path.write_text("version: 1\nparallelism:\n  tp_size: 2\n")
    with pytest.raises(SettingsError, match=r"parallelism\.tp_size"):
        config_file.load(path)


# -- sizes --------------------------------------------------------------------------------------------


def test_minus_one_takes_the_rest_of_the_world():
    assert resolve_dims(ParallelismOptions(tp=2), 8) == ParallelDims(dp_shard=4, tp=2)
    assert resolve_dims(ParallelismOptions(dp_shard=2, tp=2, pp=-1), 8) == ParallelDims(
        dp_shard=2, tp=2, pp=2
    )
    dims = resolve_dims(ParallelismOptions(dp_replicate=2, dp_shard=2, cp=2), 8)
    assert (dims.size("dp"), dims.size("dp_cp"), dims.size("dp_shard_cp"), dims.world_size) == (4, 8, 4, 8)


@pytest.mark.parametrize(
    ("options", "world", "message"),
    [
        (
            ParallelismOptions(dp_shard=2, tp=2),
            8,
            r"dp_shard=2, tp=2, cp=1, pp=1 multiply to 4, but the world size is 8",
        ),
        (ParallelismOptions(tp=3), 4, r"tp=3.*world size 4.*multiply to 3, which does not divide 4"),
        (ParallelismOptions(dp_shard=1, tp=2), 1, r"multiply to 2, but the world size is 1"),
    ],
)
def test_sizes_that_do_not_fit_name_the_sizes_and_the_world_size(options, world, message):
    with pytest.raises(SettingsError, match=message):
        resolve_dims(options, world)


@pytest.mark.parametrize(
    ("settings", "strategy", "device", "message"),
    [
        (Settings(parallelism=ParallelismOptions(tp=2)), "deepspeed", "cpu", r"strategy 'ddp' or 'fsdp', not 'deepspeed'"),
        (Settings(parallelism=ParallelismOptions(cp=2)), "fsdp", "cpu", r"cp=2: context parallelism runs on CUDA"),
        (Settings(mixed_precision="fp16", parallelism=ParallelismOptions(pp=2)), "ddp", "cpu", r"use mixed_precision='bf16'"),
        (Settings(fsdp={"sharding": "hybrid"}, parallelism=ParallelismOptions(tp=2)), "fsdp", "cpu", r"'dp_replicate': N"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_settings_that_cannot_run_together_are_refused(settings, strategy, device, message):
    dims = resolve_dims(settings.parallelism, 4)
    with pytest.raises(SettingsError, match=message):
        check_combination(settings, dims, strategy, torch.device(device))


def test_the_scope_refuses_bad_sizes_before_it_creates_a_process_group(monkeypatch):
    # no rendezvous is reachable: an error after the group creation would hang, not raise
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "9")
    with (
        pytest.raises(SettingsError, match=r"multiply to 3, which does not divide 4"),
        distributed(parallelism={"tp": 3}),
    ):
        pass
    assert not torch.distributed.is_initialized()


def test_without_a_mesh_the_data_parallel_rank_is_the_rank():
    with distributed() as ctx:
        assert ctx.mesh is None and ctx.parallel is None
        assert (ctx.dp_rank, ctx.dp_world_size, ctx.dp_size) == (0, 1, 1)
        assert (ctx.tp_rank, ctx.tp_size, ctx.pp_rank, ctx.pp_size, ctx.cp_size) == (0, 1, 0, 1, 1)
    with distributed(parallelism={"tp": 1, "pp": 1}) as ctx:  # one process: every size is 1, no group
        assert ctx.mesh is None and ctx.dp_world_size == 1


# -- tensor-parallel plans ------------------------------------------------------------------------------


def test_patterns_match_full_names_and_dotted_suffixes():
    assert matches("layers.0.mlp.up_proj", "layers.*.mlp.up_proj")
    assert matches("model.layers.0.mlp.up_proj", "layers.*.mlp.up_proj")
    assert not matches("model.layers.0.mlp.up_proj_bias", "layers.*.mlp.up_proj")
    assert matches("lm_head", "lm_head") and not matches("x_lm_head", "lm_head")


def test_a_user_plan_resolves_to_torch_styles_first_match_first():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    net = BlockNet()
    plan = resolve(net, {"blocks.0.up": None, **PLAN, "blocks.*.norm": "sequence"}, 2)
    styles = {name: type(style) for name, _, style in plan}
    assert "blocks.0.up" not in styles  # mapped to None first: stays replicated
    assert styles["blocks.1.up"] is ColwiseParallel and styles["blocks.3.down"] is RowwiseParallel
    assert styles["blocks.2.norm"] is SequenceParallel
    assert len(styles) == 3 + 4 + 4


def test_plan_errors_name_the_module_and_the_fix():
    net = BlockNet()
    with pytest.raises(
        PrepareError, match=r"'layers\.\*\.up' matches no module of BlockNet; .*blocks\.0\.norm"
    ):
        resolve(net, {"layers.*.up": "colwise"}, 2)
    with pytest.raises(PrepareError, match=r"tp=3 cannot split blocks\.0\.up \(Linear, out_features=16\)"):
        resolve(net, PLAN, 3)
    with pytest.raises(PrepareError, match=r"style 'colwise' splits nn\.Linear.*matched a LayerNorm"):
        resolve(net, {"blocks.*.norm": "colwise"}, 2)


def test_a_model_without_a_plan_gets_an_error_naming_the_fix():
    with pytest.raises(PrepareError, match=r"BlockNet has no built-in tensor-parallel plan.*tp_plan=\{"):
        resolve(BlockNet(), None, 2)


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    values.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**values))


def test_the_builtin_llama_plan_is_found_by_structure():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {name: style for name, _, style in resolve(_llama(), "auto", 2)}
    assert isinstance(plan["model.layers.0.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["model.layers.1.self_attn.o_proj"], RowwiseParallel)
    assert isinstance(plan["model.layers.1.mlp.down_proj"], RowwiseParallel)
    assert isinstance(plan["model.embed_tokens"], RowwiseParallel)
    assert plan["lm_head"].output_layouts[0].is_replicate()
    assert len(plan) == 2 * 7 + 2
    tied = {name for name, _, _ in resolve(_llama(tie_word_embeddings=True), None, 2)}
    assert "lm_head" not in tied and "model.embed_tokens" not in tied  # tied weights stay replicated
    with pytest.raises(PrepareError, match=r"tp=4 cannot split the 2 key/value heads"):
        resolve(_llama(), None, 4)


def test_the_builtin_gpt2_plan_splits_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32))
    plan = {name: type(style).__name__ for name, _, style in resolve(model, None, 2)}
    assert plan == {
        f"transformer.h.{i}.{suffix}": style
        for i in range(2)
        for suffix, style in (("attn.c_attn", "Conv1DColwiseParallel"), ("attn.c_proj", "Conv1DRowwiseParallel"),
                              ("mlp.c_fc", "Conv1DColwiseParallel"), ("mlp.c_proj", "Conv1DRowwiseParallel"))
    }  # fmt: skip


# -- pipeline splits ------------------------------------------------------------------------------------


def test_each_stage_keeps_its_layers_under_their_original_names():
    first, last = BlockNet(), BlockNet()
    removed = split_model(first, pp=2, stage=0, split_points=None)
    split_model(last, pp=2, stage=1, split_points=None)
    assert list(first.state_dict()) == [f"{m}.{p}" for m in ("embed", "blocks.0.norm", "blocks.0.up",
        "blocks.0.down", "blocks.1.norm", "blocks.1.up", "blocks.1.down") for p in ("weight", "bias")]  # fmt: skip
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in last.state_dict() if k.startswith("blocks")} == {
        "blocks.2", "blocks.3"}  # fmt: skip
    assert isinstance(first.head, SkippedModule) and isinstance(last.embed, SkippedModule)
    assert len(removed) == 2 * 6 + 2 + 2  # blocks 2-3 (six tensors each), norm and head
    x = torch.randn(3, 8)
    assert torch.equal(last.embed(x), x)  # an activation passes through a module another stage holds
    assert last.blocks[2] is next(iter(last.blocks)) and isinstance(last.blocks, nn.ModuleList)
    with pytest.raises(
        TrainingError, match=r"layer 0 of this list is held by another pipeline stage; stage 1"
    ):
        last.blocks[0]


def test_split_points_choose_the_stages():
    model = BlockNet()
    split_model(model, pp=3, stage=1, split_points=("blocks.1", "blocks.3"))
    assert sorted(model.blocks._modules) == ["1", "2"]
    for points, message in ((("blocks.0",), r"none of them the first layer"), (("blocks.9",), r"not an entry"),
                            (("blocks.1", "head"), r"entries of one layer list")):  # fmt: skip
        with pytest.raises(PrepareError, match=message):
            split_model(BlockNet(), pp=len(points) + 1, stage=0, split_points=points)


def test_split_errors_name_the_fix():
    with pytest.raises(PrepareError, match=r"pp=2 cuts a model along its stack of layers"):
        split_model(nn.Linear(2, 2), pp=2, stage=0, split_points=None)
    tied = BlockNet()
    tied.head.weight = tied.embed.weight  # both 8 x ... shaped alike only for this check
    with pytest.raises(
        PrepareError, match=r"embed\.weight \(stage 0\) and head\.weight \(stage 1\) are one tied"
    ):
        split_model(tied, pp=2, stage=0, split_points=None)


def test_a_skipped_module_called_with_something_else_raises():
    skipped = SkippedModule("head", nn.Linear(2, 2), stage=0)
    with pytest.raises(TrainingError, match=r"stage 0 does not hold head \(Linear\)"):
        skipped(torch.tensor([1, 2]))
    position = SkippedModule("wpe", nn.Embedding(10, 4), stage=1)
    assert torch.equal(position(torch.tensor([[0, 1, 2]])), torch.zeros(1, 3, 4))


def test_options_a_size_of_one_leaves_unused_are_named():
    from distrib.parallel._mesh import unused_options

    options = ParallelismOptions(tp_plan={"a": "colwise"}, pp_schedule="gpipe", pp_microbatches=4)
    messages = unused_options(options, ParallelDims(dp_shard=2))
    assert len(messages) == 3
    assert "tp_plan={'a': 'colwise'} is ignored" in messages[0] and "tp=1" in messages[0]
    assert "pp_schedule='gpipe' is ignored" in messages[1] and "pp=1" in messages[1]
    assert unused_options(options, ParallelDims(tp=2, pp=2)) == []
    with (
        pytest.warns(DistribWarning, match="tp_plan"),
        distributed(parallelism={"tp_plan": {"a": "colwise"}}),
    ):
        pass


def test_a_split_model_refuses_a_whole_model_checkpoint_with_the_fix(tmp_path: Path):
    from distrib.errors import CheckpointMismatchError
    from distrib.parallel._checkpoint import require_dcp

    class Listed:  # what require_dcp reads of a checkpoint reader: which files the manifest lists
        def __init__(self, *names: str) -> None:
            self.directory, self._names = tmp_path, set(names)

        def has(self, name: str) -> bool:
            return name in self._names

    with pytest.raises(CheckpointMismatchError, match=r"whole models written by one rank.*save_state there"):
        require_dcp(Listed("model_0.safetensors"))  # type: ignore[arg-type]
    require_dcp(Listed(".metadata", "__0_0.distcp"))  # type: ignore[arg-type]


def test_resuming_at_another_size_is_silent_since_data_positions_are_global():
    import warnings

    from distrib.checkpointing._state import _check_world_size

    with distributed() as ctx, warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_world_size(ctx, {"world_size": 2, "dp_world_size": 1})  # a tp=2 or pp=2 run
        _check_world_size(ctx, {"world_size": 2, "dp_world_size": 2})
        _check_world_size(ctx, {"world_size": 2})  # older manifests: the world was data parallel
